"""Multi-augmentation pseudo-labels: PL_k = A_k^-1(T(A_k(x))) for A_k in hflip, vflip, rot90.

Every transform has an exact inverse on tensors of any (H, W), square or not. This module
is the one home of the augmentation names: the config, the bank record and the teacher
take them from here. It loads torch only when pseudo-labels are made, so the config, the
bank and the monitor can read the names without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from torch import Tensor

Augmentation = Literal["identity", "hflip", "vflip", "rot90"]
KNOWN_AUGMENTATIONS: tuple[str, ...] = get_args(Augmentation)
# The paper's multi-aug set and the default: every known transform but the identity.
AUGMENTATIONS: tuple[str, ...] = tuple(a for a in KNOWN_AUGMENTATIONS if a != "identity")

_FORWARD: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, (-2, -1)),
}
_INVERSE: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(-1, (-2, -1)),
}


def apply(name: str, x: Tensor) -> Tensor:
    return _FORWARD[_check(name)](x)


def invert(name: str, x: Tensor) -> Tensor:
    return _INVERSE[_check(name)](x)


def _check(name: str) -> str:
    if name not in _FORWARD:
        raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(_FORWARD)}")
    return name


def multi_aug_pseudo_labels(
    teacher: Callable[[Tensor], Tensor],
    x: Tensor,
    augmentations: tuple[str, ...] = AUGMENTATIONS,
) -> Tensor:
    """Restore x (N, C, H, W) under each augmentation; returns PLs (N, K, C, H, W).

    Augmentations that keep the shape run as one batched teacher call; rot90 changes
    (H, W) on non-square inputs, so it gets its own call.
    """
    import torch  # here, not at the top: see the module docstring

    with torch.no_grad():
        by_shape: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        for k, name in enumerate(augmentations):
            xa = apply(name, x)
            by_shape.setdefault(tuple(xa.shape), []).append((k, xa))
        outputs: list[Tensor | None] = [None] * len(augmentations)
        for group in by_shape.values():
            restored = teacher(torch.cat([xa for _, xa in group]))
            for (k, _), chunk in zip(group, restored.split(x.shape[0])):
                outputs[k] = invert(augmentations[k], chunk)
        return torch.stack(outputs, dim=1)  # type: ignore[arg-type]
