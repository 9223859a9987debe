"""What is compared and what counts as a win: the tasks, the methods, the paper's targets."""

from __future__ import annotations

TASKS = ("snow", "rain", "haze", "lowlight", "underwater")
TARGET_TASKS_WON = 4
TARGET_SPEARMAN = 0.9
# What is compared, in report order; "qualiteacher" is the student at score 7.
METHODS = ("input", "teacher", "baseline", "qualiteacher")
LABELS = {
    "input": "degraded input",
    "teacher": "stage-1 teacher @7",
    "baseline": "baseline student",
    "qualiteacher": "QualiTeacher @7",
    "gt": "ground truth",
}
