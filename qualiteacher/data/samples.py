"""Sample images bundled with scikit-image, and small task data sets built from them.

No real-world restoration data set can be downloaded here, so the natural photos that ship
inside the scikit-image wheel (no network, no pooch) serve as clean images and the
degradations of ``qualiteacher.data.degradations`` make the inputs.

Split used by ``make_task_sets`` (documented here because results depend on it):

* source images are ordered by a SHA-256 of their name, independent of ``seed`` and of the
  scikit-image version's listing order; the first ``n_test`` are held out for ``test``, the
  rest alternate between ``paired`` and ``unpaired``, so no source image (hence no crop of
  it) appears in two splits;
* each source image gives ``crops_per_image`` random square crops (side 50-100 % of its
  short side, resized to ``size``): only ~10 photos exist, crops multiply the samples;
* ``paired`` inputs use the ``paired`` degradation ranges, ``unpaired`` and ``test`` inputs
  the shifted ``unpaired`` ranges: the test set measures restoration on the "real" domain,
  which is what training on unpaired data is for. ``unpaired`` has no targets on disk.

``test_split="regions"`` holds out no photo: each unpaired photo is cut in two halves along
its longer side, the unpaired crops come from the first half and the test crops
(``<name>_t<k>``) from the second. The test set then shares the unpaired set's photos (their
colours, their kind of scene) without sharing a pixel: what a real data set's train/test
split looks like, where ten held-out photos are too few to share a distribution.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from qualiteacher.data.degradations import degrade, file_seed, task_params
from qualiteacher.imageio import list_images, write_png

_log = logging.getLogger(__name__)

# Natural photos shipped in the scikit-image wheel itself (loading needs no download).
_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skdata.astronaut,
    "camera": skdata.camera,  # greyscale: exercises the conversion to RGB
    "chelsea": skdata.chelsea,
    "coffee": skdata.coffee,
    "hubble_deep_field": skdata.hubble_deep_field,
    "immunohistochemistry": skdata.immunohistochemistry,
    "motorcycle_left": lambda: skdata.stereo_motorcycle()[0],
    "motorcycle_right": lambda: skdata.stereo_motorcycle()[1],
    "retina": skdata.retina,
    "rocket": skdata.rocket,
}

SPLITS: tuple[str, ...] = ("paired/input", "paired/target", "unpaired/input", "test/input", "test/target")
# The unpaired set's clean images: never read by training, written only for experiments
# that need hidden ground truth of the training inputs (an oracle scorer).
HIDDEN_SPLIT = "unpaired/target"


def sample_names() -> list[str]:
    """Names of the sample photos that load offline in the installed scikit-image."""
    return list(_available())


@cache
def _available() -> tuple[str, ...]:
    names = []
    for name in sorted(_LOADERS):
        try:
            _LOADERS[name]()
        except Exception as exc:  # noqa: BLE001 - e.g. a future version moving a file to pooch
            _log.debug("sample %s unavailable offline: %s", name, exc)
            continue
        names.append(name)
    return tuple(names)


def load_sample(name: str) -> np.ndarray:
    """One sample photo as ``uint8`` HxWx3 RGB (greyscale replicated, alpha dropped)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown sample {name!r}; available: {', '.join(sample_names())}")
    img = np.asarray(_LOADERS[name]())
    if img.dtype != np.uint8:
        raise ValueError(f"sample {name!r} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def square_resize(img: np.ndarray, size: int, box: tuple[int, int, int] | None = None) -> np.ndarray:
    """Crop the square ``box = (top, left, side)`` (default: centred, full short side) and
    resize it to ``size`` x ``size`` with an antialiasing filter."""
    h, w = img.shape[:2]
    if box is None:
        side = min(h, w)
        box = ((h - side) // 2, (w - side) // 2, side)
    top, left, side = box
    crop = Image.fromarray(img[top : top + side, left : left + side])
    return np.array(crop.resize((size, size), Image.Resampling.LANCZOS))  # writable


def write_samples(out_dir: str | os.PathLike[str], size: int | None = None) -> list[Path]:
    """Write every sample as ``out_dir/<name>.png``, centre-cropped to ``size`` if given."""
    out_dir = Path(out_dir)
    paths = []
    for name in sample_names():
        img = load_sample(name)
        if size is not None:
            img = square_resize(img, size)
        paths.append(write_png(out_dir / f"{name}.png", img))
    return paths


TEST_SPLITS = ("photos", "regions")


def split_names(n_test: int) -> dict[str, list[str]]:
    """Deterministic, seed-independent assignment of source images to splits (``n_test=0``:
    none held out, for ``test_split="regions"``)."""
    names = sorted(sample_names(), key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    if not 0 <= n_test <= len(names) - 2:
        raise ValueError(f"n_test must be in [0, {len(names) - 2}] with {len(names)} sample images, got {n_test}")
    rest = names[n_test:]
    return {"test": names[:n_test], "paired": rest[0::2], "unpaired": rest[1::2]}


def _random_crops(img: np.ndarray, size: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    h, w = img.shape[:2]
    crops = []
    for _ in range(count):
        side = max(1, int(rng.uniform(0.5, 1.0) * min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crops.append(square_resize(img, size, (top, left, side)))
    return crops


def photo_half(img: np.ndarray, half: int) -> np.ndarray:
    """The first (0) or second (1) half of a photo, cut across its longer side."""
    h, w = img.shape[:2]
    if h > w:
        return img[: h // 2] if half == 0 else img[h // 2 :]
    return img[:, : w // 2] if half == 0 else img[:, w // 2 :]


def source_crops(name: str, group: str, seed: int, size: int, count: int,
                 half: int | None = None) -> list[np.ndarray]:
    """The clean crops ``<name>_0 .. <name>_<count-1>`` that ``make_task_sets`` draws from one
    source photo (or one ``half`` of it) for ``group``, at ``size`` px. The crop boxes do not
    depend on ``size``, so other sizes give the same content resampled from the photo (used by
    the metric audit)."""
    crop_rng = np.random.default_rng(file_seed(seed, name, "crops", group))
    img = load_sample(name)
    return _random_crops(img if half is None else photo_half(img, half), size, count, crop_rng)


def _split_plan(n_test: int, test_split: str) -> list[tuple[str, str, str, int | None]]:
    """(group, domain, photo, half) for every photo of every split; the module docstring
    says why."""
    if test_split not in TEST_SPLITS:
        raise ValueError(f"test_split must be one of {', '.join(TEST_SPLITS)}, got {test_split!r}")
    if test_split == "photos":
        groups = split_names(n_test)
        return [(group, domain, name, None) for group, domain in
                (("paired", "paired"), ("unpaired", "unpaired"), ("test", "unpaired")) for name in groups[group]]
    groups = split_names(0)
    return ([("paired", "paired", name, None) for name in groups["paired"]]
            + [(group, "unpaired", name, half) for half, group in enumerate(("unpaired", "test"))
               for name in groups["unpaired"]])


def test_photo_count(n_test: int, test_split: str) -> int:
    """How many source photos the test set is cut from (each gives ``crops_per_image`` images)."""
    return sum(group == "test" for group, *_ in _split_plan(n_test, test_split))


def make_task_sets(
    task: str,
    out_dir: str | os.PathLike[str],
    seed: int,
    size: int = 128,
    n_test: int = 2,
    crops_per_image: int = 4,
    overwrite: bool = False,
    hidden_targets: bool = False,
    test_split: str = "photos",
) -> dict[str, Path]:
    """Build ``paired/{input,target}``, ``unpaired/input`` and ``test/{input,target}`` under
    ``out_dir`` for ``task`` (see the module docstring for the split).

    Files are ``<sample>_<k>.png``; input and target share the name. Each input's rng is
    seeded like ``degrade_folder``'s, so ``degrade_folder(task, seed, paired/target, d)``
    reproduces ``paired/input``. Existing images in these folders are an error unless
    ``overwrite``, which deletes them first (stale files would leak into the sets).
    Returns the folder of each split, keyed by the names in ``SPLITS``; with
    ``hidden_targets`` also ``HIDDEN_SPLIT``, the clean images of the unpaired inputs.
    ``test_split="regions"`` ignores ``n_test`` (see the module docstring).
    """
    task_params(task)  # validate the task name before writing anything
    if size < 8 or crops_per_image < 1:
        raise ValueError(f"need size >= 8 and crops_per_image >= 1, got {size} and {crops_per_image}")
    dirs = {split: Path(out_dir) / split for split in SPLITS + ((HIDDEN_SPLIT,) if hidden_targets else ())}
    _prepare_dirs(dirs.values(), overwrite)
    for group, domain, name, half in _split_plan(n_test, test_split):
        # a held-out half's crops get their own names: same names would also share degradations
        tag = "t" if half == 1 else ""
        for k, clean in enumerate(source_crops(name, group, seed, size, crops_per_image, half)):
            fname = f"{name}_{tag}{k}.png"
            rng = np.random.default_rng(file_seed(seed, fname, task, domain))
            write_png(dirs[f"{group}/input"] / fname, degrade(clean, task, rng, domain))
            if f"{group}/target" in dirs:
                write_png(dirs[f"{group}/target"] / fname, clean)
    return dirs


def _prepare_dirs(dirs: Iterable[Path], overwrite: bool) -> None:
    for d in dirs:
        existing = list_images(d) if d.is_dir() else []
        if existing and not overwrite:
            raise FileExistsError(f"{d} already holds {len(existing)} images; pass overwrite=True to replace them")
        for path in existing:
            path.unlink()
        d.mkdir(parents=True, exist_ok=True)
