"""Progress bars of the folder commands (score, evaluate, restore, degrade): for a person only.

A bar goes to stderr and only when stderr is a terminal and the output is not ``--json``:
piped or logged output, and JSON for a program, stay exactly as they were.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def on_terminal(json_output: bool = False) -> bool:
    """Whether to show a bar: a person is watching stderr and stdout is not JSON."""
    return not json_output and sys.stderr.isatty()


def bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` images (a silent one when not ``enabled``); cleared when done,
    so the command's own summary line is what stays on the screen."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, leave=False,
                dynamic_ncols=True)


def each(items: Sequence[T], desc: str, enabled: bool) -> Iterator[T]:
    """``items`` one by one, the bar advancing as each is done."""
    with bar(len(items), desc, enabled) as done:
        for item in items:
            yield item
            done.update()
