"""The layers' arrows run one way: pipelines -> services -> qualiteacher (docs/ARCHITECTURE.md, section 1).

`lint-imports` reads the `[tool.importlinter]` contracts in pyproject.toml. It sees every import
statement, lazy ones inside functions included, so a command that imports Ray on the quiet from
the core fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("importlinter", reason="import-linter is in the `test` extra")


def test_import_contracts_kept() -> None:
    # run as its own process from the repository root, so the packages found are this checkout's
    # (the same function as the `lint-imports` command; no cache folder written)
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout
