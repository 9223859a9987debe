"""Cropped quality consistency (Eq. 9): restoring a crop should score like the crop
of the restoration. q1 = Q(crop(S(x, 7))), q2 = Q(S(crop(x), 7)), loss = |q1 - q2|."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


def random_box(
    h: int, w: int, crop_area: float, generator: torch.Generator | None = None, min_side: int = 1
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box covering `crop_area` of the image
    (each side scaled by sqrt(crop_area), but at least `min_side` and at most the image),
    placed uniformly at random."""
    if not 0.0 < crop_area <= 1.0:
        raise ValueError(f"crop_area must be in (0, 1], got {crop_area}")
    side = math.sqrt(crop_area)
    ch = min(h, max(min_side, 1, round(h * side)))
    cw = min(w, max(min_side, 1, round(w * side)))
    device = generator.device if generator is not None else torch.device("cpu")
    top = int(torch.randint(h - ch + 1, (1,), generator=generator, device=device))
    left = int(torch.randint(w - cw + 1, (1,), generator=generator, device=device))
    return top, left, ch, cw


def cropped_consistency_loss(
    model: nn.Module,
    x: Tensor,
    reward_fn: Callable[[Tensor], Tensor],
    crop_area: float = 0.25,
    generator: torch.Generator | None = None,
    score: float = 7.0,
    full_output: Tensor | None = None,
    min_side: int = 1,
) -> Tensor:
    """Mean |q1 - q2| over the batch.

    One box is drawn per call and used for every sample, so the crops form one batch and
    cost a single forward; boxes vary across calls. Pass `full_output` = S(x, score) when
    already computed (e.g. y_high of the preference step) to skip that forward. `min_side`:
    the smallest crop the reward can score (NIQE needs 96 px); the box grows to it.
    """
    top, left, ch, cw = random_box(x.shape[-2], x.shape[-1], crop_area, generator, min_side)
    if (ch, cw) == tuple(x.shape[-2:]):  # the crop is the image: both sides are the same forward
        return x.new_zeros(())
    y_full = model(x, score) if full_output is None else full_output
    q1 = reward_fn(y_full[..., top : top + ch, left : left + cw])
    q2 = reward_fn(model(x[..., top : top + ch, left : left + cw], score))
    return (q1 - q2).abs().mean()
