"""Synthetic degradations, the folder tool and the sample task sets."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qualiteacher.data.degradations import PARAMS, TASKS, degrade, degrade_folder
from qualiteacher.data.samples import (
    load_sample,
    make_task_sets,
    sample_names,
    split_names,
    square_resize,
    write_samples,
)
from qualiteacher.imageio import read_image

SEEDS = range(6)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return square_resize(load_sample("astronaut"), 96)


@pytest.fixture(scope="module")
def dark_flat() -> np.ndarray:
    """Flat dark grey: anything bright that appears is added by the degradation."""
    return np.full((96, 96, 3), 60, np.uint8)


def _f(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) / 255.0


def _brightened(before: np.ndarray, after: np.ndarray, levels: int) -> float:
    """Fraction of pixels whose brightness rose by more than ``levels``."""
    return float(((after.astype(int) - before.astype(int)).mean(axis=2) > levels).mean())


def _lag_corr(diff: np.ndarray, axis: int, lag: int = 2) -> float:
    a = diff - diff.mean()
    b = np.roll(a, lag, axis=axis)
    return float((a * b).mean() / (a * a).mean())


def _mean_stat(img: np.ndarray, task: str, domain: str, stat) -> float:
    return float(np.mean([stat(degrade(img, task, np.random.default_rng(s), domain)) for s in SEEDS]))


# --------------------------------------------------------------------------- API contract


def test_task_names_and_errors(photo: np.ndarray) -> None:
    assert TASKS == ("snow", "rain", "haze", "lowlight", "underwater")
    with pytest.raises(ValueError, match="snow, rain, haze, lowlight, underwater"):
        degrade(photo, "fog", np.random.default_rng(0))
    with pytest.raises(ValueError, match="paired, unpaired"):
        degrade(photo, "haze", np.random.default_rng(0), domain="real")
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        degrade(photo.astype(np.float32), "haze", np.random.default_rng(0))


@pytest.mark.parametrize("domain", ["paired", "unpaired"])
@pytest.mark.parametrize("task", TASKS)
def test_seeded_and_shape_preserving(task: str, domain: str) -> None:
    img = square_resize(load_sample("coffee"), 64)[:, :53].copy()  # non-square on purpose
    before = img.copy()
    a = degrade(img, task, np.random.default_rng(7), domain)
    b = degrade(img, task, np.random.default_rng(7), domain)
    c = degrade(img, task, np.random.default_rng(8), domain)
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 0.5  # another seed, another image
    assert np.abs(a.astype(int) - img.astype(int)).mean() > 2  # the image really changed
    np.testing.assert_array_equal(img, before)  # input untouched


@pytest.mark.parametrize("task", TASKS)
def test_tiny_images(task: str) -> None:
    for shape in [(1, 1, 3), (3, 17, 3)]:
        out = degrade(np.full(shape, 128, np.uint8), task, np.random.default_rng(0), "unpaired")
        assert out.shape == shape and out.dtype == np.uint8


def test_fast_on_512() -> None:
    img = square_resize(load_sample("astronaut"), 512)
    for task in TASKS:
        for domain in ("paired", "unpaired"):
            start = time.perf_counter()
            degrade(img, task, np.random.default_rng(0), domain)
            assert time.perf_counter() - start < 0.5, (task, domain)


# --------------------------------------------------------------------------- expected direction


@pytest.mark.parametrize("domain", ["paired", "unpaired"])
def test_haze_brightens_and_lowers_contrast(photo: np.ndarray, domain: str) -> None:
    for s in SEEDS:
        out = _f(degrade(photo, "haze", np.random.default_rng(s), domain))
        assert out.mean() > _f(photo).mean() + 0.05
        assert out.std() < 0.8 * _f(photo).std()


def test_haze_is_denser_far_away() -> None:
    # Depth proxy: top is far, so the top loses more contrast than the bottom.
    img = np.zeros((96, 96, 3), np.uint8)
    img[:, ::2] = 255  # vertical stripes: full contrast everywhere
    out = _f(degrade(img, "haze", np.random.default_rng(0), "paired"))
    assert out[:20].std() < out[-20:].std()


@pytest.mark.parametrize("domain", ["paired", "unpaired"])
def test_lowlight_darkens_with_noise(photo: np.ndarray, domain: str) -> None:
    grey = np.full((64, 64, 3), 128, np.uint8)
    for s in SEEDS:
        out = _f(degrade(photo, "lowlight", np.random.default_rng(s), domain))
        assert out.mean() < 0.5 * _f(photo).mean()
        flat = _f(degrade(grey, "lowlight", np.random.default_rng(s), domain))
        assert flat.std() > 1.5 / 255  # a flat input comes out noisy: the noise is real


@pytest.mark.parametrize("domain", ["paired", "unpaired"])
def test_underwater_attenuates_red(photo: np.ndarray, domain: str) -> None:
    def red_share(img: np.ndarray) -> float:
        m = _f(img).reshape(-1, 3).mean(axis=0)
        return m[0] / (0.5 * (m[1] + m[2]))

    for s in SEEDS:
        out = degrade(photo, "underwater", np.random.default_rng(s), domain)
        assert red_share(out) < 0.75 * red_share(photo)


@pytest.mark.parametrize("domain", ["paired", "unpaired"])
@pytest.mark.parametrize("task", ["rain", "snow"])
def test_rain_and_snow_add_bright_marks(dark_flat: np.ndarray, task: str, domain: str) -> None:
    for s in SEEDS:
        out = degrade(dark_flat, task, np.random.default_rng(s), domain)
        covered = _brightened(dark_flat, out, 40)
        assert 0.01 < covered < 0.7, covered  # sparse marks, not a global shift
        assert out.max() > 120  # some much brighter than the background
        marks = out[(out.astype(int) - 60).mean(axis=2) > 40].astype(int)
        assert (marks.max(axis=1) - marks.min(axis=1)).max() <= 12  # white-ish, not coloured


def test_rain_streaks_are_elongated_snow_flakes_are_not(dark_flat: np.ndarray) -> None:
    def anisotropy(task: str) -> float:
        vals = []
        for s in SEEDS:
            diff = _f(degrade(dark_flat, task, np.random.default_rng(s), "paired")).mean(axis=2)
            vals.append(_lag_corr(diff, axis=0, lag=3) - _lag_corr(diff, axis=1, lag=3))
        return float(np.mean(vals))

    assert anisotropy("rain") > 0.25  # near-vertical streaks: correlated along columns
    assert abs(anisotropy("snow")) < 0.15  # round flakes: no preferred direction


# --------------------------------------------------------------------------- domain shift


def test_every_task_has_different_domain_ranges() -> None:
    for task in TASKS:
        paired, unpaired = PARAMS[task]["paired"], PARAMS[task]["unpaired"]
        assert type(paired) is type(unpaired)
        changed = [f.name for f in fields(paired) if getattr(paired, f.name) != getattr(unpaired, f.name)]
        assert len(changed) >= 3, (task, changed)
    for domain in ("paired", "unpaired"):
        r, g, b = PARAMS["underwater"][domain].beta
        assert r.lo > max(g.hi, b.hi)  # red always attenuated most


def test_unpaired_domain_is_shifted(photo: np.ndarray, dark_flat: np.ndarray) -> None:
    def stat(task: str, img: np.ndarray, fn) -> tuple[float, float]:
        return _mean_stat(img, task, "paired", fn), _mean_stat(img, task, "unpaired", fn)

    def red_green(x: np.ndarray) -> float:
        return _f(x)[..., 0].mean() / _f(x)[..., 1].mean()

    p, u = stat("haze", photo, lambda x: _f(x).std())
    assert u < 0.8 * p  # denser haze
    p, u = stat("haze", photo, lambda x: _f(x)[..., 2].mean() - _f(x)[..., 0].mean())
    assert u < p - 0.03  # warm (yellowish) airlight instead of neutral grey
    p, u = stat("lowlight", photo, lambda x: _f(x).mean())
    assert u < 0.7 * p  # darker
    p, u = stat("underwater", photo, red_green)
    assert u < 0.8 * p  # stronger red loss, greener water
    p, u = stat("rain", dark_flat, lambda x: _brightened(dark_flat, x, 40))
    assert u > 1.5 * p  # heavier rain
    p, u = stat("snow", dark_flat, lambda x: _brightened(dark_flat, x, 80))
    assert u > 1.5 * p  # more, larger flakes


def test_unpaired_lowlight_is_noisier_relative_to_signal() -> None:
    grey = np.full((64, 64, 3), 160, np.uint8)

    def noise_to_signal(x: np.ndarray) -> float:
        return _f(x).std() / max(_f(x).mean(), 1e-3)

    p = _mean_stat(grey, "lowlight", "paired", noise_to_signal)
    u = _mean_stat(grey, "lowlight", "unpaired", noise_to_signal)
    assert u > 1.5 * p


# --------------------------------------------------------------------------- degrade_folder


def _make_folder(root: Path) -> Path:
    root.mkdir()
    for i, name in enumerate(["a.png", "b.jpg", "c.PNG"]):
        Image.fromarray(square_resize(load_sample("coffee"), 32 + 8 * i)).save(root / name)
    (root / "broken.png").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")
    (root / "readme.txt").write_text("ignored: not an image extension")
    return root


def test_degrade_folder_reports_bad_files_and_writes_good(tmp_path: Path) -> None:
    in_dir = _make_folder(tmp_path / "in")
    out_dir = tmp_path / "out"
    results = degrade_folder("rain", 3, in_dir, out_dir)
    status = {p.name: err for p, err in results}
    assert set(status) == {"a.png", "b.jpg", "c.PNG", "broken.png", "empty.jpg"}
    assert status["a.png"] is None and status["b.jpg"] is None and status["c.PNG"] is None
    assert "broken.png" in status["broken.png"] and "not a recognised image" in status["broken.png"]
    assert "empty.jpg" in status["empty.jpg"] and "0 bytes" in status["empty.jpg"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "b.png", "c.png"]
    for name, side in [("a", 32), ("b", 40), ("c", 48)]:
        out = read_image(out_dir / f"{name}.png")
        assert out.shape == (side, side, 3)
        assert not np.array_equal(out, read_image(next(in_dir.glob(f"{name}.*"))))


def test_degrade_folder_seeding(tmp_path: Path) -> None:
    in_dir = _make_folder(tmp_path / "in")
    first = degrade_folder("snow", 3, in_dir, tmp_path / "o1")
    # The same file alone in another folder gets the same degradation: per-file seeds.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "c.PNG").write_bytes((in_dir / "c.PNG").read_bytes())
    assert degrade_folder("snow", 3, alone, tmp_path / "o2") == [(alone / "c.PNG", None)]
    np.testing.assert_array_equal(read_image(tmp_path / "o1/c.png"), read_image(tmp_path / "o2/c.png"))
    degrade_folder("snow", 4, in_dir, tmp_path / "o3")
    assert not np.array_equal(read_image(tmp_path / "o1/c.png"), read_image(tmp_path / "o3/c.png"))
    assert sum(err is None for _, err in first) == 3


def test_degrade_folder_stem_collision_and_bad_task(tmp_path: Path) -> None:
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    Image.new("RGB", (8, 8), (50, 90, 130)).save(in_dir / "x.jpg")
    Image.new("RGB", (8, 8), (50, 90, 130)).save(in_dir / "x.png")
    results = degrade_folder("haze", 0, in_dir, tmp_path / "out")
    assert results[0] == (in_dir / "x.jpg", None)
    assert results[1][0] == in_dir / "x.png" and "already written for x.jpg" in results[1][1]
    with pytest.raises(ValueError, match="unknown task"):
        degrade_folder("smog", 0, in_dir, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(FileNotFoundError):
        degrade_folder("haze", 0, tmp_path / "missing", tmp_path / "out")


# --------------------------------------------------------------------------- samples


def test_samples_load_offline() -> None:
    names = sample_names()
    assert {"astronaut", "coffee", "chelsea", "rocket", "camera"} <= set(names)
    for name in names:
        img = load_sample(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
    cam = load_sample("camera")  # greyscale source: equal channels
    assert np.array_equal(cam[..., 0], cam[..., 2])
    with pytest.raises(ValueError, match="astronaut"):
        load_sample("lena")


def test_write_samples_square(tmp_path: Path) -> None:
    paths = write_samples(tmp_path, size=48)
    assert [p.stem for p in paths] == sample_names()
    assert all(read_image(p).shape == (48, 48, 3) for p in paths)


def test_make_task_sets(tmp_path: Path) -> None:
    dirs = make_task_sets("underwater", tmp_path / "sets", seed=1, size=48, n_test=2, crops_per_image=2)
    groups = split_names(2)
    assert set(groups["test"]).isdisjoint(groups["paired"] + groups["unpaired"])
    assert set(groups["paired"]).isdisjoint(groups["unpaired"])

    def stems(key: str) -> list[str]:
        return sorted(p.stem for p in dirs[key].iterdir())

    assert stems("paired/input") == stems("paired/target")
    assert stems("test/input") == stems("test/target")
    assert len(stems("test/input")) == 2 * 2
    assert not (tmp_path / "sets/unpaired/target").exists()  # no ground truth for unpaired
    sources = {key: {s.rsplit("_", 1)[0] for s in stems(key)} for key in dirs}
    assert sources["test/input"] == set(groups["test"])
    assert sources["paired/input"] == set(groups["paired"])
    assert sources["unpaired/input"] == set(groups["unpaired"])

    # Inputs are degraded targets, and degrade_folder reproduces them exactly.
    results = degrade_folder("underwater", 1, dirs["paired/target"], tmp_path / "again")
    assert all(err is None for _, err in results)
    for path in dirs["paired/input"].iterdir():
        again = read_image(tmp_path / "again" / path.name)
        np.testing.assert_array_equal(read_image(path), again)
        assert not np.array_equal(again, read_image(dirs["paired/target"] / path.name))

    with pytest.raises(FileExistsError, match="overwrite"):
        make_task_sets("underwater", tmp_path / "sets", seed=1, size=48)
    make_task_sets("underwater", tmp_path / "sets", seed=2, size=48, crops_per_image=1, overwrite=True)
    assert len(list(dirs["paired/input"].iterdir())) == len(groups["paired"])  # stale files gone


def test_degrade_cli_writes_same_names_and_reports_bad_files(tmp_path):
    import subprocess
    import sys

    from qualiteacher.data.samples import write_samples

    src = tmp_path / "in"
    written = write_samples(src, size=64)
    (src / "bad.png").write_text("not an image")
    out = subprocess.run([sys.executable, "-m", "qualiteacher.pipelines.cli", "degrade", "--task", "rain", "--seed", "1",
                          str(src), str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 1 and "bad.png" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.stem + ".png" for p in written)
    unknown = subprocess.run([sys.executable, "-m", "qualiteacher.pipelines.cli", "degrade", "--task", "fog",
                              str(src), str(tmp_path / "o2")], capture_output=True, text=True)
    assert unknown.returncode == 2 and "fog" in unknown.stderr


def test_regions_split_tests_on_the_unpaired_photos_other_halves(tmp_path: Path) -> None:
    """test_split="regions": the test set comes from the unpaired photos, never from their
    pixels the unpaired set crops, and with names (hence degradations) of its own."""
    from qualiteacher.data.samples import load_sample, photo_half, test_photo_count

    dirs = make_task_sets("underwater", tmp_path / "sets", seed=1, size=32, n_test=3, crops_per_image=2,
                          hidden_targets=True, test_split="regions")
    groups = split_names(0)

    def photos(key: str) -> set[str]:
        return {p.stem.rsplit("_", 1)[0] for p in dirs[key].iterdir()}

    assert photos("test/input") == photos("unpaired/input") == set(groups["unpaired"])
    assert photos("paired/input") == set(groups["paired"])
    assert len(list(dirs["test/input"].iterdir())) == test_photo_count(3, "regions") * 2  # n_test ignored
    test_names = {p.name for p in dirs["test/input"].iterdir()}
    assert test_names.isdisjoint(p.name for p in dirs["unpaired/input"].iterdir())
    assert all(n.rsplit("_", 1)[1].startswith("t") for n in test_names)
    # halves: across the longer side, together the whole photo
    img = load_sample(groups["unpaired"][0])
    first, second = photo_half(img, 0), photo_half(img, 1)
    assert first.size + second.size == img.size and first.shape[2] == 3
    with pytest.raises(ValueError, match="test_split"):
        make_task_sets("underwater", tmp_path / "other", seed=1, size=32, test_split="pixels")


def test_photos_split_is_unchanged_by_the_regions_option(tmp_path: Path) -> None:
    """The default split's files are the ones every recorded benchmark used: names and pixels
    pinned by a digest taken before the regions option existed (a Pillow release that changes
    its Lanczos filter would move it too)."""
    import hashlib

    dirs = make_task_sets("haze", tmp_path / "sets", seed=3, size=24, n_test=2, crops_per_image=1,
                          hidden_targets=True)
    digest = hashlib.sha256()
    for key in sorted(dirs):
        for path in sorted(dirs[key].iterdir()):
            digest.update(path.name.encode())
            digest.update(read_image(path).tobytes())
    assert digest.hexdigest() == "933a13277047a4505845f0c2f284ba1b5c23cf865cb436f191536aae315568e7"


def test_the_jobs_bundled_sets_follow_data_bundled_test_split(tmp_path: Path) -> None:
    """The quickstart tests on the unpaired photos' other halves (`data.bundled_test_split`)."""
    from qualiteacher.config import load_config
    from qualiteacher.data.samples import test_photo_count
    from qualiteacher.pipelines.train import prepare_data
    from qualiteacher.run_dir import RunDir

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs/quickstart.yaml", ["labelling.image_size=32"])
    assert cfg.data.bundled_test_split == "regions"
    sets = prepare_data(cfg, RunDir(tmp_path))
    names = sorted(p.name for p in sets["test_input"].iterdir())
    assert len(names) == test_photo_count(0, "regions") * 4
    assert all(n.rsplit("_", 1)[1].startswith("t") for n in names)  # the held-out halves' own names
