"""The layers' arrows run one way: pipelines -> services -> the core (docs/ARCHITECTURE.md, section 1).

`lint-imports` reads the `[tool.importlinter]` contracts in pyproject.toml. It sees every import
statement, lazy ones inside functions included, so a command that imports Ray on the quiet from
the core fails here. grimp finds qualiteacher.services and qualiteacher.pipelines only in the
installed layout (in the checkout they are top-level folders), so the contracts run on a real
install of a copy of this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.installed import REPO, copy_sources, install

pytest.importorskip("importlinter", reason="import-linter is in the `test` extra")

# In a fresh interpreter: fail unless grimp sees the installed copy with its services and pipelines,
# then lint (the same function as the `lint-imports` command; no cache folder written).
LINT = """
import sys, grimp
from importlinter.cli import lint_imports
site = sys.argv[1]
graph = grimp.build_graph("qualiteacher")
assert {"qualiteacher.services.scorer", "qualiteacher.pipelines.cli"} <= graph.modules, "no services in the graph"
assert __import__("qualiteacher").__file__.startswith(site), "not the installed copy"
sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True, no_logo=True))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("layers")
    return install(copy_sources(tmp / "src"), tmp / "site")


def _lint(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    # the install first on the path, then the checkout for `benchmarks` and `experiments`; cwd outside the checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run([sys.executable, "-c", LINT, str(site), str(REPO / "pyproject.toml")], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_kept(site, tmp_path) -> None:
    proc = _lint(site, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout


def test_core_importing_a_service_breaks_the_contracts(site, tmp_path) -> None:
    broken = shutil.copytree(site, tmp_path / "site")
    config = broken / "qualiteacher" / "config.py"
    # a lazy import, as a quick fix would add it
    config.write_text(config.read_text() + "\n\ndef _scorer():\n    import qualiteacher.services.scorer\n")
    proc = _lint(broken, tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "0 kept, 2 broken" in proc.stdout, proc.stdout
    assert "qualiteacher.config -> qualiteacher.services.scorer" in proc.stdout, proc.stdout


def test_core_is_the_same_in_both_contracts() -> None:
    # the layers contract is exhaustive over qualiteacher's children; the forbidden one lists them again
    layers, forbidden = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    core = {f"qualiteacher.{name.strip()}" for name in layers["layers"][-1].split(":")}
    assert set(forbidden["source_modules"]) == core
    children = {p.stem for p in (REPO / "qualiteacher").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert core == {f"qualiteacher.{c}" for c in children - {"__init__"}}
