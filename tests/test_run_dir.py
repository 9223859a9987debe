"""The run folder's layout (qualiteacher/run_dir.py): the names on disk, which old run folders,
the README and the deploy scripts rely on, and which checkpoint a run resumes from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qualiteacher.run_dir import TRAIN_RUN_NAME, RunDir, StateDir


def test_names_on_disk(tmp_path):
    tmp_path = tmp_path.resolve()
    run = RunDir(tmp_path)
    assert run.data == tmp_path / "data"
    assert run.data_split("test/input") == tmp_path / "data" / "test" / "input"
    assert run.pretrain == tmp_path / "pretrain.pt"
    assert run.calibration == tmp_path / "calibration.json"
    assert run.redis == tmp_path / "redis"
    assert run.ray_train == tmp_path / "ray_train"
    assert TRAIN_RUN_NAME == "student"
    assert run.student_checkpoints == tmp_path / "ray_train" / "student"
    assert run.tensorboard == tmp_path / "tensorboard"
    assert run.restored("score_7") == tmp_path / "restored" / "score_7"
    assert run.summary == tmp_path / "summary.json"
    state = StateDir(tmp_path / "ckpt")
    assert (state.state, state.meta) == (tmp_path / "ckpt" / "state.pt", tmp_path / "ckpt" / "meta.json")


def test_root_is_absolute(tmp_path, monkeypatch):
    """Paths go to Ray workers whose working directory is not the driver's."""
    monkeypatch.chdir(tmp_path)
    run = RunDir(Path("runs/x"))
    assert run.root == tmp_path.resolve() / "runs" / "x"
    assert run == RunDir(tmp_path.resolve() / "runs" / "x")
    with pytest.raises(AttributeError):
        run.root = tmp_path  # frozen


def test_named_paths(tmp_path):
    run = RunDir(tmp_path)
    assert run.named("final.pt") == tmp_path.resolve() / "final.pt"
    assert run.named("/elsewhere/ckpt") == Path("/elsewhere/ckpt")


def _state(folder: Path, mtime: float | None, complete: bool = True) -> Path:
    folder.mkdir(parents=True)
    if complete:
        (folder / "state.pt").write_bytes(b"x")
    if mtime is not None:
        os.utime(folder, (mtime, mtime))
    return folder


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoints() == [] and run.latest_checkpoint() is None
    root = run.student_checkpoints
    older = _state(root / "checkpoint_000001", 1)  # names do not order them: mtimes do
    newer = _state(root / "checkpoint_000000", 2)
    _state(root / "checkpoint_000002", 3, complete=False)  # state.pt not written yet
    (root / "checkpoint_manager_snapshot.json").write_text("{}")
    assert [s.root for s in run.checkpoints()] == [older, newer]
    assert run.latest_checkpoint() == newer
