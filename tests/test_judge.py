"""The core's pseudo-label judgement (qualiteacher/method/judge.py) on small label sets,
scored by the offline ensemble (BRISQUE, NIQE, PIQE)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qualiteacher.config import load_config
from qualiteacher.imageio import read_image, to_tensor
from qualiteacher.iqa.ensemble import IQAEnsemble
from qualiteacher.method import drop
from qualiteacher.method.judge import best_label_ladders, decide, judge, ladder_levels, scored_rungs
from qualiteacher.method.ladder import constructed_levels, ladder_rungs

REPO = Path(__file__).resolve().parents[1]


def _crop(calibration_dir: Path, name: str, top: int = 0, left: int = 0) -> torch.Tensor:
    return to_tensor(read_image(calibration_dir / f"{name}.bmp"))[0, :, top:top + 96, left:left + 96]


def _consistent(image: torch.Tensor) -> torch.Tensor:
    """Three labels of one image that differ only slightly (as a teacher's augmentations do)."""
    return torch.stack([image * s for s in (1.0, 0.97, 0.94)])


@pytest.fixture(scope="module")
def label_sets(calibration_dir) -> torch.Tensor:
    """(4, 3, 3, 96, 96): consistent; one label corrupted by noise; one label flat (no
    BRISQUE / NIQE score); consistent (the test marks its teacher output non-finite)."""
    consistent = _consistent(_crop(calibration_dir, "I04"))
    corrupted = _consistent(_crop(calibration_dir, "I04", 100, 100))
    gen = torch.Generator().manual_seed(0)
    corrupted[2] = (corrupted[2] + 0.3 * torch.randn(corrupted[2].shape, generator=gen)).clamp(0, 1)
    flat = _consistent(_crop(calibration_dir, "I06"))
    flat[1] = 0.5
    return torch.stack([consistent, corrupted, flat, _consistent(_crop(calibration_dir, "I08"))])


@pytest.fixture(scope="module")
def cfg():
    # tau_multi high: only the corrupted label's spread across the set can drop it.
    return load_config(REPO / "configs/smoke.yaml", ["drop.enabled=true", "drop.tau_multi=0.1", "drop.tau_aug=0.2"])


@pytest.fixture(scope="module")
def verdict(offline_ensemble, label_sets, cfg):
    return judge(offline_ensemble, label_sets, cfg, finite=[True, True, True, False])


def test_judge_keeps_the_consistent_set_and_says_why_the_others_go(verdict):
    assert verdict.reasons == ("kept", drop.AUGMENTATION_INSTABILITY, drop.NON_FINITE, drop.NON_FINITE)
    assert verdict.keep.tolist() == [True, False, False, False] and verdict.kept == [0]
    assert verdict.drop_counts() == {drop.AUGMENTATION_INSTABILITY: 1, drop.NON_FINITE: 2}


def test_without_the_finite_mask_the_last_set_is_kept(offline_ensemble, verdict, cfg):
    """Without the teacher's mask the fourth set survives (so above it went for the mask
    alone); the same scores under a stricter tau_multi drop the corrupted set for metric
    disagreement, the first of the two drops."""
    unmasked = decide(verdict.levels, verdict.normalized, cfg.drop)
    assert unmasked.reasons == ("kept", drop.AUGMENTATION_INSTABILITY, drop.NON_FINITE, "kept")
    strict = cfg.drop.model_copy(update={"tau_multi": 0.02})
    assert decide(verdict.levels, verdict.normalized, strict).reasons[1] == drop.METRIC_DISAGREEMENT


def test_levels_are_the_ensemble_of_the_scores_and_best_is_their_argmax(offline_ensemble, verdict):
    assert verdict.levels.shape == (4, 3) and verdict.normalized.shape == (4, 3, 3)
    assert verdict.names == ("brisque", "niqe", "piqe")
    expected = offline_ensemble.combine(offline_ensemble.normalize(verdict.raw)) * 10.0
    torch.testing.assert_close(verdict.levels, expected, equal_nan=True)
    for m, name in enumerate(verdict.names):
        torch.testing.assert_close(verdict.normalized[..., m], offline_ensemble.normalize(verdict.raw)[name],
                                   equal_nan=True)
    for i in (0, 1, 3):  # the sets every metric could score
        assert verdict.best[i] == verdict.levels[i].argmax()
        assert verdict.levels[i, verdict.best[i]] == verdict.levels[i].max()
    assert verdict.raw_scores(0, 1) == {m: float(verdict.raw[m][0, 1]) for m in verdict.names}
    assert verdict.normalized_scores(0, 1) == {m: float(verdict.normalized[0, 1, k])
                                               for k, m in enumerate(verdict.names)}


def test_q_min_is_the_poorest_labels_reward_quality(offline_ensemble, verdict):
    for i in (0, 1, 3):
        quality = offline_ensemble.quality_from_raw({m: verdict.raw[m][i] for m in verdict.names})
        assert verdict.q_min[i] == quality.min()
    # The corrupted label is the poorest of its set.
    assert verdict.q_min[1] < verdict.q_min[0] - 0.1


def test_q_min_is_zero_without_a_differentiable_metric(weights_dir, label_sets, cfg):
    piqe_only = IQAEnsemble({"piqe": 1.0}, weights_dir, device="cpu")  # PIQE has no gradients
    assert judge(piqe_only, label_sets[:1, :, :, :32, :32], cfg).q_min.tolist() == [0.0]


def test_block_weights_are_made_for_the_kept_sets_only(offline_ensemble, verdict, label_sets, cfg):
    assert set(verdict.weights) == {0}
    expected = offline_ensemble.block_weights(label_sets[0], cfg.iqa.block_grid, cfg.iqa.min_block_weight)
    assert verdict.weights[0].shape == (3, cfg.iqa.block_grid, cfg.iqa.block_grid)
    torch.testing.assert_close(verdict.weights[0], expected)


def test_ladder_levels_score_the_rungs_of_the_best_labels(offline_ensemble, label_sets):
    inputs = label_sets[[0, 3], 2]  # stand-ins for the degraded inputs
    best = label_sets[[0, 3], 0]
    levels = ladder_levels(offline_ensemble, inputs, best, (0.0, 0.5))
    assert levels.shape == (2, 2)
    expected = offline_ensemble.score(ladder_rungs(inputs, best, (0.0, 0.5)).flatten(0, 1)).ensemble10
    torch.testing.assert_close(levels.flatten(), expected)
    # The rung at 0 is the input itself.
    torch.testing.assert_close(levels[:, 0], offline_ensemble.score(inputs).ensemble10, rtol=1e-3, atol=1e-3)


def test_constructed_rungs_sit_below_their_label_with_the_input_at_zero(verdict, cfg):
    """`labelling.ladder_levels: constructed`: a x the best label's capped level, so the order
    input < blend < label holds whatever a metric would say of the blends."""
    ladders = best_label_ladders(verdict, (0.0, 0.5, 0.75), cfg.model.score_cap, verdict.kept)
    assert set(ladders) == set(verdict.kept)
    for i, rungs in ladders.items():
        top = min(float(verdict.levels[i, verdict.best[i]]), cfg.model.score_cap)
        assert rungs == pytest.approx({0.0: 0.0, 0.5: 0.5 * top, 0.75: 0.75 * top})
        assert list(rungs.values()) == sorted(rungs.values()) and max(rungs.values()) < top
    assert constructed_levels((0.5,), 9.3, 7.0) == {0.5: 3.5}  # the label's level is capped first


def test_a_rung_without_a_finite_level_is_left_out():
    assert scored_rungs((0.0, 0.5, 0.75), torch.tensor([2.0, math.nan, 4.5])) == {0.0: 2.0, 0.75: 4.5}


def test_judge_imports_without_ray_or_redis():
    code = "import sys, qualiteacher.method.judge; print('ray' in sys.modules, 'redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False False"
