"""Helpers the quality experiments share: torch threads, script logging, number formats."""

from __future__ import annotations

import logging

import numpy as np


def with_threads(threads: int, run):
    """``run()`` with this process's torch intra-op threads set to ``threads``; the old
    value is restored after, so a calling process (e.g. pytest) is left as it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def script_logging() -> None:
    """Progress lines on stderr when run as a script; Ray and HTTP chatter kept down."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("ray", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"


def fmt_signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"
