"""Probe images: a small fixed set of unpaired inputs, restored at a few scores as training goes.

The same inputs at every probe, so a person sees one picture change: how the student's
restoration at scores 3, 5 and 7 drifts, sharpens or breaks between weight pushes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from qualiteacher.data.samples import square_resize
from qualiteacher.imageio import DEFAULT_MAX_PIXELS, ImageReadError, list_images, read_image
from qualiteacher.training_log import PROBE_INPUT, probe_name

DEFAULT_SIZE = 128  # probe side where labelling keeps images at their own size


def load_probe_set(folder: str | os.PathLike[str], k: int, size: int | None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The first ``k`` readable images of ``folder`` (by file name), square-resized to one
    side so they stack: uint8 [k, H, W, 3]. Reads no more files than it needs."""
    images: list[np.ndarray] = []
    for path in list_images(folder):
        try:
            images.append(square_resize(read_image(path, max_pixels), size or DEFAULT_SIZE))
        except ImageReadError:
            continue  # the labeller reports unreadable files; a probe just takes the next one
        if len(images) == k:
            break
    if not images:
        raise ValueError(f"no readable probe images in {folder}")
    return np.stack(images)


@torch.no_grad()
def restore_probes(model: nn.Module, inputs: np.ndarray, scores: Sequence[float],
                   device: torch.device) -> dict[str, np.ndarray]:
    """``{"input": inputs, probe_name(s): model(inputs, s) for s in scores}``, uint8 [k, H, W, 3].

    Runs in eval mode and puts the model back as it was, so the training step after it is
    unchanged (`torch.no_grad`: nothing reaches the optimiser)."""
    x = torch.from_numpy(inputs).permute(0, 3, 1, 2).float().div(255).to(device)
    was_training = model.training
    model.eval()
    try:
        out = {PROBE_INPUT: inputs}
        for score in scores:
            y = torch.nan_to_num(model(x, float(score)), nan=0.0).clamp(0, 1).mul(255).round().to(torch.uint8)
            out[probe_name(score)] = y.permute(0, 2, 3, 1).cpu().numpy()
        return out
    finally:
        model.train(was_training)


def side_by_side(images: np.ndarray) -> np.ndarray:
    """uint8 [k, H, W, 3] as one [H, k * W, 3] strip: one PNG per score for the monitor."""
    return np.concatenate(list(images), axis=1)
