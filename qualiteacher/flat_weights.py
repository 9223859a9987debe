"""The weight push's wire format: a state dict as one contiguous byte buffer plus a layout.

Ray reads numpy buffers from its shared-memory object store without a copy, whereas it
pickles torch tensors (a serialised copy at `ray.put` and another at every reader). So the
student packs the EMA's state dict once into one numpy byte buffer (`flatten`), and each
teacher views its tensors in that buffer and copies them into its model (`load_into`), the
only copy on the teacher's side.

Any torch dtype travels, bfloat16 and bool included (numpy knows neither as such): each
tensor's bytes start at an offset aligned for every dtype and are viewed back with the
dtype and shape the layout records. Keys keep the state dict's order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

ALIGN = 64  # bytes; a multiple of every dtype's size, and a cache line


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in the buffer."""

    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "float32", "bool"
    shape: tuple[int, ...]
    offset: int  # bytes from the buffer's start

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if isinstance(dtype, torch.dtype):
            return dtype
        raise ValueError(f"weights entry {self.name!r}: unknown dtype {self.dtype!r}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class FlatWeights:
    """A state dict as `buffer` (1-D uint8) and `layout` (one slot per tensor, in order)."""

    buffer: np.ndarray
    layout: tuple[Slot, ...]

    def tensors(self) -> dict[str, Tensor]:
        """The state dict, as views into the buffer (no copy). A buffer that Ray read from
        its object store is read-only: load the views into a model, never write to them."""
        with warnings.catch_warnings():  # torch warns that a read-only array's tensor is writable
            warnings.simplefilter("ignore", UserWarning)
            base = torch.from_numpy(self.buffer)
        return {slot.name: self._view(base, slot) for slot in self.layout}

    def load_into(self, model: nn.Module) -> None:
        """Copy the weights into `model` (a ValueError naming the keys if they do not fit)."""
        problems = mismatches(self.layout, model.state_dict())
        if problems:
            raise ValueError("weights do not match the model: " + "; ".join(problems))
        model.load_state_dict(self.tensors())

    @staticmethod
    def _view(base: Tensor, slot: Slot) -> Tensor:
        end = slot.offset + slot.nbytes
        if end > base.numel():
            raise ValueError(f"weights entry {slot.name!r} ends at byte {end}, past the "
                             f"buffer's {base.numel()} bytes")
        return base[slot.offset:end].view(slot.torch_dtype).view(slot.shape)


def flatten(state: Mapping[str, Tensor]) -> FlatWeights:
    """Pack `state` (tensors on any device) into one new CPU buffer: one copy per tensor."""
    layout, offset = [], 0
    for name, tensor in state.items():
        layout.append(Slot(name, _dtype_name(tensor.dtype), tuple(tensor.shape), offset))
        offset += _aligned(tensor.numel() * tensor.element_size())
    flat = FlatWeights(np.empty(offset, dtype=np.uint8), tuple(layout))
    with torch.no_grad():
        for view, tensor in zip(flat.tensors().values(), state.values()):
            view.copy_(tensor)
    return flat


def mismatches(layout: tuple[Slot, ...], model_state: Mapping[str, Tensor]) -> list[str]:
    """What keeps `layout` from loading into a model with `model_state`, key by key."""
    names = {slot.name for slot in layout}
    problems = [f"{name!r} missing from the weights" for name in model_state if name not in names]
    for slot in layout:
        want = model_state.get(slot.name)
        if want is None:
            problems.append(f"{slot.name!r} is not in the model")
        elif (slot.shape, slot.dtype) != (tuple(want.shape), _dtype_name(want.dtype)):
            problems.append(f"{slot.name!r} is {slot.dtype} {list(slot.shape)} in the weights, "
                            f"{_dtype_name(want.dtype)} {list(want.shape)} in the model")
    return problems


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN
