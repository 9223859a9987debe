"""Pixel losses: plain L1 and the block-weighted L1 to a bank pseudo-label."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def l1(pred: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(pred, target)


def block_weighted_l1(
    pred: Tensor, target: Tensor, weight_map: Tensor | None = None
) -> Tensor:
    """mean(w * |pred - target|), w [N,1,H,W] broadcast over channels.

    The mean is over all elements, NOT divided by the sum of weights: the absolute level
    of a weight map matters, so a pseudo-label whose blocks all score poorly pulls the
    student less than one whose blocks score well. A zero-weight region contributes
    nothing. `weight_map=None` is plain L1.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ"
        )
    diff = (pred - target).abs()
    if weight_map is None:
        return diff.mean()
    n, _, h, w = pred.shape
    if weight_map.shape != (n, 1, h, w):
        raise ValueError(
            f"weight_map must have shape {(n, 1, h, w)}, got {tuple(weight_map.shape)}"
        )
    return (diff * weight_map.to(diff.dtype)).mean()
