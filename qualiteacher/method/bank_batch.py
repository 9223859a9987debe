"""The student's view of the bank: images with all their pseudo-labels on one crop.

`assemble_bank_batch` turns bank records (an input and its top-k labels, each with its
block weight grid and level) into a `BankBatch`. The Ray student decodes Redis records into
`BankLabel`s and calls it; experiments that keep their bank in memory call it too, so the
crop, the weight upsampling, the padding and the level cap have one home.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from qualiteacher.method.ladder import ladder_rungs


@dataclass(frozen=True)
class BankLabel:
    """One stored pseudo-label as the student needs it."""

    image: np.ndarray  # H x W x 3 uint8, the label in the input's frame
    weights: np.ndarray  # grid x grid block weights (empty: uniform)
    level: float  # its condition (the ensemble score on 0-10)
    ladder: tuple[tuple[float, float], ...] = ()  # (blend weight, level) of its rungs (method/ladder.py)


@dataclass
class BankBatch:
    """M images with up to K slots each (labels, then ladder rungs), all on one crop per image.

    x [M, 3, c, c]; pl [M, K, 3, c, c]; weights [M, K, 1, c, c]; level [M, K] (capped);
    mask [M, K]: False on the padding slots of images with fewer than K (they repeat the
    best label and never count); label_mask [M, K]: the labels alone, without rungs.
    """

    x: torch.Tensor
    pl: torch.Tensor
    weights: torch.Tensor
    level: torch.Tensor
    mask: torch.Tensor
    label_mask: torch.Tensor  # [M, K]: the bank's own labels (mask without the rungs)
    boxes: list[tuple[int, int, int]] = field(default_factory=list)  # per image (top, left, side) of its crop

    def to(self, device: torch.device | str) -> BankBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return BankBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    @property
    def labels_per_image(self) -> int:
        return self.level.shape[1]


def upsample_block_weights(grid: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """A block weight grid -> a pixel weight map [1, H, W] (bilinear); empty grid -> ones."""
    if grid.size == 0:
        return torch.ones(1, *size)
    return F.interpolate(torch.as_tensor(grid, dtype=torch.float32)[None, None], size=size,
                         mode="bilinear", align_corners=False)[0]


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x C uint8 -> C x H x W float in [0, 1]; a copy (decoded records are read-only)."""
    return torch.tensor(image).permute(2, 0, 1).float() / 255.0


def slot_count(labels: list[BankLabel]) -> int:
    """An image's training slots: its labels and the rungs of its best label with a ladder."""
    return len(labels) + len(next((label.ladder for label in labels if label.ladder), ()))


def image_rows(image: np.ndarray, labels: list[BankLabel], k: int, crop: int, cap: float,
               rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One image's slots: the input, every label and the ladder's rungs cut at one random box."""
    x = _to_tensor(image)
    h, w = x.shape[-2:]
    c = min(crop, h, w)
    top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    box = (slice(None), slice(top, top + c), slice(left, left + c))
    x = x[box]
    pls = [_to_tensor(label.image)[box] for label in labels]
    maps = [upsample_block_weights(label.weights, (h, w))[box] for label in labels]
    levels = [label.level for label in labels]
    laddered = next((i for i, label in enumerate(labels) if label.ladder), None)
    if laddered is not None:
        alphas, rung_levels = zip(*labels[laddered].ladder)
        pls += list(ladder_rungs(x, pls[laddered], alphas).unbind(0))
        maps += [torch.ones(1, c, c)] * len(alphas)  # a blend has no block scores of its own
        levels += rung_levels
    pad = k - len(pls)
    return {
        "box": (top, left, c),
        "x": x,
        "pl": torch.stack(pls + [pls[0]] * pad),
        "weights": torch.stack(maps + [maps[0]] * pad),
        "level": torch.tensor([min(level, cap) for level in levels] + [cap] * pad),
        "mask": torch.tensor([True] * len(pls) + [False] * pad),
        "label_mask": torch.tensor([True] * len(labels) + [False] * (k - len(labels))),
    }


def assemble_bank_batch(images: list[np.ndarray], labels: list[list[BankLabel]], crop: int, cap: float,
                        rng: np.random.Generator) -> BankBatch | None:
    """A `BankBatch` from inputs and their labels (best first); None when there is nothing.

    Every image must have labels of its own size; images should share a size (or be at
    least `crop` on each side) so that their crops stack.
    """
    pairs = [(image, image_labels) for image, image_labels in zip(images, labels, strict=True) if image_labels]
    if not pairs:
        return None
    k = max(slot_count(image_labels) for _, image_labels in pairs)
    rows = [image_rows(image, image_labels, k, crop, cap, rng) for image, image_labels in pairs]
    boxes = [row.pop("box") for row in rows]
    return BankBatch(**{key: torch.stack([row[key] for row in rows]) for key in rows[0]}, boxes=boxes)
