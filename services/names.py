"""Names of the job's actors in its fixed Ray namespace, so tools can find them."""

from __future__ import annotations

LABELLER = "labeller"


def teacher_name(index: int) -> str:
    return f"teacher-{index}"


def scorer_name(index: int) -> str:
    return f"scorer-{index}"
