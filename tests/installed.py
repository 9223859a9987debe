"""A real, non-editable install of this checkout into a folder, for the packaging and layer tests.

The sources are copied first, so the build's `build/` and `*.egg-info` never land in the checkout
and a test can change the copy (tests/test_layers.py breaks a contract in one)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the build reads: pyproject.toml, the readme it names, and the packages' folders.
SOURCES = ("pyproject.toml", "README.md", "qualiteacher", "services", "pipelines", "protos")


def copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def install(source: Path, target: Path) -> Path:
    """`pip install --target` (no dependencies: the running venv has them) of `source`."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(target), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    return target
