"""Names of the job's actors in its fixed Ray namespace, so outside tools can find them
(`qualiteacher scale`, tests). The job's own parts never look them up: they are handed the
handles (the labeller's goes to the student in Ray Train's loop config)."""

from __future__ import annotations

LABELLER = "labeller"


def teacher_name(index: int) -> str:
    return f"teacher-{index}"


def scorer_name(index: int) -> str:
    return f"scorer-{index}"
