"""Evaluate restored images: NR metrics and ensemble, plus PSNR/SSIM against ground truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from qualiteacher.imageio import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    list_images,
    read_image,
)
from qualiteacher.iqa.ensemble import IQAEnsemble
from qualiteacher.scoring import score_files


def reference_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM on uint8 RGB images of the same size."""
    if pred.shape != gt.shape:
        raise ValueError(f"size {pred.shape[1]}x{pred.shape[0]} differs from ground truth {gt.shape[1]}x{gt.shape[0]}")
    psnr = peak_signal_noise_ratio(gt, pred, data_range=255)
    ssim = structural_similarity(gt, pred, data_range=255, channel_axis=2)
    return {"psnr": float(psnr) if math.isfinite(psnr) else 100.0, "ssim": float(ssim)}


def evaluate_folder(pred_dir: Path, ensemble: IQAEnsemble, gt_dir: Path | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False) -> dict:
    """{"per_image": [...], "mean": {...}, "failed": n}; bad files are reported, not fatal.
    `progress`: a bar on stderr while the images are scored."""
    paths = list_images(pred_dir)
    rows = score_files(paths, ensemble, max_pixels=max_pixels, progress=progress)
    for row, path in zip(rows, paths):
        if gt_dir is None or "error" in row:
            continue
        gt_path = gt_dir / path.name
        if not gt_path.exists():
            row["error"] = f"{path}: no ground truth named {path.name} in {gt_dir}"
            continue
        try:
            row.update(reference_scores(read_image(path, max_pixels), read_image(gt_path, max_pixels)))
        except (ImageReadError, ValueError) as exc:
            row["error"] = f"{path}: {exc}"
    return {"per_image": rows, "mean": _means(rows), "failed": sum("error" in r for r in rows)}


def _means(rows: list[dict]) -> dict:
    good = [r for r in rows if "error" not in r]
    if not good:
        return {}
    mean: dict = {"count": len(good), "ensemble": float(np.mean([r["ensemble"] for r in good]))}
    for group in ("raw", "normalized"):
        mean[group] = {m: float(np.mean([r[group][m] for r in good])) for m in good[0][group]}
    for key in ("psnr", "ssim"):
        if all(key in r for r in good):
            mean[key] = float(np.mean([r[key] for r in good]))
    return mean
