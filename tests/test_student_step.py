"""The student's step computes each bank image at every PL's level, at 7 and at s_low from
one shared forward (one encoder pass per image). It must equal the plain computation:
one forward per (image, condition), padding slots left out, the same Eq. 8 terms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qualiteacher.config import load_config
from qualiteacher.losses.pixel import block_weighted_l1, l1
from qualiteacher.losses.preference import preference_loss, sample_low_scores
from qualiteacher.method.bank_batch import BankBatch
from qualiteacher.models.build import build_model
from qualiteacher.models.injection import injection_parameters, injection_snapshot
from qualiteacher.student_step import StepContext, set_learning_rates, step_losses, student_optimizer

CROP = 32


class _Paired:
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.rand(2, 3, CROP, CROP, generator=g), torch.rand(2, 3, CROP, CROP, generator=g)

    def sample_batch(self, n, crop, rng):
        return self.x, self.y


def _bank_batch() -> BankBatch:
    """Three images: two with 3 PLs, one with a single PL (two padding slots)."""
    g = torch.Generator().manual_seed(2)
    return BankBatch(
        x=torch.rand(3, 3, CROP, CROP, generator=g),
        pl=torch.rand(3, 3, 3, CROP, CROP, generator=g),
        weights=0.5 + torch.rand(3, 3, 1, CROP, CROP, generator=g),
        level=torch.tensor([[7.0, 5.5, 3.0], [6.0, 4.0, 2.5], [4.5, 7.0, 7.0]]),
        mask=torch.tensor([[True, True, True], [True, True, True], [True, False, False]]),
        label_mask=torch.tensor([[True, True, True], [True, True, True], [True, False, False]]),
    )


def _reward(y):  # smooth, differentiable, depends on every pixel: a stand-in metric
    return y.mean(dim=(1, 2, 3)) - 0.5 * y.var(dim=(1, 2, 3))


def _no_reward() -> StepContext:
    return StepContext(device=torch.device("cpu"), rng=np.random.default_rng(0), gen=torch.Generator())


def _model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # non-zero injection so the conditions really differ
        for p in injection_parameters(model).values():
            p.normal_(0, 0.05)
    return model


def _reference(cfg, model, paired, batch, gen, initial):
    """One forward per (image, condition); the same terms as the student's step."""
    lc, cap = cfg.loss, cfg.model.score_cap
    total = lc.supervised_weight * l1(model(paired.x, cap), paired.y)
    preds, pls, maps = [], [], []
    for i in range(3):
        for j in range(3):
            if batch.mask[i, j]:
                preds.append(model(batch.x[i:i + 1], batch.level[i, j:j + 1]))
                pls.append(batch.pl[i, j:j + 1]), maps.append(batch.weights[i, j:j + 1])
    total = total + lc.pixel_weight * block_weighted_l1(torch.cat(preds), torch.cat(pls), torch.cat(maps))
    s_low = sample_low_scores(3, lc.preference.low_scores, gen)
    y_high = torch.cat([model(batch.x[i:i + 1], cap) for i in range(3)])
    y_low = torch.cat([model(batch.x[i:i + 1], s_low[i:i + 1]) for i in range(3)])
    # Eq. 8's anchor: each image's poorest real label, scored on the same crop as y_high
    q_min = torch.stack([min(_reward(batch.pl[i, j:j + 1])[0] for j in range(3) if batch.mask[i, j])
                         for i in range(3)])
    terms = preference_loss(_reward(y_high), _reward(y_low), q_min, lc.preference.beta,
                            lc.preference.margin)
    from qualiteacher.losses.preference import identity_loss

    total = total + lc.preference.weight_rank * terms["rank"] + lc.preference.weight_anchor * terms["anchor"]
    # Fidelity: y_high against each image's best (first) PL, with that PL's block weights.
    fidelity = block_weighted_l1(y_high, batch.pl[:, 0], batch.weights[:, 0])
    total = total + lc.preference.weight_fidelity * fidelity
    return total + lc.preference.weight_identity * identity_loss(model, initial)


@pytest.mark.parametrize("fidelity", [0.0, 0.7])
def test_shared_forward_step_equals_one_forward_per_condition(fidelity):
    cfg = load_config(None, [f"data.crop_size={CROP}", "loss.consistency.enabled=false",
                             "loss.preference.warmup_steps=0", f"loss.preference.weight_fidelity={fidelity}"])
    model = _model(cfg)
    initial = injection_snapshot(model)
    paired, batch = _Paired(), _bank_batch()
    ctx = StepContext(device=torch.device("cpu"), rng=np.random.default_rng(0), gen=torch.Generator().manual_seed(5),
                      reward=_reward, initial_injection=initial)
    shared = step_losses(cfg, model, paired, batch, ctx, step=3)
    assert {"pixel", "pref_rank", "pref_anchor", "pref_identity"} <= set(shared)
    assert ("pref_fidelity" in shared) == (fidelity > 0)
    reference_model = copy.deepcopy(model)
    reference = _reference(cfg, reference_model, paired, batch, torch.Generator().manual_seed(5), initial)
    torch.testing.assert_close(shared["total"], reference, rtol=1e-5, atol=1e-6)
    # The reward values ride along for the training log, detached (never a loss term).
    assert not shared["q_high"].requires_grad and not shared["q_low"].requires_grad
    with torch.no_grad():
        q_high = _reward(model(batch.x, cfg.model.score_cap)).mean()
    torch.testing.assert_close(shared["q_high"], q_high, rtol=1e-5, atol=1e-6)
    shared["total"].backward()
    reference.backward()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_slots_do_not_count():
    cfg = load_config(None, [f"data.crop_size={CROP}", "loss.preference.enabled=false",
                             "loss.consistency.enabled=false"])
    model = _model(cfg)
    batch = _bank_batch()
    out = step_losses(cfg, model, _Paired(), batch, _no_reward(), step=0)
    batch.pl[2, 1:] = 1e3  # garbage in the padding slots changes nothing
    again = step_losses(cfg, model, _Paired(), batch, _no_reward(), step=0)
    assert torch.equal(out["pixel"], again["pixel"])
    batch.pl[2, 0] = 1e3  # the one real slot of image 2 does count
    third = step_losses(cfg, model, _Paired(), batch, _no_reward(), step=0)
    assert third["pixel"] > 10 * out["pixel"]


class _PairedWithLevels(_Paired):
    levels = torch.tensor([2.5, 6.0])

    def sample_batch(self, n, crop, rng, with_levels=False):
        return (self.x, self.y, self.levels) if with_levels else (self.x, self.y)


@pytest.mark.parametrize("condition", ["cap", "target_score"])
def test_supervised_loss_runs_at_the_chosen_condition(condition):
    cfg = load_config(None, [f"data.crop_size={CROP}", f"loss.supervised_condition={condition}",
                             "loss.consistency.enabled=false"])
    model, paired = _model(cfg), _PairedWithLevels()
    out = step_losses(cfg, model, paired, None, _no_reward(), step=0)
    with torch.no_grad():
        at_levels = l1(model(paired.x, paired.levels), paired.y)
        at_cap = l1(model(paired.x, cfg.model.score_cap), paired.y)
    assert not torch.allclose(at_levels, at_cap)  # the conditions really differ here
    torch.testing.assert_close(out["supervised"].detach(), at_levels if condition == "target_score" else at_cap)


def test_target_levels_are_the_targets_ensemble_scores_merged_at_the_cap(weights_dir, caplog):
    from qualiteacher.data.samples import load_sample, sample_names
    from qualiteacher.imageio import to_tensor
    from qualiteacher.iqa.ensemble import IQAEnsemble
    from qualiteacher.student_step import target_levels

    cfg = load_config(None, [f"paths.weights_dir={weights_dir}", "iqa.device=cpu",
                             "iqa.metrics={brisque: 0.5, piqe: 0.5}", "model.score_cap=6.5"])
    photos = [load_sample(name)[:96, :96] for name in sample_names()[:3]]
    flat = np.full((96, 96, 3), 128, np.uint8)  # BRISQUE is undefined on a flat image
    levels = target_levels(cfg, [*photos, flat])
    ensemble = IQAEnsemble.from_config(cfg)
    expected = [min(float(ensemble.score(to_tensor(p)).ensemble10[0]), 6.5) for p in photos]
    assert levels[:3].tolist() == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1  # different photos, different conditions
    assert levels[3] == 6.5 and "cannot be scored" in caplog.text


@pytest.mark.parametrize("scale", [1.0, 0.1, 0.0])
def test_student_optimizer_moves_the_backbone_at_its_share_of_the_rate(scale):
    """Adam's first step moves every weight with a gradient by about its group's rate, so
    the backbone's largest move is `scale` times the injection layers'."""
    cfg = load_config(None, [f"data.crop_size={CROP}", "loss.consistency.enabled=false",
                             f"train.backbone_lr_scale={scale}", "train.lr=1e-3"])
    model = _model(cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = student_optimizer(cfg, model)
    step_losses(cfg, model, _Paired(), _bank_batch(), _no_reward(), step=0)["total"].backward()
    opt.step()
    injection = set(dict(injection_parameters(model)).keys())
    moves = {k: float((p.detach() - before[k]).abs().max()) for k, p in model.named_parameters()}
    inj_move = max(v for k, v in moves.items() if any(k.endswith(n) for n in injection))
    backbone_move = max(v for k, v in moves.items() if not any(k.endswith(n) for n in injection))
    assert inj_move == pytest.approx(1e-3, rel=0.05)
    assert backbone_move == pytest.approx(scale * 1e-3, rel=0.05, abs=1e-9)


def test_backbone_scale_needs_a_score_condition_and_the_baseline_trains_everything():
    with pytest.raises(ValueError, match="train.backbone_lr_scale=0.1 needs model.score_condition"):
        load_config(None, ["train.backbone_lr_scale=0.1", "model.score_condition=false"])
    with pytest.raises(ValueError, match="train.backbone_warmup_steps=5 needs model.score_condition"):
        load_config(None, ["train.backbone_warmup_steps=5", "model.score_condition=false"])
    cfg = load_config(None, ["train.backbone_lr_scale=0.1"])
    assert cfg.as_baseline().train.backbone_lr_scale == 1.0
    assert cfg.model_copy(update={"train": cfg.train.model_copy(update={"backbone_warmup_steps": 5})}
                          ).as_baseline().train.backbone_warmup_steps == 0
    model = build_model(cfg.as_baseline().model)
    groups = student_optimizer(cfg.as_baseline(), model).param_groups
    assert [g["lr"] for g in groups] == [cfg.train.lr]


def test_backbone_learns_only_after_its_warmup():
    cfg = load_config(None, [f"data.crop_size={CROP}", "loss.consistency.enabled=false",
                             "train.backbone_warmup_steps=2"])
    model = _model(cfg)
    injection = set(injection_parameters(model))
    opt = student_optimizer(cfg, model)

    def step(n):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt.zero_grad()
        step_losses(cfg, model, _Paired(), _bank_batch(), _no_reward(), step=n)["total"].backward()
        set_learning_rates(cfg, opt, n)
        opt.step()
        moved = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
        return moved & injection, moved - injection

    for n in (0, 1):
        inj_moved, backbone_moved = step(n)
        assert inj_moved == injection and not backbone_moved, n
    inj_moved, backbone_moved = step(2)
    assert inj_moved == injection and backbone_moved
