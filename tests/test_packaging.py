"""The wheel installs everything under `qualiteacher`: the top-level folders services/, pipelines/
and protos/ become qualiteacher.services, qualiteacher.pipelines and qualiteacher.protos, and no
generic name (`services`, ...) lands in site-packages. The checkout's own layout keeps working
without an install (qualiteacher/__init__.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.installed import REPO, copy_sources, install

# folder in the checkout -> its import name
MAPPED = {"qualiteacher": "qualiteacher", "services": "qualiteacher.services",
          "pipelines": "qualiteacher.pipelines", "protos": "qualiteacher.protos"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("packaging")
    return install(copy_sources(tmp / "src"), tmp / "site")


def _where(python_path: Path | None, cwd: Path, modules: list[str]) -> dict[str, str]:
    """Each module's file, imported by a fresh interpreter in `cwd` (PYTHONPATH only `python_path`)."""
    code = ("import importlib, json, sys; "
            "print(json.dumps({m: importlib.import_module(m).__file__ for m in sys.argv[1:]}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if python_path is not None:
        env["PYTHONPATH"] = str(python_path)
    proc = subprocess.run([sys.executable, "-c", code, *modules], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_no_generic_top_level_names(site):
    top = {p.name for p in site.iterdir()}
    assert {"services", "pipelines", "protos"}.isdisjoint(top), top
    assert top - {"bin"} == {"qualiteacher", "qualiteacher-0.1.0.dist-info"}, top


def test_every_package_and_data_file_installed(site):
    # pyproject.toml lists the packages one by one: a new subpackage must be listed there too
    for folder, name in MAPPED.items():
        for path in (REPO / folder).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file() or path.suffix == ".pyc":
                continue
            rel = path.relative_to(REPO / folder)
            assert (site / Path(*name.split(".")) / rel).is_file(), f"{folder}/{rel} is not installed"


def test_installed_copy_imports_its_own_modules(site, tmp_path):
    mods = ["qualiteacher", "qualiteacher.services.scorer", "qualiteacher.services.bank.store",
            "qualiteacher.pipelines.cli", "qualiteacher.protos.bank_entry_pb2"]
    files = _where(site, tmp_path, mods)
    assert all(Path(f).is_relative_to(site / "qualiteacher") for f in files.values()), files
    script = (site / "bin" / "qualiteacher").read_text()
    assert "from qualiteacher.pipelines.cli import main" in script


def test_checkout_without_install(tmp_path):
    # the checkout's folders resolve from a plain copy of it, as `ray job submit --working-dir .` ships it
    copy = copy_sources(tmp_path / "checkout")
    files = _where(None, copy, ["qualiteacher.services.scorer", "qualiteacher.pipelines.cli",
                                "qualiteacher.protos.bank_entry_pb2"])
    assert files == {"qualiteacher.services.scorer": str(copy / "services" / "scorer.py"),
                     "qualiteacher.pipelines.cli": str(copy / "pipelines" / "cli.py"),
                     "qualiteacher.protos.bank_entry_pb2": str(copy / "protos" / "bank_entry_pb2.py")}
