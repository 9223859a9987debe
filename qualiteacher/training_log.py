"""What the training log records: tag names and values, rates, when to probe. No torch, Ray or Redis.

The student's rank 0 (`services/training_log.py`) writes what these functions return to
TensorBoard and to the monitor's Redis stream, so both show the same numbers under the
same tags:

===============================  ===========================================================
tag                              value
===============================  ===========================================================
``loss/<term>``                  every loss term of the step (``total``, ``supervised``,
                                 ``pixel``, ``pref_rank``, ...; `student_step.step_losses`)
``reward/q_high``, ``q_low``     the reward of Eq. 8 at the high and the low score (batch
                                 mean), on steps that have the preference terms
``train/lr``                     the learning rate of the injection layers (`train.lr`; the
                                 backbone's is `student_step.backbone_lr` of the step)
``train/teacher_version``        the newest teacher version pushed
``train/steps_per_s``            student steps per second since the last log
``bank/images``, ``entries``     the bank's size
``bank/drop_rate/<reason>``      sets dropped for that reason / sets scored, since the start
``bank/drop_rate/total``         all drops / sets scored
``bank/labelled_sets_per_s``     sets scored (gated or dropped) per second since the last log
``bank/score_histogram``         TensorBoard only: entries per ensemble score (0-10); a
                                 label trains at this score capped at ``model.score_cap``
``probe/input``, ``probe/<s>``   images: the probe inputs, and their restorations at score s
===============================  ===========================================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

REWARD_TERMS = ("q_high", "q_low")
PROBE_INPUT = "input"
# Every probe image's name matches this: it becomes a Redis hash field and a monitor URL.
PROBE_NAME = re.compile(r"^(input|[0-9]{1,6}(\.[0-9]{1,6})?)$")


def probe_name(score: float) -> str:
    """A probe image's name for a score: ``3`` for 3.0, ``6.5`` for 6.5 (keys, tags, URLs)."""
    return f"{float(score):g}"


def step_scalars(losses: Mapping[str, float], lr: float, teacher_version: int) -> dict[str, float]:
    """The step's own scalars: loss terms, reward values, learning rate, teacher version."""
    out = {f"{'reward' if name in REWARD_TERMS else 'loss'}/{name}": float(value) for name, value in losses.items()}
    out["train/lr"] = float(lr)
    out["train/teacher_version"] = float(teacher_version)
    return out


def labelled_sets(stats: Mapping[str, Any]) -> int:
    """Image sets the scorers finished: each is either gated or dropped (`MemoryBank.stats`)."""
    return int(stats["counters"].get("gate_calls", 0)) + sum(int(n) for n in stats["drops"].values())


def bank_scalars(stats: Mapping[str, Any]) -> dict[str, float]:
    """The bank's size and its drop rates by reason, from `MemoryBank.stats()`."""
    out = {"bank/images": float(stats["images"]), "bank/entries": float(stats["entries"])}
    sets = labelled_sets(stats)
    for reason, n in sorted(stats["drops"].items()):
        out[f"bank/drop_rate/{reason}"] = n / sets if sets else 0.0
    out["bank/drop_rate/total"] = sum(stats["drops"].values()) / sets if sets else 0.0
    return out


def score_histogram(stats: Mapping[str, Any]) -> dict[str, Any] | None:
    """The bank's score histogram as `SummaryWriter.add_histogram_raw` arguments, or None
    while the bank is empty. The bank keeps counts per bin only, so the sums use bin centres."""
    edges, counts = stats["histogram"]["edges"], stats["histogram"]["counts"]
    num = sum(counts)
    if num == 0:
        return None
    centres = [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])]
    filled = [i for i, c in enumerate(counts) if c]
    return {"min": edges[filled[0]], "max": edges[filled[-1] + 1], "num": num,
            "sum": sum(c * m for c, m in zip(counts, centres)),
            "sum_squares": sum(c * m * m for c, m in zip(counts, centres)),
            "bucket_limits": list(edges[1:]), "bucket_counts": list(counts)}


@dataclass
class Rate:
    """Per-second rate of a growing count between two readings; None at the first one."""

    count: float | None = None
    time: float | None = None

    def update(self, count: float, now: float) -> float | None:
        last_count, last_time = self.count, self.time
        self.count, self.time = count, now
        if last_count is None or last_time is None or now <= last_time:
            return None
        return (count - last_count) / (now - last_time)


def probe_due(step: int, teacher_version: int, push_every: int, probe_every_pushes: int) -> bool:
    """Whether this step pushed weights and the push is one to probe: every
    ``probe_every_pushes`` teacher versions (counted across resumes), never when 0."""
    return probe_every_pushes > 0 and step % push_every == 0 and teacher_version % probe_every_pushes == 0
