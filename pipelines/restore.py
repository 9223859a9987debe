"""Restore a folder of images with a trained model, at a chosen quality condition.

    qualiteacher restore --checkpoint runs/x --score 7 IN_DIR OUT_DIR

``--checkpoint`` is what a job writes: a run folder (the checkpoint its ``summary.json``
names, the newest ``runs/x/ray_train/student/checkpoint_*/``), one of those training-state
folders, or a model file such as the stage-1 teacher ``runs/x/pretrain.pt``.

Every image of IN_DIR becomes ``OUT_DIR/<stem>.png``. Unreadable inputs and outputs with
NaN/Inf are reported (file and reason) and skipped; the others are still written. The
command (`pipelines/cli.py`) exits 0 when all are restored, 1 when some files failed, 2 on bad
usage or a bad checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from qualiteacher.checkpoint import load_restorer
from qualiteacher.device import resolve_device
from qualiteacher.imageio import (
    ImageReadError,
    list_images,
    read_image,
    to_tensor,
    to_uint8,
    write_png,
)
from qualiteacher.models.injection import pad_to_multiple
from qualiteacher.progress import each

Result = tuple[Path, str | None]
_MIN_TILE = 32


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def restore_tensor(model: nn.Module, x: Tensor, score: float, tile: int | None = None) -> Tensor:
    """``model(x, score)``; with ``tile``, over overlapping tiles averaged where they overlap.

    Tiling bounds memory on large images. Tile positions are multiples of the model's
    ``pad_multiple`` (its total downsampling) so each tile sees the same sampling grid as
    the whole image; results still differ slightly near seams (less context there, and
    NAFNet's channel attention pools over the tile rather than the image).
    """
    h, w = x.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return model(x, score)
    m = int(getattr(model, "pad_multiple", 1))
    tile = max(m, tile - tile % m)
    overlap = min(32, tile // 4)
    overlap -= overlap % m
    xp = pad_to_multiple(x, m)  # the zero padding the model would add to the whole image
    out = torch.zeros_like(xp)
    weight = torch.zeros_like(xp[:, :1])
    for top in _starts(xp.shape[-2], tile, tile - overlap):
        for left in _starts(xp.shape[-1], tile, tile - overlap):
            window = (..., slice(top, top + tile), slice(left, left + tile))
            out[window] += model(xp[window], score)
            weight[window] += 1.0
    return (out / weight)[..., :h, :w]


def _output_name(path: Path, used: dict[str, Path]) -> str:
    """``<stem>.png``; when two inputs share a stem (a.jpg, a.png) the later one keeps its
    full name (``a.jpg.png``) instead of overwriting the earlier output."""
    name = f"{path.stem}.png"
    return name if name not in used else f"{path.name}.png"


def restore_folder(
    checkpoint: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    score: float = 7.0,
    prefer: Literal["student", "teacher"] = "student",
    tile: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> list[Result]:
    """Restore every image of ``in_dir`` into ``out_dir``; one ``(input, error)`` per input.

    ``error`` is None on success. Raises (before touching any file) for a bad checkpoint,
    score, tile or folder; per-file problems are returned instead. ``progress``: a bar on
    stderr (`qualiteacher.progress`).
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    model, cfg = load_restorer(checkpoint, prefer=prefer)
    _check_args(cfg.score_max, score, tile, in_dir, out_dir)
    dev = resolve_device(device)
    model = model.to(dev)
    paths = list_images(in_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    used: dict[str, Path] = {}
    for path in each(paths, "restoring", progress):
        name = _output_name(path, used)
        error = _restore_one(model, path, out_dir / name, score, tile, dev)
        if error is None:
            used[name] = path
        elif log is not None:
            log(f"failed {path}: {error}")
        results.append((path, error))
    return results


def _check_args(score_max: float, score: float, tile: int | None, in_dir: Path, out_dir: Path) -> None:
    if not 0.0 <= score <= score_max:  # also rejects NaN
        raise ValueError(f"score must be in [0, {score_max}], got {score}")
    if tile is not None and tile < _MIN_TILE:
        raise ValueError(f"tile must be >= {_MIN_TILE} px, got {tile}")
    if out_dir.resolve() == in_dir.resolve():
        raise ValueError(f"output folder {out_dir} is the input folder: outputs would overwrite inputs")


@torch.inference_mode()
def _restore_one(model: nn.Module, path: Path, out_path: Path, score: float,
                 tile: int | None, device: torch.device) -> str | None:
    try:
        x = to_tensor(read_image(path)).to(device)
    except ImageReadError as exc:
        return exc.reason
    y = restore_tensor(model, x, score, tile)
    if not torch.isfinite(y).all():
        return "model output contains NaN/Inf; not written"
    try:
        write_png(out_path, to_uint8(y))
    except OSError as exc:
        return f"cannot write {out_path}: {exc}"
    return None
