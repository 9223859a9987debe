"""Multi-augmentation pseudo-labels: PL_k = A_k^-1(T(A_k(x))) for A_k in hflip, vflip, rot90.

Every transform has an exact inverse on tensors of any (H, W), square or not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

AUGMENTATIONS = ("hflip", "vflip", "rot90")

_FORWARD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, dims=(-1,)),
    "vflip": lambda x: torch.flip(x, dims=(-2,)),
    "rot90": lambda x: torch.rot90(x, k=1, dims=(-2, -1)),
}
_INVERSE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: torch.flip(x, dims=(-1,)),
    "vflip": lambda x: torch.flip(x, dims=(-2,)),
    "rot90": lambda x: torch.rot90(x, k=-1, dims=(-2, -1)),
}


def apply(name: str, x: torch.Tensor) -> torch.Tensor:
    return _FORWARD[_check(name)](x)


def invert(name: str, x: torch.Tensor) -> torch.Tensor:
    return _INVERSE[_check(name)](x)


def _check(name: str) -> str:
    if name not in _FORWARD:
        raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(_FORWARD)}")
    return name


@torch.no_grad()
def multi_aug_pseudo_labels(
    teacher: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    augmentations: tuple[str, ...] = AUGMENTATIONS,
) -> torch.Tensor:
    """Restore x (N, C, H, W) under each augmentation; returns PLs (N, K, C, H, W).

    Augmentations that keep the shape run as one batched teacher call; rot90 changes
    (H, W) on non-square inputs, so it gets its own call.
    """
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for k, name in enumerate(augmentations):
        xa = apply(name, x)
        by_shape.setdefault(tuple(xa.shape), []).append((k, xa))
    outputs: list[torch.Tensor | None] = [None] * len(augmentations)
    for group in by_shape.values():
        restored = teacher(torch.cat([xa for _, xa in group]))
        for (k, _), chunk in zip(group, restored.split(x.shape[0])):
            outputs[k] = invert(augmentations[k], chunk)
    return torch.stack(outputs, dim=1)  # type: ignore[arg-type]
