"""Run calibration (qualiteacher/calibration.py): normalisation ranges and drop thresholds
fitted to the teacher's pseudo-labels, saved in the run folder and reused on resume."""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import torch

from qualiteacher.calibration import Calibration, calibrate, fit_ranges
from qualiteacher.config import load_config
from qualiteacher.imageio import read_image, to_tensor
from qualiteacher.method.drop import drop_statistics

AUGS = ("hflip", "vflip", "rot90")


def test_fit_ranges_takes_percentiles_of_finite_scores():
    a = {"niqe": torch.tensor([1.0, 2.0, float("nan")]), "piqe": torch.tensor([10.0, 30.0, 20.0])}
    b = {"niqe": torch.tensor([3.0, float("inf"), 5.0]), "piqe": torch.tensor([40.0, 50.0, 60.0])}
    ranges = fit_ranges([a, b], percentiles=(0.0, 100.0))
    assert ranges == {"niqe": (1.0, 5.0), "piqe": (10.0, 60.0)}
    lo, hi = fit_ranges([a, b], percentiles=(25.0, 75.0))["piqe"]
    assert (lo, hi) == (pytest.approx(np.percentile([10, 30, 20, 40, 50, 60], 25)),
                        pytest.approx(np.percentile([10, 30, 20, 40, 50, 60], 75)))


@pytest.mark.parametrize("values, fragment", [
    ([float("nan"), 1.0], "1 finite score"),
    ([2.0, 2.0, 2.0], "span only"),
])
def test_fit_ranges_refuses_what_it_cannot_fit(values, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        fit_ranges([{"brisque": torch.tensor(values)}])
    assert "'brisque'" in str(err.value)


def test_calibration_file_round_trip_and_bad_file(tmp_path):
    cal = Calibration({"niqe": (3.0, 18.5), "piqe": (8.0, 33.0)}, 0.1, 0.4, images=16)
    cal.save(tmp_path / "calibration.json")
    assert Calibration.load(tmp_path / "calibration.json") == cal
    doc = json.loads((tmp_path / "calibration.json").read_text())
    doc["iqa_ranges"]["niqe"] = [5.0, 1.0]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"bad\.json.*'niqe'"):
        Calibration.load(tmp_path / "bad.json")
    (tmp_path / "garbage.json").write_text("{")
    with pytest.raises(ValueError, match="garbage.json: not a valid calibration file"):
        Calibration.load(tmp_path / "garbage.json")


def _calibration_images(calibration_dir) -> torch.Tensor:
    """pyiqa's five calibration images (from pristine-looking to badly distorted), 192 px."""
    images = [to_tensor(read_image(p)) for p in sorted(calibration_dir.glob("*.bmp"))]
    return torch.cat([torch.nn.functional.interpolate(x, size=(192, 192), mode="area") for x in images])


def test_fitted_ranges_spread_the_conditions(offline_ensemble, calibration_dir):
    """With the registry ranges the labels' scores sit in a narrow band; the fitted ranges
    spread the same labels over the 0-10 scale, in the same order."""
    x = _calibration_images(calibration_dir)
    cal = calibrate(offline_ensemble, lambda b: b, [x[:3], x[3:]], AUGS, (0.0, 100.0), keep_fraction=None)
    assert cal.images == 5 and set(cal.ranges) == {"brisque", "niqe", "piqe"} and cal.tau_multi is None
    raw = offline_ensemble.raw_scores(x)
    registry = offline_ensemble.combine(offline_ensemble.normalize(raw)) * 10
    fitted_ensemble = offline_ensemble.with_ranges(cal.ranges)
    fitted = fitted_ensemble.combine(fitted_ensemble.normalize(raw)) * 10
    assert fitted.max() - fitted.min() > 2 * (registry.max() - registry.min())
    assert fitted.min() >= 0 and fitted.max() <= 10
    # Each metric's order is kept; only the ensemble's relative weighting changes.
    for name, values in raw.items():
        order = torch.argsort(values)
        normalized = fitted_ensemble.normalize({name: values})[name]
        assert torch.all(normalized[order][1:] <= normalized[order][:-1]) or \
            torch.all(normalized[order][1:] >= normalized[order][:-1])
    # The loaded metrics are shared, the original ensemble is untouched.
    assert fitted_ensemble.models is offline_ensemble.models
    assert offline_ensemble.ranges["brisque"] == (0.0, 150.0)
    assert fitted_ensemble.ranges["brisque"] == cal.ranges["brisque"]


def test_fitted_drop_thresholds_keep_the_asked_fraction(offline_ensemble, calibration_dir):
    x = _calibration_images(calibration_dir)
    noisy = lambda b: (b + 0.08 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    cal = calibrate(offline_ensemble, noisy, [x], AUGS, (2.0, 98.0), keep_fraction=0.6)
    assert cal.tau_multi is not None and cal.tau_aug is not None
    # Refit by hand: the thresholds are the 0.6 quantiles of the statistics on the fitted scale.
    from qualiteacher.method.augment import multi_aug_pseudo_labels

    pls = multi_aug_pseudo_labels(noisy, x, AUGS).clamp(0, 1)
    fitted = offline_ensemble.with_ranges(cal.ranges)
    raw = offline_ensemble.raw_scores(pls.flatten(0, 1))
    normalized = torch.stack([v.reshape(5, 3) for v in fitted.normalize(raw).values()], dim=2)
    multi, spread = drop_statistics(normalized)
    assert (multi <= cal.tau_multi).sum() == 3 and (spread <= cal.tau_aug).sum() == 3


@pytest.fixture()
def unpaired_dir(tmp_path, calibration_dir):
    folder = tmp_path / "unpaired"
    folder.mkdir()
    for p in sorted(calibration_dir.glob("*.bmp")):
        shutil.copy(p, folder / p.name)
    return folder


def test_calibrate_run_saves_once_and_reuses_on_resume(tmp_path, unpaired_dir, weights_dir):
    from qualiteacher.pipelines.train import calibrate_run
    from qualiteacher.models.build import build_model
    from qualiteacher.run_dir import RunDir

    overrides = ["iqa.calibrate=true", "drop.calibrate_keep=0.8", "labelling.image_size=96",
                 f"paths.weights_dir={weights_dir}", "iqa.ranges={piqe: [1.0, 99.0]}"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    run_folder = RunDir(tmp_path / "run")
    run_folder.root.mkdir()
    fitted = calibrate_run(cfg, run_folder, _data(unpaired_dir), state)
    saved = Calibration.load(tmp_path / "run" / "calibration.json")
    assert saved.images == 5
    assert fitted.iqa.ranges["brisque"] == saved.ranges["brisque"] != (0.0, 150.0)
    assert fitted.iqa.ranges["piqe"] == (1.0, 99.0)  # set by hand: wins over the fit
    assert (fitted.drop.tau_multi, fitted.drop.tau_aug) == (saved.tau_multi, saved.tau_aug)
    assert cfg.iqa.ranges == {"piqe": (1.0, 99.0)}  # the caller's config is not changed
    # A resumed run reads the file: no images or teacher needed, the same config comes back.
    again = calibrate_run(cfg, run_folder, _data(tmp_path / "missing"), {})
    assert again == fitted
    # The config survives the JSON round trip that carries it to the actors.
    assert type(fitted).model_validate(fitted.model_dump(mode="json")) == fitted


def _data(folder):
    """A run's data folders; the calibration images double as the clean targets here."""
    return {"unpaired": folder, "paired_target": folder, "paired_input": folder}


def test_calibration_off_changes_nothing(tmp_path, unpaired_dir):
    from qualiteacher.pipelines.train import calibrate_run
    from qualiteacher.run_dir import RunDir

    cfg = load_config(None)
    assert calibrate_run(cfg, RunDir(tmp_path), _data(unpaired_dir), {}) is cfg
    assert not (tmp_path / "calibration.json").exists()


def test_drop_thresholds_fitted_on_the_fixed_scale(tmp_path, unpaired_dir, weights_dir):
    """`drop.calibrate_keep` without `iqa.calibrate` (paper.yaml): the registry ranges stay,
    the thresholds are fitted on that scale, and the worst sets are dropped."""
    from qualiteacher.pipelines.train import calibrate_run
    from qualiteacher.models.build import build_model
    from qualiteacher.run_dir import RunDir

    cfg = load_config(None, ["drop.calibrate_keep=0.6", "labelling.image_size=96", f"paths.weights_dir={weights_dir}"])
    torch.manual_seed(0)
    fitted = calibrate_run(cfg, RunDir(tmp_path), _data(unpaired_dir), build_model(cfg.model).state_dict())
    assert fitted.iqa.ranges == {} and fitted.iqa == cfg.iqa
    assert (fitted.drop.tau_multi, fitted.drop.tau_aug) != (cfg.drop.tau_multi, cfg.drop.tau_aug)


def test_paper_config_drops_on_a_spread_out_set():
    """paper.yaml fits its thresholds (fixed ones on the registry ranges dropped nothing on the
    demo's labels: worst variance 0.010, worst spread 0.143); on a set whose sets differ in
    consistency, the fitted thresholds drop the least consistent ones, on both criteria."""
    from qualiteacher.method.drop import AUGMENTATION_INSTABILITY, METRIC_DISAGREEMENT, calibrate_thresholds, dual_drop

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/paper.yaml")
    assert cfg.drop.enabled and cfg.drop.calibrate_keep is not None
    gen = torch.Generator().manual_seed(0)
    base = 0.55 + 0.05 * torch.rand(40, 1, 1, generator=gen)
    # sets 0-39: metric noise and augmentation noise of growing size (like the demo's: small)
    noise = torch.linspace(0.001, 0.03, 40).view(40, 1, 1) * torch.randn(40, 3, 3, generator=gen)
    normalized = (base + noise).clamp(0, 1)
    tau_multi, tau_aug = calibrate_thresholds(normalized, cfg.drop.calibrate_keep)
    decision = dual_drop(normalized, tau_multi, tau_aug)
    reasons = decision.counts()
    assert reasons.get(METRIC_DISAGREEMENT, 0) + reasons.get(AUGMENTATION_INSTABILITY, 0) >= 40 * (1 - cfg.drop.calibrate_keep)
    # the noisiest go, the calmest stay
    assert (~decision.keep).nonzero().float().mean() > 28 and decision.keep[:10].all()
    # the fixed thresholds of the paper would have kept every one of them
    assert dual_drop(normalized, 0.03, 0.15).keep.all()
