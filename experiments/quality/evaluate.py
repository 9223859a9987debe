"""Scoring restored folders: PSNR / SSIM against hidden ground truth, the NR ensemble, the
controllability sweep and its Spearman rho, the comparisons of a task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.quality.targets import TARGET_SPEARMAN


def evaluate(folder: Path, ensemble, gt_dir: Path | None) -> dict:
    """Per-image and mean PSNR / SSIM (against ``gt_dir``) and NR ensemble of a folder.

    An image the NR metrics cannot score (pyiqa's NIQE / BRISQUE are undefined on flat or
    some strongly patterned images) gets ``ensemble`` NaN and its reason in ``nr_error``;
    it still counts for PSNR / SSIM. ``ensemble`` is the mean over the scored images and
    ``nr_failed`` how many were not; comparisons use only images scored on both sides.
    """
    from qualiteacher.evaluation import evaluate_folder, reference_scores
    from qualiteacher.imageio import read_image

    result = evaluate_folder(folder, ensemble, None)
    per_image = []
    for row in result["per_image"]:
        name = Path(row["file"]).name
        item: dict = {"file": name}
        if "error" in row:
            item["ensemble"] = float("nan")
            item["nr_error"] = row["error"]
        else:
            item["ensemble"] = float(row["ensemble"])
            item["normalized"] = row["normalized"]
            item["raw"] = row["raw"]
        if gt_dir is not None:
            item.update(reference_scores(read_image(folder / name), read_image(gt_dir / name)))
        per_image.append(item)
    if not per_image:
        raise RuntimeError(f"no images in {folder}")
    scored = [i for i in per_image if np.isfinite(i["ensemble"])]
    out: dict = {"count": len(per_image), "nr_failed": len(per_image) - len(scored),
                 "ensemble": float(np.mean([i["ensemble"] for i in scored])) if scored else float("nan"),
                 "normalized": {m: float(np.mean([i["normalized"][m] for i in scored])) for m in scored[0]["normalized"]}
                 if scored else {},
                 "folder": str(folder)}
    if gt_dir is not None:
        out["psnr"] = float(np.mean([i["psnr"] for i in per_image]))
        out["ssim"] = float(np.mean([i["ssim"] for i in per_image]))
    out["per_image"] = per_image
    return out


def common_nr_mean(result: dict, names: set[str]) -> float:
    """Mean NR ensemble of ``result`` over the images named in ``names``."""
    values = [i["ensemble"] for i in result["per_image"] if i["file"] in names]
    return float(np.mean(values)) if values else float("nan")


def scored_names(*results: dict) -> set[str]:
    """Images with a finite NR ensemble in every one of ``results``."""
    sets = [{i["file"] for i in r["per_image"] if np.isfinite(i["ensemble"])} for r in results]
    return set.intersection(*sets) if sets else set()


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman's rho and its p-value; rho is NaN when either side is constant."""
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: reported as NaN instead
        res = spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": rho, "p_value": p}


def calibrated_sweep(sweep: list[dict], common: set[str], ensemble, run_dir: Path) -> dict | None:
    """The sweep's NR ensemble on the scale the condition was trained on: the run's fitted
    ranges (its calibration.json). Secondary: the target uses the fixed ranges above, like
    every other NR number of the report. Adds ``ensemble_calibrated`` to each point."""
    import torch

    from qualiteacher.calibration import Calibration
    from qualiteacher.run_dir import RunDir

    path = RunDir(run_dir).calibration
    if not path.exists() or not common:
        return None
    fitted = ensemble.with_ranges(Calibration.load(path).ranges)
    for point in sweep:
        values = []
        for item in point["per_image"]:
            if item["file"] in common:
                raw = {m: torch.tensor([v]) for m, v in item["raw"].items()}
                values.append(float(fitted.combine(fitted.normalize(raw))[0]) * 10)
        point["ensemble_calibrated"] = float(np.mean(values))
    curve = [p["ensemble_calibrated"] for p in sweep]
    return spearman([p["score"] for p in sweep], curve) | {"ranges": {k: list(v) for k, v in fitted.ranges.items()}}


def controllability(checkpoint: Path, sets: dict[str, Path], ensemble, folder_stem: Path,
                    scores: Sequence[float], run_dir: Path) -> tuple[list[dict], dict]:
    """Restore the test set at every condition in ``scores`` (into ``<folder_stem>_<score>``)
    and evaluate: (one point per condition, Spearman rho between condition and NR ensemble).

    The curve uses the images that every condition's output could be scored on, so each
    point averages the same images.
    """
    from qualiteacher.pipelines.restore import restore_folder

    test_in, test_gt = sets["test/input"], sets["test/target"]
    sweep = []
    for score in scores:
        folder = folder_stem.with_name(f"{folder_stem.name}_{score:g}")
        restore_checked(restore_folder, checkpoint, test_in, folder, score)
        sweep.append(evaluate(folder, ensemble, test_gt) | {"score": score})
    common = scored_names(*sweep)
    for point in sweep:
        point["ensemble_scored"] = point["ensemble"]  # mean over this condition's own scored images
        point["ensemble"] = common_nr_mean(point, common)
        point["images"] = len(common)
        point.pop("normalized", None)
        point.pop("folder", None)
    xs = [s["score"] for s in sweep]
    rho = spearman(xs, [s["ensemble"] for s in sweep]) if common else {"rho": float("nan"), "p_value": float("nan")}
    per_image_rho = [spearman(xs, [next(i["ensemble"] for i in s["per_image"] if i["file"] == name)
                                   for s in sweep])["rho"] for name in sorted(common)]
    finite = [r for r in per_image_rho if np.isfinite(r)]
    rho["per_image_median"] = float(np.median(finite)) if finite else float("nan")
    rho["images"] = len(common)
    rho["met"] = bool(np.isfinite(rho["rho"]) and rho["rho"] >= TARGET_SPEARMAN)
    rho["calibrated"] = calibrated_sweep(sweep, common, ensemble, run_dir)
    return sweep, rho


def compare_methods(methods: dict[str, dict]) -> tuple[dict, bool]:
    """QualiTeacher @7 minus teacher and minus baseline, in PSNR and NR ensemble (the NR
    means over the images both sides could score; ``images`` says how many)."""
    qt = methods["qualiteacher"]
    comparisons = {}
    for other in ("teacher", "baseline"):
        margin = qt["psnr"] - methods[other]["psnr"]
        comparisons[f"psnr_vs_{other}"] = {"qualiteacher": qt["psnr"], other: methods[other]["psnr"],
                                           "margin": margin, "won": bool(margin > 0), "images": qt["count"]}
        names = scored_names(qt, methods[other])
        a, b = common_nr_mean(qt, names), common_nr_mean(methods[other], names)
        margin = a - b
        comparisons[f"ensemble_vs_{other}"] = {"qualiteacher": a, other: b, "margin": margin,
                                               "won": bool(np.isfinite(margin) and margin > 0), "images": len(names)}
    return comparisons, all(c["won"] for c in comparisons.values())


def restore_checked(restore_folder, checkpoint: Path, in_dir: Path, out_dir: Path, score: float) -> None:
    results = restore_folder(checkpoint, in_dir, out_dir, score=score)
    failed = [(str(p), e) for p, e in results if e is not None]
    if failed:
        raise RuntimeError(f"restoring {in_dir} with {checkpoint} at score {score:g} failed: {failed[:3]}")
