"""The condition ladder (not in the paper): labels that span quality within one image.

A rung is a blend of an image's best label of a labelling round with its degraded input,
a * label + (1 - a) * input, scored by the same scorer as every label and trained at its
own level beside the bank's labels. Why: the score condition has to learn that a higher
score means a better restoration *of the same image*, yet the three labels of one image
differ by less than one level, while levels differ across images mostly by how degraded
the image is (a lightly hazed photo gets a high level for a light restoration). Measured
with oracle levels (experiments/QUALITY.md, oracle factorial): without rungs the condition
learns the confound and Spearman(condition, PSNR) is negative; with them it follows quality.

One rule, three users: the scorer scores the rungs of each kept set's best label
(`qualiteacher.method.judge.ladder_levels`, also the reference loop's), the bank
stores (alpha, level) pairs with that label, and the student rebuilds the rungs on its
crop (blending commutes with cropping) in `assemble_bank_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ladder_rungs(x: torch.Tensor, label: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """Rungs of one label: x, label [..., C, H, W] (same shape) -> [..., R, C, H, W], one per alpha."""
    return torch.stack([a * label + (1.0 - a) * x for a in alphas], dim=-4)
