"""One student step's losses (Eqs. 3-9) on a paired batch and a bank batch; no Ray needed.

`qualiteacher.services.student` runs this inside the Ray Train worker, `experiments/reference_loop.py` in
one process; the tests and the GPU checks run it directly. What a run's steps share (reward,
random generators, device, L3's anchor, perceptual loss) is one `StepContext`; the step number
is the one argument that changes. A bank sample is an image with all its PLs on one crop; one
shared forward restores it at every PL's level and at the two scores of Eq. 8
(`restore_conditions`: the encoder runs once per image).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from qualiteacher.config import Config
from qualiteacher.data.paired import PairedImages
from qualiteacher.losses.consistency import cropped_consistency_loss
from qualiteacher.losses.pixel import block_weighted_l1, l1
from qualiteacher.losses.preference import RewardFn, preference_terms, sample_low_scores
from qualiteacher.method.bank_batch import BankBatch
from qualiteacher.models.injection import injection_parameters, restore_conditions, unwrap

log = logging.getLogger(__name__)

PerceptualFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepContext:
    """What every step of one run shares, made once where the run starts (the Ray Train
    worker, the reference loop, a test). The generators are drawn from in place, so one
    context carries the run's random stream from step to step."""

    device: torch.device
    rng: np.random.Generator  # the paired batch's draws
    gen: torch.Generator  # Eq. 8's low scores, Eq. 9's crop box
    # The differentiable reward of Eqs. 8-9 (`reward_fn`); None: the run has no such term.
    reward: RewardFn | None = None
    # The injection layers' weights at the start (`injection_snapshot`): L3's anchor; None
    # without a score condition.
    initial_injection: dict[str, Tensor] | None = None
    perceptual: PerceptualFn | None = None  # `perceptual_fn`; None where its weight is 0


def student_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Adam:
    """Adam over the student at `train.lr`; with `train.backbone_lr_scale` below 1 or a
    `train.backbone_warmup_steps`, two groups: the injection layers at `train.lr`, the backbone
    at `backbone_lr` (one group otherwise, as the checkpoints of earlier versions hold).

    Why the switches: on low light the student's backbone learnt to restore less at every
    condition (most of a bank batch asks for less than the teacher gives: the ladder's rungs,
    the lower labels) and its injection at 7 made up for it only in part. Measured, a slower
    backbone helps low light by up to 0.1 dB and costs underwater 0.2-0.3 dB, where the
    backbone's own learning beats the teacher, so both are off by default
    (experiments/QUALITY.md, "Low light: the backbone restores less").
    """
    model = unwrap(model)
    if cfg.train.backbone_lr_scale == 1.0 and cfg.train.backbone_warmup_steps == 0:
        return torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    injection_ids = {id(p) for p in injection_parameters(model).values()}
    injection = [p for p in model.parameters() if id(p) in injection_ids]
    backbone = [p for p in model.parameters() if id(p) not in injection_ids]
    return torch.optim.Adam([{"params": injection, "lr": cfg.train.lr},
                             {"params": backbone, "lr": backbone_lr(cfg, step=0)}])


def backbone_lr(cfg: Config, step: int) -> float:
    """The backbone's learning rate at `step`: 0 for the first `train.backbone_warmup_steps`
    (only the injection layers learn, so the condition can separate the targets before the
    backbone sees them), then `train.lr * train.backbone_lr_scale`."""
    return 0.0 if step < cfg.train.backbone_warmup_steps else cfg.train.lr * cfg.train.backbone_lr_scale


def set_learning_rates(cfg: Config, opt: torch.optim.Optimizer, step: int) -> None:
    """Set the rates of a `student_optimizer` for `step`: a function of the step alone, so a
    resumed run needs no scheduler state."""
    if len(opt.param_groups) == 2:
        opt.param_groups[1]["lr"] = backbone_lr(cfg, step)


def average_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Average gradients over ranks with one flat all-reduce (missing grads count as 0)."""
    if world_size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def gradients_finite(model: torch.nn.Module) -> bool:
    """False if any gradient holds NaN or Inf: such an update never reaches the weights."""
    return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def reward_fn(cfg: Config) -> RewardFn | None:
    """The differentiable IQA reward of Eqs. 8-9, or None where no term of this run uses it."""
    needs = cfg.train.mode == "qualiteacher" and (cfg.loss.preference.enabled or cfg.loss.consistency.enabled)
    if not needs:
        return None
    from qualiteacher.iqa.ensemble import IQAEnsemble

    ensemble = IQAEnsemble.from_config(cfg)
    log.info("differentiable reward uses %s", ensemble.reward_weights)
    return ensemble.reward


def target_levels(cfg: Config, targets) -> torch.Tensor:
    """The condition of each paired target for ``loss.supervised_condition=target_score``:
    its ensemble score (0-10) on the run's scale (``cfg.iqa.ranges``, the calibrated ones in a
    calibrated run), merged at the cap as the bank's levels are. A target the metrics cannot
    score gets the cap, with a warning."""
    from qualiteacher.imageio import to_tensor
    from qualiteacher.iqa.ensemble import IQAEnsemble

    ensemble = IQAEnsemble.from_config(cfg)
    cap = cfg.model.score_cap
    levels = []
    with torch.no_grad():
        for i, target in enumerate(targets):
            try:
                level = float(ensemble.score(to_tensor(target).to(ensemble.device)).ensemble10[0])
            except (torch.linalg.LinAlgError, AssertionError, ValueError) as exc:
                level, why = float("nan"), f"{type(exc).__name__}: {exc}"
            else:
                why = "non-finite score"
            if not math.isfinite(level):
                log.warning("paired target %d: cannot be scored (%s); its supervised condition is %g", i, why, cap)
                level = cap
            levels.append(min(level, cap))
    return torch.tensor(levels)


def perceptual_fn(cfg: Config, device: torch.device) -> PerceptualFn | None:
    """The VGG perceptual loss on ``device``, or None where its weight is 0."""
    if cfg.loss.perceptual_weight <= 0:
        return None
    from qualiteacher.losses.perceptual import VGGPerceptualLoss

    return VGGPerceptualLoss(cfg.paths.resolved_weights_dir()).to(device).eval()


def step_losses(cfg: Config, model: nn.Module, paired: PairedImages, batch: BankBatch | None,
                ctx: StepContext, *, step: int) -> dict[str, Tensor]:
    """Every loss of step `step` (name -> tensor, with "total"): supervised on a paired batch,
    then on the bank batch the block-weighted pixel loss, perceptual, and after the warm-up
    Eqs. 8-9 (with the reward's batch means "q_high" and "q_low", detached, for the log).
    Without a bank batch (no entries yet), the supervised loss alone."""
    tc, lc = cfg.train, cfg.loss
    if lc.supervised_condition == "target_score" and cfg.model.score_condition:
        x_p, y_p, s_p = paired.sample_batch(tc.batch_size, cfg.data.crop_size, ctx.rng, with_levels=True)
        s_p = s_p.to(ctx.device)
    else:
        x_p, y_p = paired.sample_batch(tc.batch_size, cfg.data.crop_size, ctx.rng)
        s_p = cfg.model.score_cap
    x_p, y_p = x_p.to(ctx.device), y_p.to(ctx.device)
    out = {"supervised": l1(model(x_p, s_p), y_p)}
    total = lc.supervised_weight * out["supervised"]
    if batch is None:
        out["total"] = total
        return out
    methods = ctx.reward is not None and step >= lc.preference.warmup_steps
    preference = methods and lc.preference.enabled and cfg.model.score_condition
    # One shared forward: each image at every PL's level, and for Eq. 8 also at 7 and s_low.
    k = batch.labels_per_image
    conditions = [batch.level]
    s_low = None
    if preference:
        s_low = sample_low_scores(batch.x.shape[0], lc.preference.low_scores, ctx.gen).to(ctx.device)
        conditions += [torch.full_like(s_low, cfg.model.score_cap)[:, None], s_low[:, None]]
    y = restore_conditions(model, batch.x, torch.cat(conditions, dim=1))
    mask = batch.mask
    pred, pl = y[:, :k][mask], batch.pl[mask]
    out["pixel"] = block_weighted_l1(pred, pl, batch.weights[mask])
    total = total + lc.pixel_weight * out["pixel"]
    if ctx.perceptual is not None:
        out["perceptual"] = ctx.perceptual(pred, pl)
        total = total + lc.perceptual_weight * out["perceptual"]
    if methods:
        y_pair = (y[:, k], y[:, k + 1], s_low) if preference else None
        try:
            total = total + method_losses(cfg, model, batch, ctx, out, y_pair)
        except (torch.linalg.LinAlgError, AssertionError) as exc:
            # pyiqa's NIQE / BRISQUE are undefined on a flat (zero-variance) image: NIQE's
            # pinv gets NaN, BRISQUE asserts. Raising here would kill the worker, and the
            # restart would replay the same batch until max_failures: skip these terms once.
            log.warning("step %d: reward undefined on this bank batch (%s: %s); preference and "
                        "consistency losses skipped for this step", step, type(exc).__name__,
                        str(exc).splitlines()[0][:120])
    out["total"] = total
    return out


def poorest_label_quality(batch: BankBatch, reward: RewardFn) -> Tensor:
    """Per image, the reward of its poorest label (ladder rungs left out) on the batch's own
    crop: q_min of Eq. 8's anchor (L2). Scored here, on the crop that Q(y_high) sees,
    because the metrics depend on image size (BRISQUE moves by ~17 points between a 128 px
    label and its 96 px crop)."""
    with torch.no_grad():
        q = reward(batch.pl[batch.label_mask])
    per_slot = torch.full(batch.mask.shape, float("inf"), device=q.device)
    per_slot[batch.label_mask] = q
    return per_slot.amin(dim=1)


def method_losses(cfg: Config, model: nn.Module, batch: BankBatch, ctx: StepContext, out: dict[str, Tensor],
                  y_pair: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """Eq. 8 (from the shared forward's y_high, y_low, s_low; None: no Eq. 8) and Eq. 9,
    their terms added to `out`. Needs `ctx.reward`."""
    lc = cfg.loss
    total = torch.zeros((), device=batch.x.device)
    y_high = None
    if y_pair is not None:
        y_high, y_low, s_low = y_pair
        pref, outputs = preference_terms(y_high, y_low, s_low, ctx.reward, poorest_label_quality(batch, ctx.reward),
                                         lc.preference, model, ctx.initial_injection)
        out.update({f"pref_{k}": v for k, v in pref.items() if k != "total"})
        # The reward values themselves, for the training log (detached: not loss terms).
        out.update({k: outputs[k].detach().mean() for k in ("q_high", "q_low")})
        total = total + pref["total"]
        if lc.preference.weight_fidelity > 0:  # entries are best first: column 0 is the best PL
            out["pref_fidelity"] = block_weighted_l1(y_high, batch.pl[:, 0], batch.weights[:, 0])
            total = total + lc.preference.weight_fidelity * out["pref_fidelity"]
    if lc.consistency.enabled:
        out["consistency"] = cropped_consistency_loss(model, batch.x, ctx.reward, lc.consistency.crop_area,
                                                      generator=ctx.gen, score=cfg.model.score_cap,
                                                      full_output=y_high,
                                                      min_side=cfg.iqa.reward_min_size() or 1)
        total = total + lc.consistency.weight * out["consistency"]
    return total
