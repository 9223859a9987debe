"""Quality preference losses (Eq. 8).

`reward_fn` maps images [N,3,H,W] in [0,1] to differentiable quality [N] in [0,1]
(higher is better). It receives the raw network output; clamp inside it if the
metric needs [0,1] inputs.

L1 (rank)     = -log sigmoid((Q(y_h) - Q(y_l) - m) / beta)
L2 (anchor)   = -log sigmoid((Q(y_h) - Q_min_teacher) / beta)
L3 (identity) = sum_k ||W_k - W_k^0||_F^2 over the injection layers' parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qualiteacher.config import PreferenceConfig
from qualiteacher.models.injection import injection_parameters

RewardFn = Callable[[Tensor], Tensor]


def preference_loss(
    q_high: Tensor,
    q_low: Tensor,
    q_min_teacher: Tensor | float,
    beta: float,
    margin: float,
) -> dict[str, Tensor]:
    """Rank (L1) and anchor (L2) terms, each a batch mean."""
    q_min = torch.as_tensor(q_min_teacher, dtype=q_high.dtype, device=q_high.device)
    rank = -F.logsigmoid((q_high - q_low - margin) / beta).mean()
    anchor = -F.logsigmoid((q_high - q_min) / beta).mean()
    return {"rank": rank, "anchor": anchor}


def identity_loss(model: nn.Module, initial: dict[str, Tensor]) -> Tensor:
    """L3 against the snapshot `initial` (see `injection_snapshot`). Never silently zero:
    an empty snapshot or a snapshot/model mismatch raises."""
    if not initial:
        raise ValueError(
            "identity_loss: the initial injection weights are empty (no injection layers?)"
        )
    current = injection_parameters(model)
    if set(current) != set(initial):
        raise ValueError(
            f"identity_loss: snapshot keys {sorted(initial)} do not match the model's injection "
            f"parameters {sorted(current)}"
        )
    return sum(
        (current[k] - initial[k].to(current[k].device)).pow(2).sum()
        for k in sorted(current)
    )


def sample_low_scores(
    n: int, low_scores: list[float], generator: torch.Generator | None = None
) -> Tensor:
    """One s_low per sample, drawn uniformly from `low_scores` (CPU tensor [n])."""
    device = generator.device if generator is not None else torch.device("cpu")
    idx = torch.randint(len(low_scores), (n,), generator=generator, device=device)
    return torch.tensor(low_scores, dtype=torch.float32, device=device)[idx]


def preference_step(
    model: nn.Module,
    x: Tensor,
    reward_fn: RewardFn,
    q_min_teacher: Tensor | float,
    cfg: PreferenceConfig,
    generator: torch.Generator | None = None,
    initial: dict[str, Tensor] | None = None,
    high_score: float = 7.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """y_h = S(x, high_score) and y_l = S(x, s_low) in one batched forward, then
    `preference_terms`. (The student gets y_h and y_l from its shared forward instead.)"""
    n = x.shape[0]
    s_low = sample_low_scores(n, cfg.low_scores, generator).to(x.device)
    scores = torch.cat([torch.full((n,), high_score, device=x.device), s_low])
    y = model(torch.cat([x, x]), scores)
    return preference_terms(y[:n], y[n:], s_low, reward_fn, q_min_teacher, cfg, model, initial)


def preference_terms(
    y_high: Tensor,
    y_low: Tensor,
    s_low: Tensor,
    reward_fn: RewardFn,
    q_min_teacher: Tensor | float,
    cfg: PreferenceConfig,
    model: nn.Module | None = None,
    initial: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Eq. 8 from the student's outputs at the high score and at s_low (one reward call).

    Returns (losses, outputs). losses: rank, anchor, (identity when `initial` is given)
    and total = weighted sum with the config's weights. outputs: y_high, y_low, s_low,
    q_high, q_low (y_high can be reused, e.g. by the consistency loss).
    """
    n = y_high.shape[0]
    q = reward_fn(torch.cat([y_high, y_low]))
    q_high, q_low = q[:n], q[n:]
    if not cfg.low_gradient:
        q_low = q_low.detach()
    losses = preference_loss(q_high, q_low, q_min_teacher, cfg.beta, cfg.margin)
    total = cfg.weight_rank * losses["rank"] + cfg.weight_anchor * losses["anchor"]
    if initial is not None:
        losses["identity"] = identity_loss(model, initial)
        total = total + cfg.weight_identity * losses["identity"]
    losses["total"] = total
    outputs = {"y_high": y_high, "y_low": y_low, "s_low": s_low, "q_high": q_high, "q_low": q_low}
    return losses, outputs
