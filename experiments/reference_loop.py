"""QualiTeacher's loop in one process, for experiments: label -> score -> drop -> gate ->
student step -> EMA -> relabel, with the scorer and the reward swappable for an oracle.

The distributed pipeline (`pipelines/train.py`) runs the same core pieces on Ray actors and
a Redis bank, concurrently. Here they run in turn, synchronously and deterministically for
a seed, which is what an experiment that compares settings needs: the multi-aug labels
(`multi_aug_pseudo_labels`), the scorer actor's judgement (`method.judge`: levels, dual
drop, best label, block weights; the oracle judge shares its `decide`), the gate
(`method.gating.gate`), the student's batch (`assemble_bank_batch`) and step
(`step_losses`), and the EMA teacher.
Every `train.push_every` steps the teacher is the EMA and every image is labelled again.

With `labelling.ladder` the best label of each kept set carries its condition ladder
(`qualiteacher.method.ladder`), scored by the same judge (`method.judge.ladder_levels` for
the NR ensemble), as the scorer actor does it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from experiments.oracle_scorer import METRIC, OracleReward, OracleScale, OracleScorer, level_of, psnr
from qualiteacher.config import Config
from qualiteacher.data.paired import PairedImages
from qualiteacher.method.augment import multi_aug_pseudo_labels
from qualiteacher.method.bank_batch import BankLabel, assemble_bank_batch
from qualiteacher.method.ema import EMA
from qualiteacher.method.gating import Scored, gate
from qualiteacher.method.judge import Verdict, best_label_ladders, decide, judge, ladder_levels, scored_rungs
from qualiteacher.method.ladder import ladder_rungs
from qualiteacher.models.injection import injection_snapshot
from qualiteacher.student_step import StepContext, gradients_finite, set_learning_rates, step_losses, student_optimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry(Scored):
    """A label in the in-memory bank (`score` is its level: the gate ranks by it)."""

    label: BankLabel = field(compare=False)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] in [0, 1] -> [..., H, W, 3] uint8, as labels are stored."""
    return (images.clamp(0, 1) * 255).round().byte().movedim(-3, -1).numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float() / 255.0


class NRJudge:
    """The NR ensemble, judging as the scorer actor does (`qualiteacher.method.judge`)."""

    def __init__(self, ensemble, cfg: Config):
        self.ensemble, self.cfg = ensemble, cfg

    def __call__(self, labels: torch.Tensor, gt: torch.Tensor | None) -> Verdict:
        return judge(self.ensemble, labels, self.cfg)

    def ladder(self, x: torch.Tensor, best: torch.Tensor, alphas, gt: torch.Tensor | None) -> torch.Tensor:
        return ladder_levels(self.ensemble, x, best, alphas)


class OracleJudge:
    """The oracle (`experiments.oracle_scorer`) in the NR ensemble's place: its levels and
    block weights, the same drop and best-label rule (`qualiteacher.method.judge.decide`)."""

    def __init__(self, scorer: OracleScorer, cfg: Config):
        self.scorer, self.cfg = scorer, cfg

    def normalized(self, labels: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """(N, K, 1) unit scores of N sets of K labels against their images' ground truth."""
        n, k = labels.shape[:2]
        return self.scorer.normalized(labels.flatten(0, 1), gt.repeat_interleave(k, 0)).reshape(n, k, 1)

    def __call__(self, labels: torch.Tensor, gt: torch.Tensor) -> Verdict:
        n, k = labels.shape[:2]
        unit = self.normalized(labels, gt)
        levels = level_of(unit[..., 0])
        decision = decide(levels, unit, self.cfg.drop)
        # Every label's blocks, then the kept ones': PSNR is cheap, and this keeps the
        # batches (and so the numbers) of the oracle runs made before the core judge.
        weights = self.scorer.block_weights(labels.flatten(0, 1), gt.repeat_interleave(k, 0))
        weights = weights.reshape(n, k, *weights.shape[1:])
        kept = [i for i in range(n) if decision.keep[i]]
        # The oracle has no reward-scale q_min (the loop does not use it): 0, as the
        # scorer's fallback without a differentiable metric.
        return Verdict((METRIC,), levels, {METRIC: unit[..., 0]}, unit, decision.keep, decision.reasons,
                       decision.best, {i: weights[i] for i in kept}, torch.zeros(n))

    def ladder(self, x: torch.Tensor, best: torch.Tensor, alphas, gt: torch.Tensor) -> torch.Tensor:
        return level_of(self.normalized(ladder_rungs(x, best, alphas), gt)[..., 0])


def fit_oracle_scale(teacher, inputs: torch.Tensor, gt: torch.Tensor, augmentations) -> OracleScale:
    """The oracle's dB scale from the stage-1 teacher's labels of the training inputs."""
    labels = multi_aug_pseudo_labels(teacher, inputs, augmentations).clamp(0, 1)
    k = labels.shape[1]
    return OracleScale.fit(psnr(inputs, gt).numpy(), psnr(labels.flatten(0, 1), gt.repeat_interleave(k, 0)).numpy())


@dataclass
class LoopStats:
    versions: int = 0
    labelled: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    admitted: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"label": 0.0, "step": 0.0})
    last_losses: dict[str, float] = field(default_factory=dict)


class ReferenceLoop:
    """One student run. `judge` scores labels; `reward` is None, the NR reward or an
    `OracleReward`; `hidden_gt` [N, 3, H, W] is the unpaired inputs' ground truth, used only
    by oracle judges and rewards. With `loss.supervised_condition=target_score` the caller
    sets `paired.levels`."""

    def __init__(self, cfg: Config, model: torch.nn.Module, paired: PairedImages, inputs: torch.Tensor,
                 hidden_gt: torch.Tensor | None, judge, reward=None):
        self.cfg, self.model, self.paired, self.inputs, self.gt = cfg, model, paired, inputs, hidden_gt
        self.judge, self.reward = judge, reward
        self.ids = [f"img{i:04d}" for i in range(inputs.shape[0])]
        self.bank: dict[str, list[Entry]] = {}
        self.seen: dict[str, set[str]] = {}
        self.stats = LoopStats()

    # ---------------------------------------------------------------- labelling
    @torch.no_grad()
    def label_all(self, teacher: torch.nn.Module, version: int) -> None:
        t0 = time.perf_counter()
        augs = tuple(self.cfg.labelling.augmentations)
        for start in range(0, len(self.ids), self.cfg.labelling.batch_size * 4):
            rows = slice(start, start + self.cfg.labelling.batch_size * 4)
            x = self.inputs[rows]
            gt = None if self.gt is None else self.gt[rows]
            labels = multi_aug_pseudo_labels(teacher, x, augs).clamp(0, 1)
            verdict = self.judge(labels, gt)
            for reason, count in verdict.drop_counts().items():
                self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + count
            ladders = self._ladders(x, labels, verdict, gt)
            ids = self.ids[rows]
            for i in verdict.kept:
                self._gate(ids[i], version, augs, labels[i], verdict, i, ladders[i])
        self.stats.versions += 1
        self.stats.labelled += len(self.ids)
        self.stats.seconds["label"] += time.perf_counter() - t0

    def _gate(self, image_id: str, version: int, augs, labels: torch.Tensor, verdict: Verdict, i: int,
              ladder: tuple) -> None:
        images = to_uint8(labels)
        best = int(verdict.best[i])
        candidates = [Entry(f"{image_id}.v{version}.{aug}", float(verdict.levels[i, j]),
                            BankLabel(images[j], verdict.weights[i][j].numpy(), float(verdict.levels[i, j]),
                                      ladder if j == best else ()))
                      for j, aug in enumerate(augs)]
        seen = self.seen.setdefault(image_id, set())
        kept, _ = gate(self.bank.get(image_id, []), candidates, self.cfg.gating.top_k, seen)
        seen.update(c.label_id for c in candidates)
        self.stats.admitted += len({e.label_id for e in kept} - {e.label_id for e in self.bank.get(image_id, [])})
        self.bank[image_id] = kept

    def _ladders(self, x, labels, verdict: Verdict, gt) -> list[tuple]:
        """Per image, (blend, level) of the rungs of its best label of this round, as the
        scorer makes them (by construction, or scored by the same judge with unscorable rungs
        left out: `labelling.ladder_levels`). Scored, every image's rungs are scored, not only
        the kept sets': the metrics' numbers depend slightly on the batch, and this is the
        batch the loop's results were made with."""
        alphas = tuple(self.cfg.labelling.ladder)
        if not alphas:
            return [()] * x.shape[0]
        if self.cfg.labelling.ladder_levels == "constructed":
            rows = range(x.shape[0])
            ladders = best_label_ladders(verdict, alphas, self.cfg.model.score_cap, rows)
            return [tuple(ladders[i].items()) for i in rows]
        best = labels[torch.arange(labels.shape[0]), verdict.best]
        levels = self.judge.ladder(x, best, alphas, gt)
        return [tuple(scored_rungs(alphas, row).items()) for row in levels]

    # ---------------------------------------------------------------- training
    def bank_batch(self, rng: np.random.Generator):
        ready = [i for i, image_id in enumerate(self.ids) if self.bank.get(image_id)]
        if not ready:
            return None, None
        picks = rng.choice(ready, size=min(self.cfg.train.bank_batch_size, len(ready)), replace=False)
        labels = [[e.label for e in self.bank[self.ids[i]]] for i in picks]
        images = [to_uint8(self.inputs[i]) for i in picks]
        batch = assemble_bank_batch(images, labels, self.cfg.data.crop_size, self.cfg.model.score_cap, rng)
        if self.gt is None:
            return batch, None
        gt = torch.stack([self.gt[i][:, top:top + c, left:left + c] for i, (top, left, c) in zip(picks, batch.boxes)])
        return batch, gt

    def run(self, seed: int) -> LoopStats:
        cfg, model = self.cfg, self.model
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        ctx = StepContext(device=torch.device("cpu"), rng=rng, gen=torch.Generator().manual_seed(seed),
                          reward=self.reward,
                          initial_injection=injection_snapshot(model) if cfg.model.score_condition else None)
        opt = student_optimizer(cfg, model)
        ema = self.ema = EMA(model, cfg.ema.decay)
        for step in range(cfg.train.steps):
            if step % cfg.train.push_every == 0:
                self.label_all(ema.teacher, step // cfg.train.push_every)
                if step % (10 * cfg.train.push_every) == 0:
                    levels = [e.score for entries in self.bank.values() for e in entries]
                    log.info("step %d/%d: bank %d labels, mean level %.2f, losses %s", step, cfg.train.steps,
                             len(levels), float(np.mean(levels)) if levels else float("nan"),
                             {k: round(v, 4) for k, v in self.stats.last_losses.items()})
            t0 = time.perf_counter()
            model.train()
            batch, gt = self.bank_batch(rng)
            if isinstance(self.reward, OracleReward) and batch is not None:
                self.reward.bind(gt, batch.label_mask)
            losses = step_losses(cfg, model, self.paired, batch, ctx, step=step)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            if gradients_finite(model):
                set_learning_rates(cfg, opt, step)
                opt.step()
                ema.update(model)
            self.stats.last_losses = {k: float(v.detach()) for k, v in losses.items()}
            self.stats.seconds["step"] += time.perf_counter() - t0
        model.eval()
        return self.stats
