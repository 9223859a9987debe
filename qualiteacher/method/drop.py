"""Dual drop: discard an image's whole PL set when its scores are not trustworthy.

Input is the normalised score tensor of a batch, shape (N images, K pseudo-labels,
M metrics), each entry in [0, 1].

- Drop 1 (Eq. 2, metric disagreement): for some PL, the variance of its normalised scores
  across metrics exceeds tau_multi.
- Drop 2 (augmentation instability): for some metric, the spread (max - min) of its
  normalised score across the K PLs exceeds tau_aug.

The reference code set both thresholds to 1.0, which can never trigger; here thresholds
come from config, and `calibrate_thresholds` derives them from observed statistics.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

KEPT = "kept"
METRIC_DISAGREEMENT = "metric_disagreement"
AUGMENTATION_INSTABILITY = "augmentation_instability"
NON_FINITE = "non_finite"


def _check_shape(normalized: torch.Tensor) -> None:
    if normalized.dim() != 3:
        raise ValueError(f"expected normalised scores of shape (N, K, M), got {tuple(normalized.shape)}")


def drop_statistics(normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (worst across-metric variance over PLs, worst across-PL spread over metrics)."""
    _check_shape(normalized)
    multi = normalized.var(dim=2, unbiased=False).amax(dim=1)
    spread = (normalized.amax(dim=1) - normalized.amin(dim=1)).amax(dim=1)
    return multi, spread


@dataclass
class DropDecision:
    keep: torch.Tensor  # (N,) bool
    reasons: list[str]  # per image: kept, or the first reason it was dropped
    multi_stat: torch.Tensor  # (N,) worst variance across metrics
    aug_stat: torch.Tensor  # (N,) worst spread across augmentations

    def counts(self) -> dict[str, int]:
        return drop_counts(self.reasons)


def drop_counts(reasons: list[str]) -> dict[str, int]:
    """Reason -> number of sets dropped for it (kept sets not counted)."""
    return dict(Counter(r for r in reasons if r != KEPT))


def dual_drop(normalized: torch.Tensor, tau_multi: float, tau_aug: float, enabled: bool = True) -> DropDecision:
    """Decide, per image, whether its PL set survives both drops.

    Non-finite scores are always dropped (a NaN would otherwise compare False and pass).
    With `enabled=False` (ablation) only non-finite sets are dropped.
    """
    multi, spread = drop_statistics(normalized)
    finite = torch.isfinite(normalized).flatten(1).all(dim=1)
    reasons = []
    for i in range(normalized.shape[0]):
        if not finite[i]:
            reasons.append(NON_FINITE)
        elif enabled and multi[i] > tau_multi:
            reasons.append(METRIC_DISAGREEMENT)
        elif enabled and spread[i] > tau_aug:
            reasons.append(AUGMENTATION_INSTABILITY)
        else:
            reasons.append(KEPT)
    keep = torch.tensor([r == KEPT for r in reasons], dtype=torch.bool)
    return DropDecision(keep, reasons, multi, spread)


def calibrate_thresholds(normalized: torch.Tensor, keep_fraction: float) -> tuple[float, float]:
    """Thresholds that keep the most consistent `keep_fraction` of sets on each criterion.

    Each threshold is the keep_fraction-quantile of its statistic over the observed sets,
    so together the two drops keep about keep_fraction**2 of independent sets, and at least
    the worst (1 - keep_fraction) on each criterion are dropped.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    multi, spread = drop_statistics(normalized)
    finite = torch.isfinite(multi) & torch.isfinite(spread)
    if not finite.any():
        raise ValueError("no finite score sets to calibrate on")
    q = torch.tensor(keep_fraction, dtype=torch.float64)
    tau_multi = torch.quantile(multi[finite].double(), q, interpolation="lower").item()
    tau_aug = torch.quantile(spread[finite].double(), q, interpolation="lower").item()
    return tau_multi, tau_aug
