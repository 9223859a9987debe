"""QualiTeacher. The core is this folder; `qualiteacher.services`, `qualiteacher.pipelines` and
`qualiteacher.protos` are the checkout's top-level `services/`, `pipelines/` and `protos/`,
installed under this package by setuptools' package-dir (pyproject.toml)."""

from pathlib import Path as _Path

# A source checkout run without an install (`ray job submit --working-dir .` ships one, and its
# `qualiteacher/` shadows the image's installed copy): let the subpackages resolve to the
# top-level folders beside this one. An installed copy has no such folders and adds nothing.
_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "protos" / "bank_entry.proto").is_file() and (_ROOT / "services" / "__init__.py").is_file():
    __path__.append(str(_ROOT))
del _Path, _ROOT
