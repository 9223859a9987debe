"""The gating rule (Eq. 3) as a pure function.

bank(image) = top-k by ensemble score of (bank(image) U candidates that passed both drops).

Ordering is total and deterministic: higher score first, then the smaller label id. A
candidate whose label id was ever gated for this image before (kept, evicted or not
admitted: the `seen` set) is ignored, so re-applying the same candidates, e.g. a replay
after a crash, changes nothing. The Redis Lua gate in `services/bank`
implements exactly this rule; tests compare the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class Scored:
    """The part of a bank entry the gate looks at."""

    label_id: str
    score: float


T = TypeVar("T", bound=Scored)


def rank_key(entry: Scored) -> tuple[float, str]:
    """Sort key: best first; ties broken by label id so every process agrees."""
    return (-entry.score, entry.label_id)


def gate(bank: Iterable[T], candidates: Iterable[T], top_k: int = 3,
         seen: Iterable[str] = ()) -> tuple[list[T], list[T]]:
    """Return (new bank sorted best first, entries evicted from the old bank).

    `seen` holds the label ids gated for this image before; the caller adds every
    candidate's label id to it afterwards. Candidates that do not make the top-k are simply
    not admitted; they are not "evicted" because they were never stored.
    """
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    merged: dict[str, T] = {}
    for entry in bank:
        merged.setdefault(entry.label_id, entry)
    old_ids = set(merged)
    seen_ids = set(seen) | old_ids
    for entry in candidates:
        # First occurrence wins; a label id gated before never comes back.
        if entry.label_id not in seen_ids:
            merged.setdefault(entry.label_id, entry)
    ranked = sorted(merged.values(), key=rank_key)
    kept = ranked[:top_k]
    evicted = [e for e in ranked[top_k:] if e.label_id in old_ids]
    return kept, evicted
