"""Pseudo-label judgement: the one home of what a set of labels is worth.

For N images with K labels each (float (N, K, 3, H, W) in [0, 1]), `judge` gives a
`Verdict`: each label's ensemble score (its level, 0-10), per-metric scores, whether the
image's set survives the dual drop (`qualiteacher.method.drop`) and why not, its best
label, the block weights of the kept sets' labels and the reward-scale quality of each
set's poorest label (q_min). `best_label_ladders` gives the condition ladder's rungs
(`qualiteacher.method.ladder`) of the best labels their levels by construction,
`ladder_levels` scores them (`labelling.ladder_levels`).

Two users, one rule: the scorer actor (`services/scorer.py`) decodes bytes, calls these
and stores what they decide; the in-process reference loop (`experiments/reference_loop.py`)
calls the same functions. Neither needs Ray nor Redis here.

Calls are batched as the scorer has always made them: one score call for all N*K labels,
one block-weights call for the kept sets, one score call for all rungs. The metrics'
results depend slightly on batch composition (chunking by `iqa.max_batch_pixels`), so the
batches are part of the rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from qualiteacher.method.drop import NON_FINITE, drop_counts, dual_drop
from qualiteacher.method.ladder import constructed_levels, ladder_rungs


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Verdict:
    """The judgement of N images' label sets of K labels each, M metrics."""

    names: tuple[str, ...]  # the metrics, in the order of `normalized`'s last axis
    levels: torch.Tensor  # (N, K) ensemble score on 0-10 (uncapped)
    raw: dict[str, torch.Tensor]  # metric -> (N, K) raw score
    normalized: torch.Tensor  # (N, K, M) in [0, 1], higher is better
    keep: torch.Tensor  # (N,) bool: the set survives the drops
    reasons: tuple[str, ...]  # per image: "kept", or the reason its set was dropped
    best: torch.Tensor  # (N,) index of each image's best label (highest level)
    weights: dict[int, torch.Tensor]  # kept image -> (K, grid, grid) block weights of its labels
    q_min: torch.Tensor  # (N,) reward-scale quality of each set's poorest label

    @property
    def kept(self) -> list[int]:
        return [i for i, kept in enumerate(self.keep.tolist()) if kept]

    def drop_counts(self) -> dict[str, int]:
        """Reason -> number of sets dropped for it."""
        return drop_counts(self.reasons)

    def raw_scores(self, i: int, j: int) -> dict[str, float]:
        return {m: float(self.raw[m][i, j]) for m in self.names}

    def normalized_scores(self, i: int, j: int) -> dict[str, float]:
        return {m: float(v) for m, v in zip(self.names, self.normalized[i, j].tolist())}


class Decision(NamedTuple):
    keep: torch.Tensor  # (N,) bool
    reasons: tuple[str, ...]
    best: torch.Tensor  # (N,)


def decide(levels: torch.Tensor, normalized: torch.Tensor, drop, finite=None) -> Decision:
    """Which sets survive and each set's best label, from scores already made.

    `drop`: the `drop` config section (`enabled`, `tau_multi`, `tau_aug`). `finite`: (N,)
    bools, False where the teacher's output had NaN or inf before it became a uint8 label;
    such a set is dropped as non_finite, whatever its (clipped) label scores.
    """
    decision = dual_drop(normalized, drop.tau_multi, drop.tau_aug, enabled=drop.enabled)
    if finite is None:
        keep, reasons = decision.keep, tuple(decision.reasons)
    else:
        finite = torch.as_tensor(np.asarray(finite, dtype=bool))
        keep = decision.keep & finite
        reasons = tuple(r if f else NON_FINITE for r, f in zip(decision.reasons, finite.tolist()))
    return Decision(keep, reasons, levels.argmax(dim=1))


def judge(ensemble, labels: torch.Tensor, cfg, finite=None) -> Verdict:
    """Judge N sets of K labels (N, K, 3, H, W) in [0, 1] with `ensemble` (an `IQAEnsemble`)
    under `cfg` (a `Config`: its `drop` and `iqa` block settings). See `decide` for `finite`."""
    n, k = labels.shape[:2]
    flat = labels.flatten(0, 1)
    # One call per metric; a label a metric cannot score (a flat frame) gets NaN there
    # (`IQAEnsemble._call`) and the dual drop drops its set as non_finite.
    scores = ensemble.score(flat)
    names = tuple(ensemble.names)
    normalized = torch.stack([scores.normalized[m] for m in names], dim=-1).reshape(n, k, len(names))
    levels = scores.ensemble10.reshape(n, k)
    decision = decide(levels, normalized, cfg.drop, finite)
    q_min = teacher_q_min(ensemble, scores.raw, n, k)
    kept = [i for i in range(n) if decision.keep[i]]
    weights = kept_block_weights(ensemble, flat, kept, k, cfg.iqa.block_grid, cfg.iqa.min_block_weight)
    return Verdict(names, levels, {m: scores.raw[m].reshape(n, k) for m in names}, normalized,
                   decision.keep, decision.reasons, decision.best, weights, q_min)


def teacher_q_min(ensemble, raw: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    """Per set, the reward-scale quality of its poorest label (the anchor of the L2 term)."""
    try:
        quality = ensemble.quality_from_raw(raw).reshape(n, k)
    except ValueError:  # no differentiable metric: the preference loss is not usable anyway
        return torch.zeros(n)
    return quality.amin(dim=1)


def kept_block_weights(ensemble, flat: torch.Tensor, kept: list[int], k: int, grid: int,
                       floor: float) -> dict[int, torch.Tensor]:
    """Kept image -> (K, grid, grid) block weights of its labels; one batched call for all
    (a dropped set's weights would never be stored, so its blocks are not scored)."""
    if not kept:
        return {}
    rows = [i * k + j for i in kept for j in range(k)]
    weights = ensemble.block_weights(flat[rows], grid, floor)
    return dict(zip(kept, weights.reshape(len(kept), k, *weights.shape[1:])))


def best_label_ladders(verdict: Verdict, alphas: Sequence[float], cap: float,
                       rows: Sequence[int]) -> dict[int, dict[float, float]]:
    """Row -> blend weight -> level of the rungs of that set's best label, by construction
    (`labelling.ladder_levels: constructed`): no scoring, so no input is needed here."""
    return {i: constructed_levels(alphas, float(verdict.levels[i, verdict.best[i]]), cap) for i in rows}


def ladder_levels(ensemble, inputs: torch.Tensor, best_labels: torch.Tensor,
                  alphas: Sequence[float]) -> torch.Tensor:
    """(N, A) levels of the rungs of N best labels (N, 3, H, W) blended with their inputs
    (same shape), all N*A rungs in one score call; NaN where the metrics cannot score one."""
    rungs = ladder_rungs(inputs, best_labels, alphas)
    return ensemble.score(rungs.flatten(0, 1)).ensemble10.reshape(len(inputs), len(alphas))


def scored_rungs(alphas: Sequence[float], levels: torch.Tensor) -> dict[float, float]:
    """Blend weight -> level of one label's rungs (a row of `ladder_levels`); a rung without
    a finite level is left out, since a NaN condition would poison the student's step."""
    return {float(a): float(v) for a, v in zip(alphas, levels.tolist()) if np.isfinite(v)}
