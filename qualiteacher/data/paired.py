"""In-memory image sets: paired (input, target) folders and an unpaired folder.

Both load every readable image once as ``uint8`` HxWx3 and keep going past bad files:
each unreadable or unmatched file is recorded in ``.errors`` as ``(path, reason)`` and
skipped. A set with no usable image at all raises, naming the folder(s) and the reasons.
The data sets used here are small (a few hundred images), so memory is not a concern;
larger sets should be streamed instead.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from qualiteacher.data.samples import square_resize
from qualiteacher.imageio import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    list_images,
    read_image,
)

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ID_MAX = 128
_HASH_LEN = 8

FileError = tuple[Path, str]


def _summary(errors: list[FileError], limit: int = 5) -> str:
    shown = "; ".join(f"{p}: {r}" for p, r in errors[:limit])
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return shown + more if errors else "no image files found"


class PairedImages:
    """Input/target pairs matched by file name (``input_dir/a.png`` <-> ``target_dir/a.png``).

    Unmatched files on either side, unreadable files and pairs whose sizes differ are
    reported in ``errors`` and skipped.
    """

    def __init__(
        self,
        input_dir: str | os.PathLike[str],
        target_dir: str | os.PathLike[str],
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.input_dir, self.target_dir = Path(input_dir), Path(target_dir)
        self.names: list[str] = []
        self.inputs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.errors: list[FileError] = []
        self.levels: torch.Tensor | None = None  # per pair, the condition of its target (set by the trainer)
        inputs = {p.name: p for p in list_images(self.input_dir)}
        targets = {p.name: p for p in list_images(self.target_dir)}
        for name in sorted(set(inputs) - set(targets)):
            self.errors.append((inputs[name], f"no target with this name in {self.target_dir}"))
        for name in sorted(set(targets) - set(inputs)):
            self.errors.append((targets[name], f"no input with this name in {self.input_dir}"))
        for name in sorted(set(inputs) & set(targets)):
            self._add(name, inputs[name], targets[name], max_pixels)
        if not self.names:
            raise ValueError(
                f"no usable image pairs in {self.input_dir} / {self.target_dir}: {_summary(self.errors)}"
            )

    def _add(self, name: str, input_path: Path, target_path: Path, max_pixels: int) -> None:
        try:
            x, y = read_image(input_path, max_pixels), read_image(target_path, max_pixels)
        except ImageReadError as exc:
            self.errors.append((Path(exc.path), exc.reason))
            return
        if x.shape != y.shape:
            reason = f"size {x.shape[1]}x{x.shape[0]} differs from its target's {y.shape[1]}x{y.shape[0]}"
            self.errors.append((input_path, reason))
            return
        self.names.append(name)
        self.inputs.append(x)
        self.targets.append(y)

    def __len__(self) -> int:
        return len(self.names)

    def sample_batch(
        self, batch_size: int, crop_size: int, rng: np.random.Generator, with_levels: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Random pairs with the same random crop and horizontal flip on input and target.

        Returns float32 [0, 1] NCHW tensors ``(x, y)`` of side ``crop_size``, and with
        ``with_levels`` each pair's entry of ``levels`` as a third tensor. An image
        smaller than ``crop_size`` is first reflect-padded (evenly on both sides) up to it,
        so tiny images still train without resizing (which would change the degradation's
        scale). Only horizontal flips are used: vertical ones would invert haze depth
        ramps and falling rain/snow.
        """
        if batch_size < 1 or crop_size < 1:
            raise ValueError(f"batch_size and crop_size must be >= 1, got {batch_size}, {crop_size}")
        if with_levels and self.levels is None:
            raise ValueError("paired data has no target levels; set PairedImages.levels first")
        xs, ys = [], []
        index = rng.integers(0, len(self.names), size=batch_size)
        for i in index:
            pair = np.concatenate([self.inputs[i], self.targets[i]], axis=2)  # one crop for both
            crop = _random_crop(_pad_to(pair, crop_size), crop_size, rng)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            xs.append(crop[..., :3])
            ys.append(crop[..., 3:])
        if with_levels:
            return _to_batch(xs), _to_batch(ys), self.levels[torch.from_numpy(index)]
        return _to_batch(xs), _to_batch(ys)


def _pad_to(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad H and W (split evenly) up to at least ``size``."""
    ph, pw = max(0, size - img.shape[0]), max(0, size - img.shape[1])
    if not ph and not pw:
        return img
    # numpy's reflect repeats the reflection when the pad exceeds the image; a 1-pixel
    # side has nothing to reflect, so it falls back to edge.
    mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
    return np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode=mode)


def _random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return img[top : top + size, left : left + size]


def _to_batch(crops: list[np.ndarray]) -> torch.Tensor:
    arr = np.ascontiguousarray(np.stack(crops))
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


# --------------------------------------------------------------------------- unpaired


def sanitise_id(stem: str, original: str, taken: set[str]) -> str:
    """An id matching ``ID_PATTERN`` from a file stem, unique within ``taken``.

    A stem that is already valid and unused is kept as is. Otherwise (characters replaced,
    leading punctuation stripped, truncated, or a collision) a short hash of ``original``
    (the full file name) is appended, so different files never map to the same id.
    """
    if ID_PATTERN.match(stem) and stem not in taken:
        return stem
    base = re.sub(r"[^A-Za-z0-9._-]", "_", stem)
    base = re.sub(r"^[^A-Za-z0-9]+", "", base) or "img"
    digest = hashlib.sha256(original.encode("utf-8", "surrogateescape")).hexdigest()
    for length in (_HASH_LEN, 16, 64):
        suffix = f"-{digest[:length]}"
        candidate = base[: _ID_MAX - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
    raise ValueError(f"cannot derive a unique id for {original!r}")


class UnpairedImages:
    """Every readable image of ``folder``: ``ids`` (see ``sanitise_id``) and ``images``.

    With ``size``, each image is centre-cropped to a square and resized to ``size`` px
    (``square_resize``), so a batch can stack them.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.folder = Path(folder)
        self.ids: list[str] = []
        self.paths: list[Path] = []
        self.images: list[np.ndarray] = []
        self.errors: list[FileError] = []
        taken: set[str] = set()
        for path in list_images(self.folder):
            try:
                img = read_image(path, max_pixels)
            except ImageReadError as exc:
                self.errors.append((path, exc.reason))
                continue
            image_id = sanitise_id(path.stem, path.name, taken)
            taken.add(image_id)
            self.ids.append(image_id)
            self.paths.append(path)
            self.images.append(square_resize(img, size) if size is not None else img)
        if not self.ids:
            raise ValueError(f"no readable images in {self.folder}: {_summary(self.errors)}")

    def __len__(self) -> int:
        return len(self.ids)
