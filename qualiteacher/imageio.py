"""Image I/O that survives real-world files.

Boundary convention: images are numpy ``uint8`` arrays of shape ``HxWx3`` in RGB order;
inside the model they are ``float32`` tensors in [0, 1], ``Nx3xHxW``.

Decisions made once here so the rest of the code never sees odd inputs:

* EXIF orientation is applied, so pixels come back the way a viewer shows them.
* Transparency (RGBA, LA, PA, palette with ``transparency``) is composited on **white**
  rather than dropped: pixels under alpha 0 often hold arbitrary colours (black, stale
  data), and restoration models should see what a viewer shows.
* 16-bit greyscale (modes ``I;16*``/``I``) is scaled by 1/257 and rounded, so 65535 maps to
  255 and 32896 to 128. 16-bit RGB PNGs are reduced to 8 bit by Pillow itself (high byte).
* CMYK (including Adobe's inverted CMYK JPEGs) goes through Pillow's CMYK->RGB formula;
  embedded ICC profiles are ignored and pixel values are taken as sRGB.
* Multi-frame files (GIF, TIFF) yield their first frame.
* Truncated or corrupt data is an error, never a silently grey-filled image: decoding is
  forced with ``load()`` while Pillow's ``LOAD_TRUNCATED_IMAGES`` is held off.
* Decompression bombs are rejected from the header, before any pixel is decoded. The
  effective limit is ``min(max_pixels, PIL.Image.MAX_IMAGE_PIXELS)``: Pillow's own guard
  is turned from a warning into an error (Pillow may still print its warning first).
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from qualiteacher.fileio import atomic_write

if TYPE_CHECKING:  # torch is imported lazily: data-only processes skip its ~1.5 s import
    import torch

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
DEFAULT_MAX_PIXELS = 64_000_000

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# State for _strict_pillow: how many decodes are running and the flag they displaced.
_FLAG_LOCK = threading.Lock()
_strict_users = 0
_saved_truncated_flag = False


class ImageReadError(ValueError):
    """An image could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")


# --------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read any supported image file as a ``uint8`` HxWx3 RGB array.

    Raises ``ImageReadError`` for missing files, directories, empty or non-image files,
    truncated or corrupt data, unsupported modes and images over ``max_pixels``.
    """
    path = Path(path)
    _check_file(path)
    try:
        with _strict_pillow(), Image.open(path) as img:
            return _decode(img, path, max_pixels)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"decompression bomb refused by Pillow ({exc})") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageReadError(path, f"decompression bomb refused ({exc})") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # Pillow reports truncation/corruption as OSError, SyntaxError or ValueError.
        raise ImageReadError(path, f"corrupt or truncated image data ({exc})") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not a file")
    if not path.is_file():
        # FIFOs and devices would block or stream forever.
        raise ImageReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")


@contextmanager
def _strict_pillow() -> Iterator[None]:
    """Hold Pillow's process-wide ``LOAD_TRUNCATED_IMAGES`` off while any of our decodes runs.

    Reference-counted rather than one big lock, so concurrent reads in threads still decode
    in parallel (Pillow releases the GIL); the caller's value is restored by the last one out.
    """
    global _strict_users, _saved_truncated_flag
    with _FLAG_LOCK:
        if _strict_users == 0:
            _saved_truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
        _strict_users += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _FLAG_LOCK:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated_flag


def _decode(img: Image.Image, path: Path | str, max_pixels: int) -> np.ndarray:
    """Check size from the header, force a full decode, then normalise to RGB uint8."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageReadError(path, f"invalid size {width}x{height}")
    limit = max_pixels if Image.MAX_IMAGE_PIXELS is None else min(max_pixels, Image.MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise ImageReadError(
            path, f"{width}x{height} = {width * height} pixels exceeds the limit of {limit} (decompression bomb?)"
        )
    img.load()  # header parsing is lazy: this is where truncated data shows up
    img = _apply_orientation(img, path)
    return _to_rgb_array(img, path)


def _apply_orientation(img: Image.Image, path: Path | str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block should not cost the pixels
        warnings.warn(f"{path}: ignoring unreadable EXIF orientation ({exc})", stacklevel=3)
        return img


def _to_rgb_array(img: Image.Image, path: Path | str) -> np.ndarray:
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    if mode == "F":
        raise ImageReadError(path, "32-bit float images have no defined display range")
    try:
        return np.array(img.convert("RGB"))  # np.array, not asarray: callers get a writable copy
    except ValueError as exc:
        raise ImageReadError(path, f"unsupported image mode {mode!r} ({exc})") from None


def _sixteen_bit_to_rgb(img: Image.Image) -> np.ndarray:
    # Scale (not clip) so the full 16-bit range maps onto 0..255: v8 = round(v16 / 257).
    values = np.asarray(img).astype(np.float64)
    if img.mode == "I":  # 32-bit container; PNG/TIFF store 16-bit data in it
        values = np.clip(values, 0, 65535)
    gray = np.rint(values / 257.0).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- tensors


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """``uint8`` HxWx3 RGB -> float32 1x3xHxW tensor in [0, 1]."""
    import torch

    _check_rgb_uint8(img)
    if not (img.flags.writeable and img.flags.c_contiguous):
        img = np.array(img)  # torch.from_numpy warns on read-only memory
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """3xHxW or 1x3xHxW tensor in [0, 1] -> ``uint8`` HxWx3 (clamped, rounded; NaN -> 0)."""
    import torch

    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"expected a batch of one image, got shape {tuple(t.shape)}")
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected 3xHxW or 1x3xHxW, got shape {tuple(t.shape)}")
    t = torch.nan_to_num(t.detach().float().cpu(), nan=0.0).clamp_(0.0, 1.0)
    return t.mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _check_rgb_uint8(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {desc}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image has an empty dimension: {img.shape}")


# --------------------------------------------------------------------------- PNG bytes / files


def encode_png(img: np.ndarray, compress_level: int = 6) -> bytes:
    """Lossless PNG bytes of a ``uint8`` HxWx3 RGB array (safe to store, no pickle)."""
    _check_rgb_uint8(img)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Inverse of ``encode_png``; only PNG is accepted, errors name ``<png bytes>``."""
    name = "<png bytes>"
    if not data:
        raise ImageReadError(name, "no data (0 bytes)")
    try:
        with _strict_pillow(), Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            return _decode(img, name, max_pixels)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not PNG data") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(name, f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageReadError(name, f"corrupt or truncated PNG data ({exc})") from None


def write_png(path: str | os.PathLike[str], img: np.ndarray) -> Path:
    """Write ``img`` as PNG atomically: readers see the old file or the new one, never half."""
    data = encode_png(img)
    return atomic_write(path, lambda fh: fh.write(data))


# --------------------------------------------------------------------------- folders


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly in ``folder`` (not recursive), sorted by name.

    Extensions are matched case-insensitively; hidden files (``.name``, e.g. macOS ``._x.jpg``
    resource forks or our own temp files) are skipped.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {str(folder)!r} is not a directory")
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
