"""The metric audit: its statistics on cases with a known answer, and a --fast run end to end.

The known answers are computed here without the helpers under test: a score that is a
strictly decreasing function of the MSE ranks exactly like PSNR (rho 1), and small
Spearman cases are worked out by hand. The --fast run only shows that the script works:
its numbers mean nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.common import parse_result
from experiments import metric_audit as audit


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, clean, restored), uint8 (n, 16, 16, 3): clean texture, a hazy input, and a
    'restoration' that is the clean image plus noise."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, (n, 16, 16, 3)).astype(np.uint8)
    inputs = (0.4 * clean + 0.6 * 200).astype(np.uint8)
    restored = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    return inputs, clean, restored


def test_ladder_runs_from_input_to_clean_then_the_restoration():
    inputs, clean, restored = _images(2, 0)
    items = audit.ladder(inputs, clean, restored)
    assert items.shape == (2, len(audit.LADDER_ITEMS), 16, 16, 3) and items.dtype == np.uint8
    assert np.array_equal(items[:, 0], inputs) and np.array_equal(items[:, len(audit.ALPHAS) - 1], clean)
    assert np.array_equal(items[:, -1], restored)
    mid = items[:, 2].astype(int)  # a = 0.5: halfway, to rounding
    assert np.abs(mid - (inputs.astype(int) + clean.astype(int)) / 2).max() <= 0.5


def test_a_score_of_minus_mse_ranks_the_ladder_like_psnr():
    inputs, clean, restored = _images(4, 1)
    items = audit.ladder(inputs, clean, restored)
    ref = audit.reference(items, clean)
    mse = ((items.astype(np.float64) - clean[:, None].astype(np.float64)) ** 2).mean(axis=(2, 3, 4))
    # PSNR = 10 log10(255^2 / MSE) falls strictly as the MSE grows: -MSE ranks like PSNR.
    same = audit.ranking(-mse, ref["psnr"])
    assert same["pooled"] == pytest.approx(1.0)
    assert same["per_image_median"] == pytest.approx(1.0) and same["images"] == 4
    assert audit.ranking(mse, ref["psnr"])["pooled"] == pytest.approx(-1.0)


def test_spearman_by_hand():
    # Ranks 1 2 3 4 against 1 3 2 4: sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert audit.ranking(np.array([[1.0, 2, 3, 4]]), np.array([[1.0, 3, 2, 4]]))["pooled"] == pytest.approx(0.8)
    # Pooled over two images; per image 1 and -1 (3 items each), so the median is 0.
    scores, ref = np.array([[1.0, 2, 3], [4, 5, 6]]), np.array([[1.0, 2, 3], [9, 8, 7]])
    # Pooled ranks 1..6 against 1 2 3 6 5 4: d = 0 0 0 2 0 2, rho = 1 - 6 * 8 / (6 * 35) = 0.7714.
    result = audit.ranking(scores, ref)
    assert result["pooled"] == pytest.approx(1 - 48 / 210)
    assert result["per_image_median"] == pytest.approx(0.0) and result["per_image_mean"] == pytest.approx(0.0)
    # A missing score leaves its pair out; too few pairs: undefined.
    assert math.isnan(audit.rho(np.array([1.0, np.nan, 3]), np.array([1.0, 2, 3])))


def test_best_agreement_counts_a_tie_as_a_random_pick():
    scores = np.array([[0.1, 0.5, 0.3], [0.9, 0.2, 0.1], [0.5, 0.5, 0.1], [np.nan, 0.1, 0.2]])
    psnr = np.array([[1.0, 2, 3], [3, 2, 1], [2, 1, 0], [1, 2, 3]])
    # miss, hit, tie of 2 holding the PSNR-best (1/2), left out (no score): (0 + 1 + 0.5) / 3.
    assert audit.best_agreement(scores, psnr) == pytest.approx(0.5)
    assert audit.mean_spread(np.array([[0.1, 0.5, 0.3], [0.2, 0.2, 0.4]])) == pytest.approx((0.4 + 0.2) / 2)


def test_ensemble_leaves_out_a_metric_that_could_score_nothing(offline_ensemble):
    raw = {"brisque": np.array([15.0, 75.0]), "niqe": np.array([np.nan, np.nan]), "piqe": np.array([30.0, 50.0])}
    scored = audit.on_scale(offline_ensemble, raw)
    # Registry ranges: brisque 0-150, piqe 0-100, lower is better; weights 0.4 and 0.3, renormalised.
    expected = [(0.4 * (1 - 15 / 150) + 0.3 * (1 - 30 / 100)) / 0.7, (0.4 * 0.5 + 0.3 * 0.5) / 0.7]
    assert scored["ensemble"] == pytest.approx(expected)
    assert np.isnan(scored["niqe"]).all()
    narrow = audit.on_scale(offline_ensemble.with_ranges({"brisque": (10.0, 20.0)}), raw)
    assert narrow["brisque"] == pytest.approx([0.5, 0.0])  # 75 lies outside: clipped to the worst


def test_arguments_are_checked():
    for argv in (["--tasks", "fog"], ["--metrics", "brisque,nope"]):
        with pytest.raises(SystemExit):
            audit.parse_args(argv)
    args = audit.parse_args(["--fast"])
    assert args.task_list == ["haze"] and args.pretrain_steps == 4
    assert audit.parse_args(["--tasks", "all"]).task_list == list(audit.TASKS)
    assert audit.needed_tasks(5) == 4 and audit.needed_tasks(1) == 1 and audit.needed_tasks(3) == 3


def test_fast_audit_writes_its_report(capsys, weights_dir, tmp_path):
    out = tmp_path / "audit"
    results = audit.main(["--fast", "--tasks", "haze", "--out", str(out)])

    on_disk = json.loads((out / "audit.json").read_text())
    assert on_disk == results and on_disk["fast"] is True
    assert on_disk["entries"] == ["brisque", "niqe", "piqe", "ensemble"] and list(on_disk["tasks"]) == ["haze"]
    task = on_disk["tasks"]["haze"]
    assert set(task["calibrated_ranges"]) == {"brisque", "niqe", "piqe"}
    for scale in audit.SCALES:
        for entry in on_disk["entries"]:
            stats = task["stats"][scale][entry]
            for ref in ("psnr", "ssim"):
                value = stats["ladder"][ref]["pooled"]
                assert isinstance(value, float) and -1.0 <= value <= 1.0, (scale, entry, ref, value)
            assert set(stats["pls"]) >= {"psnr", "ssim", "best_agreement", "score_spread"}
            assert set(stats["flip"]) == {"clean", "restored"}
            assert set(stats["size"]["clean"]) == {"48", "64", "96", "256"}
        assert task["stats"][scale]["niqe"]["size"]["clean"]["48"] is None  # NIQE needs 96 px: n/a
        assert isinstance(task["stats"][scale]["brisque"]["size"]["clean"]["48"], float)
    assert set(task["stats"]["raw"]) == {"brisque", "niqe", "piqe"}  # unclipped: single metrics only
    for stats in task["stats"]["raw"].values():
        assert -1.0 <= stats["ladder"]["psnr"]["pooled"] <= 1.0
    means = task["ladder_means"]
    assert all(len(v) == len(audit.LADDER_ITEMS) for v in means.values())
    assert means["psnr"][len(audit.ALPHAS) - 1] == 100.0  # the clean image itself
    for entry in on_disk["entries"]:
        assert on_disk["summary"][entry]["calibrated"]["verdict"][0].startswith("ranks the ladder: ")

    report = (out / "audit.md").read_text()
    assert "FAST MODE" in report and "## Ladder: Spearman vs PSNR" in report and "## In words" in report
    assert "| ensemble | calibrated |" in report

    result = parse_result([line for line in capsys.readouterr().out.splitlines() if line.strip()][-1])
    assert (result.name, result.unit, result.target) == ("metric_audit_rankers", "metrics", 4.0)
    assert result.value == len(on_disk["rankers"]["calibrated"])


def test_metrics_that_cannot_run_here_are_left_out_with_a_reason(weights_dir):
    from qualiteacher.iqa.registry import get_spec

    args = audit.parse_args(["--fast", "--metrics", "brisque,musiq,clipiqa"])
    ensemble, skipped = audit.load_ensemble(args, audit.task_config(args, "haze"))
    assert "needs images of at least 224 px" in skipped["clipiqa"]  # whatever its weights
    musiq_file = weights_dir / get_spec("musiq").files[0].relpath
    if not musiq_file.exists():
        assert "musiq" in skipped and "parameter files" in skipped["musiq"]
        assert ensemble.names == ["brisque"] and ensemble.weights == {"brisque": 1.0}
    assert audit.ensemble_weights(["brisque", "piqe"], {"brisque": 0.4, "niqe": 0.3, "piqe": 0.3}) == \
        {"brisque": 0.4, "piqe": 0.3}
    assert audit.ensemble_weights(["brisque", "musiq"], {"brisque": 0.4}) == {"brisque": 1.0, "musiq": 1.0}
