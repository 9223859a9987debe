"""An oracle scorer for experiments: full-reference quality against hidden ground truth.

It answers "is the framework at fault, or the NR metrics?": standing where the NR ensemble
stands (levels, dual drop, gating, block weights) and, optionally, as the differentiable
reward of Eqs. 8-9, it scores what the method is meant to track. It lives with the
benchmarks, takes ground truth that only an experiment has, and no config can name it.

The scale: PSNR in dB mapped linearly to 0-10, with 0 at the degraded inputs (their 2nd
percentile) and 10 at the teacher's best labels (98th percentile) plus half the teacher's
gain over the inputs again. So the teacher's labels spread over about 0-6.7, and a label
better than the teacher's best reaches 7, where conditions merge and inference runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qualiteacher.iqa.ensemble import soft_unit

# What the framework reads from a scorer's normalised scores: one "metric" here.
METRIC = "oracle_psnr"


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per image PSNR (dB) of [N, 3, H, W] tensors in [0, 1]; differentiable."""
    mse = (pred - gt).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


@dataclass(frozen=True)
class OracleScale:
    low_db: float
    high_db: float

    @classmethod
    def fit(cls, input_db: np.ndarray, label_db: np.ndarray) -> OracleScale:
        low = float(np.percentile(input_db, 2))
        best = float(np.percentile(label_db, 98))
        return cls(low, best + 0.5 * max(best - low, 1.0))

    def unit(self, db: torch.Tensor) -> torch.Tensor:
        return (db - self.low_db) / (self.high_db - self.low_db)

    def to_json(self) -> dict:
        return {"low_db": self.low_db, "high_db": self.high_db}


class OracleScorer:
    """Levels, normalised scores and block weights of labels from their PSNR to ground truth."""

    names = [METRIC]

    def __init__(self, scale: OracleScale, block_grid: int, min_block_weight: float):
        self.scale, self.grid, self.floor = scale, block_grid, min_block_weight

    def normalized(self, images: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """(N,) unit score in [0, 1]."""
        return self.scale.unit(psnr(images.clamp(0, 1), gt)).clamp(0, 1)

    def block_weights(self, images: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """(N, grid, grid): each block's oracle score relative to the image's mean block
        (the same rule as `IQAEnsemble.block_weights`)."""
        n, c, h, w = images.shape
        bh, bw = h // self.grid, w // self.grid
        unfold = lambda t: F.unfold(t[..., :bh * self.grid, :bw * self.grid], (bh, bw), stride=(bh, bw))  # noqa: E731
        blocks = unfold(images.clamp(0, 1)).transpose(1, 2).reshape(-1, c, bh, bw)
        gt_blocks = unfold(gt).transpose(1, 2).reshape(-1, c, bh, bw)
        scores = self.scale.unit(psnr(blocks, gt_blocks)).clamp(0.01, 1).reshape(n, self.grid, self.grid)
        return (scores / scores.mean(dim=(1, 2), keepdim=True)).clamp_min(self.floor)


class OracleReward:
    """The oracle as the differentiable reward Q of Eqs. 8-9: soft_unit of the PSNR scale.

    The reward gets images without their ground truth, so the step binds the batch's ground
    truth crops first; a call is matched to them by its batch size (the student's step
    scores [y_high; y_low] (2M), its masked labels (their count) or M images). Eq. 9 scores
    crops the reward cannot match, so experiments with this reward switch it off.
    """

    def __init__(self, scale: OracleScale):
        self.scale = scale
        self.gt: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def bind(self, gt: torch.Tensor, mask: torch.Tensor) -> None:
        """The batch's ground truth crops [M, 3, c, c] and its `label_mask` [M, K]."""
        self.gt, self.mask = gt, mask

    def _targets(self, n: int) -> torch.Tensor:
        m = self.gt.shape[0]
        per_label = self.gt[:, None].expand(-1, self.mask.shape[1], *self.gt.shape[1:])[self.mask]
        by_count = {m: self.gt, 2 * m: torch.cat([self.gt, self.gt]), per_label.shape[0]: per_label}
        if n not in by_count:
            raise ValueError(f"oracle reward: {n} images match no layout of the bound batch of {m}")
        return by_count[n]

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return soft_unit(self.scale.unit(psnr(y.clamp(0, 1), self._targets(y.shape[0]))))


def level_of(unit: torch.Tensor) -> torch.Tensor:
    """Unit scores -> conditions on 0-10 (the framework caps them at 7)."""
    return unit * 10.0

