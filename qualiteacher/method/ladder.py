"""The condition ladder (not in the paper): labels that span quality within one image.

A rung is a blend of an image's best label of a labelling round with its degraded input,
a * label + (1 - a) * input, trained at its own level beside the bank's labels. Why: the
score condition has to learn that a higher score means a better restoration *of the same
image*, yet the three labels of one image differ by less than one level, while levels
differ across images mostly by how degraded the image is (a lightly hazed photo gets a high
level for a light restoration). Measured with oracle levels (experiments/QUALITY.md,
oracle factorial): without rungs the condition learns the confound and Spearman(condition,
PSNR) is negative; with them it follows quality.

A rung's level (`labelling.ladder_levels`):
- "constructed" (default): a times its label's level (capped), so the input is level 0 and
  a rung always sits below its label. Its order is known by construction; a metric can only
  add noise to it. Scored by the offline NR ensemble, 22-40 % of the raw *inputs* of snow,
  rain, haze and underwater scored at the cap of 7 beside their own labels (the blends at
  a = 0.5 up to 57 %), so condition 7 was partly taught "return the input": the cause of
  most of the offline default's loss against its teacher (experiments/QUALITY.md).
- "scored": each rung scored by the same scorer as every label
  (`qualiteacher.method.judge.ladder_levels`), as before; for a metric that ranks blends.

One rule, three users: the scorer gives the rungs of each kept set's best label their
levels (`judge.best_label_ladders` or `judge.ladder_levels`; the reference loop the same),
the bank stores (alpha, level) pairs with that label, and the student rebuilds the rungs on
its crop (blending commutes with cropping) in `assemble_bank_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ladder_rungs(x: torch.Tensor, label: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """Rungs of one label: x, label [..., C, H, W] (same shape) -> [..., R, C, H, W], one per alpha."""
    return torch.stack([a * label + (1.0 - a) * x for a in alphas], dim=-4)


def constructed_levels(alphas: Sequence[float], label_level: float, cap: float) -> dict[float, float]:
    """Blend weight -> level of one label's rungs by construction: a * min(label level, cap)."""
    top = min(float(label_level), float(cap))
    return {float(a): float(a) * top for a in alphas}
