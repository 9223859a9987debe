"""`qualiteacher weights download`: fetch the network metrics' files, checksum-checked.

Nothing downloads at run time; this is the explicit set-up step. Each file's URL is read from
the installed package that would fetch it itself (pyiqa's `default_model_urls`, the CLIP table
pyiqa's CLIP-IQA loads from, torchvision's weights enum), never copied into this project, so an
upgrade of pyiqa moves the plan with it, and a file name the registry does not expect stops
the plan instead of landing where no loader looks.

The checksum comes from that same record: torch hub's `name-<sha256 prefix>.ext` or OpenAI
CLIP's `.../<sha256>/RN50.pt`. A mirror therefore serves bytes but cannot choose them.

Mirror layout (`--mirror URL` or $QUALITEACHER_WEIGHTS_MIRROR): flat, each file under its own
name, `<mirror>/<file name>` (e.g. `<mirror>/RN50.pt`); `qualiteacher weights status` lists
the names. Any HTTP(S) server over a folder of those files is one.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import quote, urlparse

from qualiteacher.fileio import atomic_write
from qualiteacher.iqa.registry import METRICS
from qualiteacher.iqa.weights import read_manifest, sha256_file, write_manifest

MIRROR_ENV = "QUALITEACHER_WEIGHTS_MIRROR"
TIMEOUT_S = (15, 60)  # connect, and between two reads: a stalled transfer fails instead of hanging
CHUNK = 1 << 20

# Where the installed packages record each downloadable file's URL: (module, table, key).
# The keys are the ones the metrics use as the registry builds them (pyiqa's defaults).
ORIGINS: dict[str, tuple[str, str, str]] = {
    "musiq": ("pyiqa.archs.musiq_arch", "default_model_urls", "koniq10k"),
    "clipiqa": ("pyiqa.archs.clip_model", "_MODELS", "RN50"),
    "topiq_nr": ("pyiqa.archs.topiq_arch", "default_model_urls", "cfanet_nr_koniq_res50"),
    "vgg19": ("torchvision.models", "VGG19_Weights", "IMAGENET1K_V1"),  # the perceptual loss
}


class DownloadError(RuntimeError):
    """A file could not be fetched or was refused; one line naming the file and the URL."""


@dataclass(frozen=True)
class PlannedFile:
    name: str  # metric, or "vgg19" for the perceptual loss
    relpath: str  # inside the weights folder (torch hub's layout)
    url: str  # where the installed package says the file lives
    sha256: str  # expected sha256: whole, or the prefix a torch hub file name carries

    @property
    def filename(self) -> str:
        return PurePosixPath(self.relpath).name

    def source(self, mirror: str | None = None) -> str:
        return f"{mirror.rstrip('/')}/{quote(self.filename)}" if mirror else self.url


def mirror_from_env(mirror: str | None = None) -> str | None:
    """--mirror wins over the environment; an empty value means none (compose, ConfigMaps)."""
    return mirror or os.environ.get(MIRROR_ENV) or None


# ---- the plan ----
def url_from_package(module: str, table: str, key: str) -> str:
    entry = getattr(importlib.import_module(module), table)[key]
    return entry if isinstance(entry, str) else entry.url  # torchvision's Weights enum member


def expected_sha256(url: str) -> str:
    """The checksum a URL carries: CLIP's full sha256 folder, else torch hub's name suffix."""
    import torch.hub

    parts = urlparse(url).path.split("/")
    if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{64}", parts[-2]):
        return parts[-2]
    match = torch.hub.HASH_REGEX.search(parts[-1])
    if match and len(match.group(1)) >= 8:
        return match.group(1)
    raise DownloadError(f"{url} carries no checksum in its name or path; refusing to fetch it unchecked")


def _target(name: str) -> str:
    if name == "vgg19":
        from qualiteacher.losses.perceptual import vgg19_weights_path

        return vgg19_weights_path(Path()).as_posix()  # relative: hub/checkpoints/<file>
    return METRICS[name].files[0].relpath


def build_plan(names: Iterable[str] | None = None) -> list[PlannedFile]:
    """What a download fetches, read from the installed packages (needs no network)."""
    names = list(names) if names else list(ORIGINS)
    unknown = [n for n in names if n not in ORIGINS]
    if unknown:
        raise ValueError(f"nothing to download for {', '.join(unknown)}; downloadable: {', '.join(ORIGINS)} "
                         "(brisque and niqe come from `qualiteacher weights prepare`, piqe needs no file)")
    plan = []
    for name in names:
        module, table, key = ORIGINS[name]
        try:
            url = url_from_package(module, table, key)
        except (ImportError, AttributeError, KeyError) as exc:  # an installed package changed its table
            raise DownloadError(f"cannot read {name}'s URL from {module}.{table}[{key!r}]: {exc!r}") from None
        relpath = _target(name)
        if PurePosixPath(urlparse(url).path).name != PurePosixPath(relpath).name:
            raise DownloadError(f"{module}.{table}[{key!r}] is {url}, but the loader looks for {relpath}: "
                                "the installed package and qualiteacher/iqa/registry.py disagree")
        plan.append(PlannedFile(name, relpath, url, expected_sha256(url)))
    return plan


def file_state(item: PlannedFile, weights_dir: Path) -> str:
    """present (checksum matches), missing, or checksum mismatch."""
    path = weights_dir / item.relpath
    if not path.is_file():
        return "missing"
    return "present" if sha256_file(path).startswith(item.sha256) else "checksum mismatch"


# ---- the transfer ----
class _Refused(Exception):
    """Why a transfer was refused; `_fetch` adds the file and the URL."""


def _root_cause(exc: BaseException) -> str:
    # requests wraps urllib3 wraps the socket error; the innermost one says what happened.
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return str(exc) or type(exc).__name__


def _reason(exc: Exception) -> str:
    import requests

    if isinstance(exc, requests.HTTPError):
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect ({_root_cause(exc)})"
    return str(exc)


def _stream(response, fh: IO[bytes], item: PlannedFile, progress: bool) -> None:
    """Copy the body into fh, hashing as it goes; refuse a short body or a wrong checksum."""
    import requests
    from tqdm import tqdm

    total = int(response.headers["Content-Length"]) if "Content-Length" in response.headers else None
    digest, size = hashlib.sha256(), 0
    with tqdm(total=total, desc=item.filename, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=not progress, leave=False) as bar:
        try:
            for chunk in response.iter_content(CHUNK):
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        except requests.exceptions.ChunkedEncodingError as exc:  # urllib3 counts what a chunk lost
            raise _Refused(f"connection closed before the end ({_root_cause(exc)})") from None
    if total is not None and size != total:  # in case the HTTP library did not check
        raise _Refused(f"connection closed after {size} of {total} bytes")
    if not digest.hexdigest().startswith(item.sha256):
        raise _Refused(f"sha256 {digest.hexdigest()} does not match the expected {item.sha256}")
    os.fchmod(fh.fileno(), 0o644)  # every Ray worker's user reads it (the temp file starts as 0600)


def _fetch(url: str, item: PlannedFile, target: Path, progress: bool) -> None:
    """Stream url into target through a temp file beside it; on any failure nothing is left."""
    import requests

    try:
        # identity: the byte count and the hash are of the file itself, not of a gzip of it
        with requests.get(url, stream=True, timeout=TIMEOUT_S, headers={"Accept-Encoding": "identity"}) as r:
            r.raise_for_status()
            atomic_write(target, lambda fh: _stream(r, fh, item, progress))
    except (requests.RequestException, _Refused) as exc:
        raise DownloadError(f"cannot download {item.filename} from {url}: {_reason(exc)}") from None


def _record(weights_dir: Path, item: PlannedFile, url: str) -> None:
    manifest = read_manifest(weights_dir)
    manifest[item.relpath] = {
        "metric": item.name,
        "sha256": sha256_file(weights_dir / item.relpath),
        "source": url,
        "origin": item.url,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_manifest(weights_dir, manifest)


def download(plan: Iterable[PlannedFile], weights_dir: Path, mirror: str | None = None,
             log: Callable[[str], None] = print, progress: bool | None = None) -> list[Path]:
    """Fetch every file of the plan that is not already in place with its checksum; stop at the
    first failure (DownloadError). Returns the paths of the plan's files."""
    from filelock import FileLock

    progress = sys.stderr.isatty() if progress is None else progress
    weights_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # Pods that start together on one shared folder take turns: the first fetches, the rest
    # find the files in place. (Without working locks the renames still keep every file whole.)
    with FileLock(weights_dir / ".download.lock"):
        for item in plan:
            target = weights_dir / item.relpath
            paths.append(target)
            state = file_state(item, weights_dir)
            if state == "present":
                log(f"{item.name}: ready ({target})")
                continue
            url = item.source(mirror)
            _fetch(url, item, target, progress)
            _record(weights_dir, item, url)
            replaced = " (replaced a file whose checksum did not match)" if state != "missing" else ""
            log(f"{item.name}: fetched {target} from {url}, sha256 checked{replaced}")
    return paths
