"""The core's outputs with a fixed seed, pinned as numbers: a refactoring of the pseudo-label
judgement (`qualiteacher/method/judge.py`) or the student's step (`qualiteacher/student_step.py`)
must leave them as they are. The constants were recorded from the code at 1b317cf.

Inputs are made here, deterministically: smooth synthetic images (no files), the offline
ensemble (BRISQUE, NIQE, PIQE), a tiny model, stand-ins for the reward and the perceptual loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qualiteacher.config import load_config
from qualiteacher.method import drop
from qualiteacher.method.bank_batch import BankBatch
from qualiteacher.method.judge import judge, ladder_levels
from qualiteacher.models.build import build_model
from qualiteacher.models.injection import injection_parameters, injection_snapshot
from qualiteacher.student_step import StepContext, step_losses

REL = 1e-5


def _image(gen: torch.Generator, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: a colour gradient, two flat blocks and mild noise."""
    ramp = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    tint = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=gen)
    img = torch.stack([xx, yy, 0.5 * (xx + yy)]) * tint
    for _ in range(2):
        top, left = (int(v) for v in torch.randint(0, size // 2, (2,), generator=gen))
        img[:, top:top + size // 3, left:left + size // 3] = torch.rand(3, 1, 1, generator=gen)
    return (img + 0.03 * torch.randn(img.shape, generator=gen)).clamp(0, 1)


def _label_sets() -> torch.Tensor:
    """(3, 3, 3, 96, 96): a consistent set; a set with one noisy label; another consistent set."""
    gen = torch.Generator().manual_seed(11)
    sets = torch.stack([torch.stack([img * s for s in (1.0, 0.96, 0.92)]) for img in
                        (_image(gen, 96) for _ in range(3))])
    sets[1, 2] = (sets[1, 2] + 0.3 * torch.randn(sets[1, 2].shape, generator=gen)).clamp(0, 1)
    return sets


# ---------------------------------------------------------------------------- judge
JUDGE_LEVELS = [[6.6071343421936035, 6.622581481933594, 6.625026702880859],
                [6.690761566162109, 6.67832612991333, 4.603849411010742],
                [6.628269195556641, 6.664891242980957, 6.698894500732422]]
JUDGE_REASONS = ("kept", drop.AUGMENTATION_INSTABILITY, "kept")
JUDGE_BEST = [2, 0, 2]
JUDGE_Q_MIN = [0.8111910820007324, 0.5685787200927734, 0.7778997421264648]
# Kept set 0: its labels' (2, 2) block weights
JUDGE_WEIGHTS_0 = [[[0.9921216368675232, 1.0065659284591675], [0.95635986328125, 1.044952154159546]],
                   [[1.00395929813385, 1.0005704164505005], [0.9596344232559204, 1.0358357429504395]],
                   [[1.0085546970367432, 0.9872867465019226], [0.9730655550956726, 1.0310930013656616]]]
JUDGE_LADDER = [[6.785988807678223, 6.6599273681640625], [6.813884735107422, 6.716407775878906]]  # rungs 0 and 0.5 of the best labels of sets 0 and 2


@pytest.fixture(scope="module")
def verdict(offline_ensemble):
    cfg = load_config("configs/smoke.yaml", ["drop.enabled=true", "drop.tau_multi=0.1", "drop.tau_aug=0.2"])
    return judge(offline_ensemble, _label_sets(), cfg, finite=[True, True, True])


def test_judge_outputs_are_pinned(verdict):
    assert verdict.reasons == JUDGE_REASONS
    assert verdict.keep.tolist() == [r == "kept" for r in JUDGE_REASONS]
    assert verdict.best.tolist() == JUDGE_BEST
    assert verdict.levels.tolist() == [pytest.approx(row, rel=REL) for row in JUDGE_LEVELS]
    assert verdict.q_min.tolist() == pytest.approx(JUDGE_Q_MIN, rel=REL)
    assert verdict.weights[0].tolist() == [[pytest.approx(r, rel=REL) for r in w] for w in JUDGE_WEIGHTS_0]


def test_ladder_levels_are_pinned(offline_ensemble):
    sets = _label_sets()
    levels = ladder_levels(offline_ensemble, sets[[0, 2], 2] * 0.7, sets[[0, 2], 0], (0.0, 0.5))
    assert levels.tolist() == [pytest.approx(row, rel=REL) for row in JUDGE_LADDER]


# ---------------------------------------------------------------------------- student step
CROP = 64
# Every term of a step past the warm-up (supervised, pixel, perceptual, Eq. 8 with fidelity, Eq. 9)
STEP_LOSSES = {"supervised": 0.2027953714132309, "pixel": 0.1741502732038498, "perceptual": 0.040158145129680634,
               "pref_rank": 0.744360625743866, "pref_anchor": 0.7052786946296692,
               "pref_identity": 0.21119996905326843, "q_high": 0.3922778069972992, "q_low": 0.39220917224884033,
               "pref_fidelity": 0.17427901923656464, "consistency": 0.0024205148220062256,
               "total": 1.6052706241607666}
# A step inside the warm-up: supervised, pixel and perceptual only
WARMUP_LOSSES = {"supervised": 0.2027953714132309, "pixel": 0.1741502732038498, "perceptual": 0.040158145129680634,
                 "total": 0.3849772810935974}


class _Paired:
    """Four pairs; `sample_batch` draws from them with the step's numpy generator."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.stack([_image(gen, CROP) for _ in range(4)])
        self.y = (self.x * 1.2).clamp(0, 1)

    def sample_batch(self, n, crop, rng):
        picks = rng.choice(len(self.x), size=n, replace=False)
        return self.x[picks], self.y[picks]


def _bank_batch() -> BankBatch:
    """Two images: one with 3 PLs, one with a single PL (two padding slots)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.stack([_image(gen, CROP) for _ in range(2)])
    return BankBatch(
        x=x,
        pl=torch.stack([torch.stack([(img * s).clamp(0, 1) for s in (1.1, 1.05, 1.0)]) for img in x]),
        weights=0.5 + torch.rand(2, 3, 1, CROP, CROP, generator=gen),
        level=torch.tensor([[6.5, 5.0, 3.0], [4.5, 7.0, 7.0]]),
        mask=torch.tensor([[True, True, True], [True, False, False]]),
        label_mask=torch.tensor([[True, True, True], [True, False, False]]),
    )


def _reward(y):  # smooth and differentiable, a stand-in metric
    return y.mean(dim=(1, 2, 3)) - 0.5 * y.var(dim=(1, 2, 3))


def _perceptual(pred, pl):  # a stand-in for the VGG loss
    return (pred - pl).pow(2).mean()


def _losses(step: int) -> dict[str, float]:
    cfg = load_config(None, ["model.width=8", "model.enc_blocks=[1,1]", "model.dec_blocks=[1,1]",
                             f"data.crop_size={CROP}", "train.batch_size=2", "iqa.reward_metrics={brisque: 1}",
                             "loss.preference.warmup_steps=3", "loss.preference.weight_fidelity=0.7",
                             "loss.perceptual_weight=0.2"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # non-zero injection so the conditions really differ
        for p in injection_parameters(model).values():
            p.normal_(0, 0.05)
    initial = injection_snapshot(model)
    with torch.no_grad():
        for p in injection_parameters(model).values():  # moved from the snapshot: L3 is not zero
            p.add_(0.01)
    ctx = StepContext(device=torch.device("cpu"), rng=np.random.default_rng(4), gen=torch.Generator().manual_seed(5),
                      reward=_reward, initial_injection=initial, perceptual=_perceptual)
    out = step_losses(cfg, model, _Paired(), _bank_batch(), ctx, step=step)
    return {k: float(v.detach()) for k, v in out.items()}


@pytest.mark.parametrize("step, expected", [(3, STEP_LOSSES), (2, WARMUP_LOSSES)], ids=["methods", "warmup"])
def test_step_losses_are_pinned(step, expected):
    losses = _losses(step)
    assert losses == pytest.approx(expected, rel=REL)


def test_the_pinned_cases_cover_every_term():
    assert set(STEP_LOSSES) == {"total", "supervised", "pixel", "perceptual", "pref_rank", "pref_anchor",
                                "pref_identity", "pref_fidelity", "q_high", "q_low", "consistency"}
    assert set(WARMUP_LOSSES) == {"total", "supervised", "pixel", "perceptual"}
    assert drop.AUGMENTATION_INSTABILITY in JUDGE_REASONS  # the noisy set is dropped, the others kept
