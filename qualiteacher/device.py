"""The torch device named by a config field, a command-line option or a use-GPU flag."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:N" as named, with a clear
    error when CUDA is asked for on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's own message lists every device type it knows
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def pick_device(use_gpu: bool) -> torch.device:
    """cuda when ``use_gpu`` and CUDA is available, else cpu: a ``train.use_gpu`` config runs
    unchanged on a machine without a GPU (the Ray Train student gets its device from Ray)."""
    return resolve_device("auto" if use_gpu else "cpu")
