"""The layout of a run folder, and of the training-state folders in it: every path, one home.

::

    <run_dir>/
        data/<split>/                     bundled task sets (paired/input, unpaired/input, test/...)
        pretrain.pt                       the stage-1 teacher, when the run pretrains it
        calibration.json                  fitted IQA ranges and drop thresholds
        settings.json                     the method settings it started with (run_settings.py)
        redis/                            the embedded Redis server's files (AOF)
        ray_train/student/checkpoint_*/   Ray Train's checkpoints, each a training-state folder:
            state.pt                          the state (authoritative)
            meta.json                         its step and teacher version, for humans and tools
        tensorboard/                      the student's TensorBoard events
        restored/<name>/                  the demo's restorations
        summary.json                      written at the end; names the final checkpoint

The names on disk are a contract with old run folders, the README and the deploy scripts:
change them here only, and never without a migration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TRAIN_RUN_NAME = "student"  # Ray Train's run name: its checkpoints' folder under ray_train/


@dataclass(frozen=True)
class StateDir:
    """A training-state folder (one checkpoint), as `qualiteacher.checkpoint` writes it."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def state(self) -> Path:
        return self.root / "state.pt"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    def complete(self) -> bool:
        """Whether the state file is there (meta.json is informational and written after it)."""
        return self.state.is_file()


@dataclass(frozen=True)
class RunDir:
    """One run folder. The root is absolute: its paths go to Ray actors and Ray Train workers,
    whose working directory need not be the driver's, and summary.json names them."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def data(self) -> Path:
        return self.root / "data"

    def data_split(self, split: str) -> Path:
        """One bundled set, e.g. ``test/input`` (`qualiteacher.data.samples.SPLITS`)."""
        return self.data / split

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain.pt"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def redis(self) -> Path:
        return self.root / "redis"

    @property
    def ray_train(self) -> Path:
        """Ray Train's storage path; it keeps the run named `TRAIN_RUN_NAME` below it."""
        return self.root / "ray_train"

    @property
    def student_checkpoints(self) -> Path:
        return self.ray_train / TRAIN_RUN_NAME

    def checkpoints(self) -> list[StateDir]:
        """The complete training-state folders, oldest first (by mtime, as Ray Train writes them)."""
        root = self.student_checkpoints
        found = sorted(root.glob("checkpoint_*"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        return [StateDir(p) for p in found if StateDir(p).complete()]

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder, if any: where a re-run resumes."""
        found = self.checkpoints()
        return found[-1].root if found else None

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def restored(self, name: str) -> Path:
        return self.root / "restored" / name

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def named(self, ref: str | os.PathLike[str]) -> Path:
        """A path a run file names (summary.json's checkpoint): absolute as is, else in the run folder."""
        path = Path(ref)
        return path if path.is_absolute() else self.root / path
