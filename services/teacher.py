"""Teacher actor: versioned EMA weights, multi-augmentation pseudo-labels for a batch.

Plain class; `services/labeller.py` wraps it with `ray.remote`. Weights arrive as `FlatWeights`
(`qualiteacher.flat_weights`: one byte buffer, which Ray resolves from the student's
`ray.put` reference without a copy) with a version number; a version that is not newer
than the one held is ignored, so late or duplicated pushes are harmless (the RLlib
`sync_weights` pattern).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from qualiteacher.config import ModelConfig
from qualiteacher.device import pick_device
from qualiteacher.flat_weights import FlatWeights, flatten
from qualiteacher.method.augment import AUGMENTATIONS, multi_aug_pseudo_labels
from qualiteacher.models.build import build_model

log = logging.getLogger(__name__)


class TeacherWorker:
    def __init__(self, model_cfg: dict, weights: FlatWeights | None, version: int,
                 use_gpu: bool = False, augmentations: tuple[str, ...] = AUGMENTATIONS):
        self.augmentations = tuple(augmentations)
        self.device = pick_device(use_gpu)
        self.model = build_model(ModelConfig.model_validate(model_cfg)).to(self.device).eval()
        self.model.requires_grad_(False)
        self.version = -1
        if weights is not None:
            self.set_weights(weights, version)

    def set_weights(self, weights: FlatWeights, version: int) -> int:
        """Load weights if `version` is newer than the held one; returns the version held."""
        if not isinstance(weights, FlatWeights):  # e.g. a plain state dict from old code
            raise TypeError(f"set_weights takes FlatWeights (qualiteacher.flat_weights.flatten), "
                            f"got {type(weights).__name__}")
        if version <= self.version:
            return self.version
        weights.load_into(self.model)
        self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def get_weights(self) -> tuple[FlatWeights, int]:
        """The weights held and their version: the labeller re-seeds a restarted teacher from a
        living one when the student's copy of the newest weights is lost (call with num_returns=2)."""
        return flatten(self.model.state_dict()), self.version

    @torch.no_grad()
    def label(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """images (N, H, W, 3) uint8 -> (PLs (N, K, H, W, 3) uint8, finite mask (N,), version).

        A PL set with NaN or Inf anywhere is flagged (mask False) and must never reach the bank.
        A teacher without weights (e.g. just restarted) refuses, so the loop re-seeds it.
        """
        if self.version < 0:
            raise RuntimeError("teacher has no weights yet; call set_weights first")
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.device)  # writable copy
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        pls = multi_aug_pseudo_labels(lambda b: self.model(b), x, self.augmentations)
        finite = torch.isfinite(pls).flatten(1).all(dim=1)
        out = pls.nan_to_num(0.0).clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
        return out.permute(0, 1, 3, 4, 2).cpu().numpy(), finite.cpu().numpy(), self.version
