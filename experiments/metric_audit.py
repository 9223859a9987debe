"""Metric audit (issue 15): can each NR metric, and the ensemble, rank restorations of these images?

    python -m experiments.metric_audit [--tasks all] [--metrics brisque,niqe,piqe] [--pretrain-steps 300] \
        [--n-test 3] [--crops-per-image 8] [--out runs/metric_audit] [--fast]

No student is trained. Per task (snow, rain, haze, lowlight, underwater) the sets are made
with ``make_task_sets`` and a stage-1 teacher is pretrained on the paired set (the budget of
``configs/quality_budget.yaml``); then, on the held-out test set, whose ground truth the
metrics never see, every metric and the ensemble are read on two scales: the registry's
ranges and the ranges calibrated as a training run fits them (`calibrated_ranges`); the
rankings of single metrics also on their raw, never clipped, scores:

* the ladder: per test image the blends (1-a) * input + a * clean, a in 0, 0.25, 0.5,
  0.75, 1, and the teacher's output; Spearman of the score against PSNR and against SSIM,
  pooled over the task's images and as the median over images;
* the pseudo-labels of one image (the teacher's hflip, vflip and rot90 PLs): mean
  per-image Spearman against PSNR and SSIM over the three, and how often the metric's best
  PL is the PSNR-best one (chance: 1 in 3);
* the score's sensitivity to a horizontal flip (clean and restored images) and to image
  size (the same content at 48, 64, 96, 128 and 256 px, clean and degraded), on the 0-1
  normalised scale.

A metric "ranks the ladder" on a task when its pooled Spearman against PSNR is >= 0.8.
Writes ``audit.md`` and ``audit.json`` into ``--out``; the last line printed is

    RESULT metric_audit_rankers <n> metrics target <metrics + 1>

where n counts the metrics and the ensemble that rank the ladder on the calibrated scale
(the one a training run uses) on at least 4 of 5 tasks (with fewer tasks run: 80 % of
them, rounded up). ``--fast`` only shows that the script works: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import emit_result, machine_line, print_table, repo_root
from experiments.common import fmt, script_logging, with_threads
from experiments.quality.evaluate import spearman
from experiments.quality.targets import TASKS
from qualiteacher.method.augment import AUGMENTATIONS  # the teacher's PL set, as in training

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # ladder blends (1 - a) * input + a * clean
LADDER_ITEMS = tuple(f"a={a:g}" for a in ALPHAS) + ("teacher",)
IMAGE_SIZE = 128  # side of every test image; the reference of the size sensitivity
# 64: the blocks of the pixel-loss weight maps (block_grid 2 on 128 px); 96: the student's crops.
SIZES = (48, 64, 96, 128, 256)
SCALES = ("registry", "calibrated")
RAW = "raw"  # a single metric's own scores, unclipped: what it can rank before any range is applied
ENSEMBLE = "ensemble"
RANKER_RHO = 0.8  # ladder Spearman vs PSNR at or above which a metric "ranks" a task
RANKER_SHARE = 0.8  # ... on at least this share of the tasks run (4 of 5)
PL_RHO, PL_AGREE = 0.5, 0.6  # "ranks PLs": mean per-image rho and best-PL agreement (chance 1/3)
DEFAULT_BUDGET = Path("configs/quality_budget.yaml")
FAST_BUDGET = Path("configs/smoke.yaml")

log = logging.getLogger("experiments.metric_audit")


# ---------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.metric_audit", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=None, help=f"comma-separated tasks or 'all' ({', '.join(TASKS)}); "
                                                      "default all (fast: haze)")
    parser.add_argument("--metrics", default="brisque,niqe,piqe",
                        help="comma-separated NR metrics (default brisque,niqe,piqe: the offline ones); the "
                             "ensemble weighs them as the budget config does, or equally if it lacks one")
    parser.add_argument("--budget", type=Path, default=None,
                        help=f"config with model, pretraining and calibration settings (default {DEFAULT_BUDGET}; "
                             f"fast: {FAST_BUDGET})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set seed=1 (repeatable)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="stage-1 steps per task (default: the budget's, 300; fast 4)")
    parser.add_argument("--n-test", type=int, default=None, help="source photos held out for the test set (3; fast 1)")
    parser.add_argument("--crops-per-image", type=int, default=None, help="crops per source photo (8; fast 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/metric_audit"), help="report folder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--fast", action="store_true",
                        help="one task, a tiny model, a few steps and images: checks that it runs; "
                             "the numbers mean nothing")
    args = parser.parse_args(argv)
    tasks = args.tasks or ("haze" if args.fast else "all")
    args.task_list = list(TASKS) if tasks.strip() == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    if not args.task_list or any(t not in TASKS for t in args.task_list):
        parser.error(f"unknown task(s) in {tasks!r}; known: {', '.join(TASKS)} or all")
    args.metric_list = [m.strip() for m in args.metrics.split(",") if m.strip()]
    from qualiteacher.iqa.registry import METRICS

    if not args.metric_list or any(m not in METRICS for m in args.metric_list):
        parser.error(f"unknown metric(s) in {args.metrics!r}; known: {', '.join(METRICS)}")
    args.n_test = args.n_test or (1 if args.fast else 3)
    args.crops = args.crops_per_image or (2 if args.fast else 8)
    args.pretrain_steps = args.pretrain_steps or (4 if args.fast else None)
    budget = args.budget or (FAST_BUDGET if args.fast else DEFAULT_BUDGET)
    args.budget_path = budget if budget.is_absolute() or budget.exists() else repo_root() / budget
    return args


def task_config(args: argparse.Namespace, task: str):
    """The budget for one task's stage-1 teacher: an unconditioned backbone, as in
    `experiments.quality` (the score condition plays no part in the audit)."""
    from qualiteacher.config import load_config

    overrides = [f"data.task={task}", "model.score_condition=false", *args.overrides]
    if args.pretrain_steps:
        overrides.append(f"pretrain.steps={args.pretrain_steps}")
    return load_config(args.budget_path, overrides)


# ---------------------------------------------------------------------------- metrics
def load_ensemble(args: argparse.Namespace, cfg):
    """(ensemble of the usable metrics, {metric: why it was left out}). A metric whose
    weights are missing (MUSIQ, CLIP-IQA on an offline machine) or that cannot score a
    test image is left out with its reason, and the rest are audited."""
    from qualiteacher.device import resolve_device
    from qualiteacher.iqa.ensemble import IQAEnsemble
    from qualiteacher.iqa.registry import get_spec
    from qualiteacher.iqa.weights import MissingWeightsError, prepare, require_weights

    weights_dir = cfg.paths.resolved_weights_dir()
    prepare(weights_dir, log=lambda _m: None)
    skipped = {}
    for name in args.metric_list:
        spec = get_spec(name)
        if spec.min_size > IMAGE_SIZE:
            skipped[name] = f"needs images of at least {spec.min_size} px; the test images are {IMAGE_SIZE} px"
            continue
        try:
            require_weights(spec, weights_dir)
        except MissingWeightsError as exc:
            skipped[name] = str(exc).splitlines()[0]
    usable = [m for m in args.metric_list if m not in skipped]
    if not usable:
        raise SystemExit(f"no metric to audit: {skipped}")
    device = resolve_device(cfg.iqa.device)
    ensemble = IQAEnsemble(ensemble_weights(usable, cfg.iqa.metrics), weights_dir, str(device),
                           max_batch_pixels=cfg.iqa.batch_pixels_for(device.type))
    return ensemble, skipped


def ensemble_weights(names: list[str], configured: dict[str, float]) -> dict[str, float]:
    """The budget's ensemble weights when it weighs every metric audited, else equal ones."""
    if all(configured.get(m, 0) > 0 for m in names):
        return {m: configured[m] for m in names}
    return dict.fromkeys(names, 1.0)


def raw_scores(ensemble, images: np.ndarray) -> dict[str, np.ndarray]:
    """Raw score of every metric for uint8 images of shape (..., H, W, 3), shaped (...).
    A metric that cannot score this size (registry min_size) gets NaN: pyiqa's NIQE
    crashes below 96 px instead of raising an error the ensemble could catch."""
    lead, (h, w) = images.shape[:-3], images.shape[-3:-1]
    x = to_batch(images.reshape(-1, h, w, 3))
    out = {}
    for name in ensemble.names:
        if ensemble.specs[name].min_size > min(h, w):
            out[name] = np.full(lead, np.nan)
        else:
            out[name] = ensemble.raw_scores(x, [name])[name].double().numpy().reshape(lead)
    return out


def on_scale(ensemble, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Normalised scores (0-1, higher is better) of every metric and of the ensemble on
    ``ensemble``'s ranges. The ensemble leaves out a metric that could score none of the
    images (too small for it) and renormalises the weights, as block scores do; an image
    one metric failed on stays NaN (a training run drops such a label)."""
    import torch

    from qualiteacher.iqa.ensemble import normalize_score

    norm = {m: normalize_score(ensemble.specs[m], torch.from_numpy(v)) for m, v in raw.items()}
    able = {m: v for m, v in norm.items() if torch.isfinite(v).any()}
    shape = next(iter(raw.values())).shape
    combined = ensemble.combine(able).numpy() if able else np.full(shape, np.nan)
    return {m: v.numpy() for m, v in norm.items()} | {ENSEMBLE: combined}


def calibrated_ranges(ensemble, teacher: Callable, unpaired: list[np.ndarray], cfg) -> dict[str, tuple[float, float]]:
    """The ranges a training run would fit (`qualiteacher.pipelines.train._fit_calibration`): percentiles
    ``iqa.calibration_percentiles`` of the raw scores of the stage-1 teacher's multi-aug PLs
    of up to ``iqa.calibration_images`` unpaired inputs. Kept in this one function so that
    the audit follows when calibration changes."""
    from qualiteacher.calibration import calibrate

    n = min(cfg.iqa.calibration_images, len(unpaired))
    picks = [unpaired[i] for i in np.linspace(0, len(unpaired) - 1, n).round().astype(int)]
    batches = [to_batch(np.stack(picks[i:i + 8])) for i in range(0, n, 8)]
    fitted = calibrate(ensemble, teacher, batches, tuple(cfg.labelling.augmentations),
                       cfg.iqa.calibration_percentiles, keep_fraction=None)
    return fitted.ranges


# ---------------------------------------------------------------------------- images
def to_batch(images: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)


def to_images(x) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3), rounded as a saved PNG would be."""
    return x.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def load_teacher(path: Path, score: float, chunk: int = 8) -> Callable:
    """The stage-1 model as a batch function (N, 3, H, W) -> (N, 3, H, W), in chunks."""
    import torch

    from qualiteacher.checkpoint import load_restorer

    model, _ = load_restorer(path)

    def teacher(x):
        with torch.inference_mode():
            return torch.cat([model(x[i:i + chunk], score) for i in range(0, x.shape[0], chunk)]).clamp(0, 1)

    return teacher


def ladder(inputs: np.ndarray, clean: np.ndarray, restored: np.ndarray) -> np.ndarray:
    """(N, len(LADDER_ITEMS), H, W, 3) uint8: the blends (1-a)*input + a*clean, then the
    teacher's output. a=0 is the input and a=1 the clean image, exactly."""
    x, y = inputs.astype(np.float64), clean.astype(np.float64)
    blends = [np.rint((1 - a) * x + a * y).astype(np.uint8) for a in ALPHAS]
    return np.stack([*blends, restored], axis=1)


def reference(items: np.ndarray, clean: np.ndarray) -> dict[str, np.ndarray]:
    """PSNR and SSIM of every item (N, K, H, W, 3) against its clean image (N, H, W, 3)."""
    from qualiteacher.evaluation import reference_scores

    with np.errstate(divide="ignore"):  # PSNR of the clean image itself: inf, reported as 100 dB
        rows = [[reference_scores(item, gt) for item in per_image] for per_image, gt in zip(items, clean)]
    return {k: np.array([[r[k] for r in row] for row in rows]) for k in ("psnr", "ssim")}


# ---------------------------------------------------------------------------- statistics
def rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman over the pairs where both are finite; NaN with fewer than 3 or a constant side."""
    x, y = np.ravel(x), np.ravel(y)
    ok = np.isfinite(x) & np.isfinite(y)
    return spearman(x[ok], y[ok])["rho"] if ok.sum() >= 3 else float("nan")


def ranking(scores: np.ndarray, ref: np.ndarray) -> dict:
    """How well scores (images, items) rank like ``ref``: Spearman pooled over every item,
    and per image (median and mean over the images where it is defined)."""
    per_image = np.array([rho(s, r) for s, r in zip(scores, ref)])
    finite = per_image[np.isfinite(per_image)]
    return {"pooled": rho(scores, ref),
            "per_image_median": float(np.median(finite)) if finite.size else float("nan"),
            "per_image_mean": float(np.mean(finite)) if finite.size else float("nan"),
            "images": int(finite.size)}


def best_agreement(scores: np.ndarray, ref: np.ndarray) -> float:
    """Share of images whose best-scored item is also the best by ``ref`` (rows: images).
    A tie for the best score counts as a random pick among the tied items (clipping to a
    calibrated range ties scores); images with a missing score are left out."""
    hits = []
    for s, r in zip(scores, ref):
        if not np.isfinite(s).all():
            continue
        tied = np.flatnonzero(s == s.max())
        hits.append(float(np.argmax(r) in tied) / len(tied))
    return float(np.mean(hits)) if hits else float("nan")


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(np.asarray(a) - np.asarray(b))
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


def mean_change(a: np.ndarray, b: np.ndarray) -> float:
    d = np.asarray(a) - np.asarray(b)
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


# ---------------------------------------------------------------------------- one task
def clean_at(names: list[str], args: argparse.Namespace, seed: int, size: int) -> np.ndarray:
    """The clean test images ``names`` at ``size`` px: the same crop boxes as the test set,
    resampled from the source photo (not from the 128 px crop)."""
    from qualiteacher.data.samples import source_crops, split_names

    crops = {f"{photo}_{k}.png": img for photo in split_names(args.n_test)["test"]
             for k, img in enumerate(source_crops(photo, "test", seed, size, args.crops))}
    return np.stack([crops[n] for n in names])


def degraded_at(task: str, names: list[str], seed: int, clean: np.ndarray) -> np.ndarray:
    """The test inputs' degradation applied to ``clean`` (any size) with the same per-file
    seed as ``make_task_sets``; degradations are drawn in scene units, so each size shows
    the same scene-level rain, snow or haze."""
    from qualiteacher.data.degradations import degrade, file_seed

    return np.stack([degrade(img, task, np.random.default_rng(file_seed(seed, n, task, "unpaired")), "unpaired")
                     for img, n in zip(clean, names)])


def check_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """The size series must hold the test set's own images at 128 px, else it measures
    something else (e.g. make_task_sets changed how it crops)."""
    if a.shape != b.shape or not np.array_equal(a, b):
        raise RuntimeError(f"the {what} at {IMAGE_SIZE} px differ from the test set's; "
                           "make_task_sets and this audit no longer draw the same images")


def size_series(task: str, names: list[str], args: argparse.Namespace, seed: int, ensemble,
                clean: np.ndarray, inputs: np.ndarray) -> dict[str, dict[int, dict]]:
    """Raw scores of the same clean and degraded content at every size of SIZES."""
    series: dict[str, dict[int, dict]] = {"clean": {}, "degraded": {}}
    for size in SIZES:
        clean_s = clean_at(names, args, seed, size)
        degraded_s = degraded_at(task, names, seed, clean_s)
        if size == IMAGE_SIZE:
            check_same(clean_s, clean, "clean images")
            check_same(degraded_s, inputs, "degraded inputs")
        series["clean"][size] = raw_scores(ensemble, clean_s)
        series["degraded"][size] = raw_scores(ensemble, degraded_s)
    return series


def collect(task: str, args: argparse.Namespace, ensemble, task_dir: Path) -> dict:
    """Everything measured on one task: raw scores and PSNR / SSIM (no scale applied yet)."""
    from qualiteacher.pipelines.pretrain import pretrain

    from qualiteacher.data.samples import make_task_sets
    from qualiteacher.imageio import list_images, read_image
    from qualiteacher.method.augment import multi_aug_pseudo_labels

    cfg = task_config(args, task)
    if task_dir.exists():
        shutil.rmtree(task_dir)  # stale sets or a stale pretrain.pt would mix into this run
    timings, t0 = {}, time.perf_counter()
    sets = make_task_sets(task, task_dir / "data", seed=cfg.seed, size=IMAGE_SIZE, n_test=args.n_test,
                          crops_per_image=args.crops, overwrite=True)
    names = [p.name for p in list_images(sets["test/target"])]
    clean = np.stack([read_image(sets["test/target"] / n) for n in names])
    inputs = np.stack([read_image(sets["test/input"] / n) for n in names])
    unpaired = [read_image(p) for p in list_images(sets["unpaired/input"])]
    timings["data"], t0 = time.perf_counter() - t0, time.perf_counter()

    pretrain(cfg, sets["paired/input"], sets["paired/target"], task_dir / "pretrain.pt",
             log=lambda m: log.info("[%s] %s", task, m))
    teacher = load_teacher(task_dir / "pretrain.pt", cfg.model.score_cap)
    timings["pretrain"], t0 = time.perf_counter() - t0, time.perf_counter()

    restored = to_images(teacher(to_batch(inputs)))
    steps = ladder(inputs, clean, restored)
    pls = multi_aug_pseudo_labels(teacher, to_batch(inputs), AUGMENTATIONS)  # (N, K, 3, H, W)
    pls = to_images(pls.flatten(0, 1)).reshape(len(names), len(AUGMENTATIONS), *clean.shape[1:])
    pairs = np.stack([clean, restored], axis=1)  # what the flip is measured on
    data = {
        "images": len(names),
        "calibrated_ranges": calibrated_ranges(ensemble, teacher, unpaired, cfg),
        "ladder": {"raw": raw_scores(ensemble, steps)} | reference(steps, clean),
        "pls": {"raw": raw_scores(ensemble, pls)} | reference(pls, clean),
        "flip": {"raw": raw_scores(ensemble, pairs), "raw_flipped": raw_scores(ensemble, pairs[..., ::-1, :])},
        "sizes": size_series(task, names, args, cfg.seed, ensemble, clean, inputs),
        "pretrain_steps": cfg.pretrain.steps,
    }
    timings["score"] = time.perf_counter() - t0
    data["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    return data


def analyse(data: dict, ensemble) -> dict:
    """The statistics of one task: {scale: {entry: {...}}} for the registry and calibrated scales."""
    scales = {"registry": ensemble, "calibrated": ensemble.with_ranges(data["calibrated_ranges"])}
    return {scale: scale_stats(data, ens) for scale, ens in scales.items()} | {RAW: raw_stats(data, ensemble)}


def raw_stats(data: dict, ensemble) -> dict:
    """The rankings of each metric's raw scores, oriented so that higher is better and
    never clipped: they tell the metric's own ability from what a range's clipping hides."""
    def oriented(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {m: -v if ensemble.specs[m].lower_better else v for m, v in raw.items()}

    ladder_o, pls_o = oriented(data["ladder"]["raw"]), oriented(data["pls"]["raw"])
    return {m: {"ladder": {ref: ranking(ladder_o[m], data["ladder"][ref]) for ref in ("psnr", "ssim")},
                "pls": {ref: ranking(pls_o[m], data["pls"][ref]) for ref in ("psnr", "ssim")}
                | {"best_agreement": best_agreement(pls_o[m], data["pls"]["psnr"])}}
            for m in ladder_o}


def ladder_means(data: dict, ensemble) -> dict[str, list[float]]:
    """Mean over the test images at each ladder item: PSNR, SSIM, each metric's raw score
    and the ensemble on the calibrated scale (0-1): which way each score moves."""
    calibrated = on_scale(ensemble.with_ranges(data["calibrated_ranges"]), data["ladder"]["raw"])
    columns = {"psnr": data["ladder"]["psnr"], "ssim": data["ladder"]["ssim"]} | data["ladder"]["raw"] \
        | {ENSEMBLE: calibrated[ENSEMBLE]}
    return {k: [_nanmean(v[:, i]) for i in range(v.shape[1])] for k, v in columns.items()}


def scale_stats(data: dict, ens) -> dict:
    """Every statistic of every metric and of the ensemble on ``ens``'s ranges."""
    ladder_s, pls_s = on_scale(ens, data["ladder"]["raw"]), on_scale(ens, data["pls"]["raw"])
    flip_s, flipped_s = on_scale(ens, data["flip"]["raw"]), on_scale(ens, data["flip"]["raw_flipped"])
    sizes_s = {kind: {size: on_scale(ens, raw) for size, raw in by_size.items()}
               for kind, by_size in data["sizes"].items()}
    refs = ("psnr", "ssim")
    return {entry: {
        "ladder": {ref: ranking(ladder_s[entry], data["ladder"][ref]) for ref in refs},
        "pls": {ref: ranking(pls_s[entry], data["pls"][ref]) for ref in refs}
        | {"best_agreement": best_agreement(pls_s[entry], data["pls"]["psnr"]),
           "score_spread": mean_spread(pls_s[entry])},
        "flip": {kind: mean_abs(flip_s[entry][:, k], flipped_s[entry][:, k])
                 for k, kind in enumerate(("clean", "restored"))},
        "size": {kind: size_changes(by_size, entry) for kind, by_size in sizes_s.items()},
    } for entry in ladder_s}


def size_changes(by_size: dict[int, dict[str, np.ndarray]], entry: str) -> dict[str, float]:
    """Mean score change of ``entry`` at each size against IMAGE_SIZE (keys: the sizes as text, for JSON)."""
    return {str(size): mean_change(scores[entry], by_size[IMAGE_SIZE][entry])
            for size, scores in by_size.items() if size != IMAGE_SIZE}


def mean_spread(scores: np.ndarray) -> float:
    """Mean over rows (images) of max - min: how far apart the scores of one image's items
    are; rows with a missing score are left out."""
    rows = [r.max() - r.min() for r in scores if np.isfinite(r).all()]
    return float(np.mean(rows)) if rows else float("nan")


# ---------------------------------------------------------------------------- verdicts
def needed_tasks(tasks_run: int) -> int:
    return math.ceil(RANKER_SHARE * tasks_run - 1e-9)


def summarise(tasks: dict[str, dict], entries: list[str]) -> dict:
    """Per entry and scale, across tasks: on which tasks it ranks the ladder and the PLs,
    whether it counts as a ranker, and the sentences of the report. Single metrics also
    get their raw (unclipped) scores as a scale; the ensemble exists only on a scale."""
    need = needed_tasks(len(tasks))
    out: dict = {}
    for entry in entries:
        out[entry] = {}
        for scale in scales_of(entry):
            stats = {t: res["stats"][scale][entry] for t, res in tasks.items()}
            ladder_yes = [t for t, s in stats.items() if ranks_ladder(s["ladder"])]
            pl_yes = [t for t, s in stats.items() if ranks_pls(s["pls"])]
            lines = [ladder_sentence(stats, ladder_yes, need), pl_sentence(stats, pl_yes, need)]
            if scale != RAW:
                lines += sensitivity_sentences(stats)
            out[entry][scale] = {"ladder_tasks": ladder_yes, "pl_tasks": pl_yes,
                                 "ranker": len(ladder_yes) >= need, "verdict": lines}
    return out


def scales_of(entry: str) -> tuple[str, ...]:
    return SCALES if entry == ENSEMBLE else (RAW, *SCALES)


def ranks_ladder(ladder_stats: dict) -> bool:
    value = ladder_stats["psnr"]["pooled"]
    return bool(np.isfinite(value) and value >= RANKER_RHO)


def ranks_pls(pls: dict) -> bool:
    rho_psnr, agree = pls["psnr"]["per_image_mean"], pls["best_agreement"]
    return bool(np.isfinite(rho_psnr) and np.isfinite(agree) and rho_psnr >= PL_RHO and agree >= PL_AGREE)


def _word(yes: list[str], need: int) -> str:
    return "yes" if len(yes) >= need else ("partly" if yes else "no")


def _span(values) -> str:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return f"{fmt(min(finite))} to {fmt(max(finite))}" if finite else "n/a"


def ladder_sentence(stats: dict[str, dict], yes: list[str], need: int) -> str:
    pooled = [s["ladder"]["psnr"]["pooled"] for s in stats.values()]
    median = [s["ladder"]["psnr"]["per_image_median"] for s in stats.values()]
    return (f"ranks the ladder: {_word(yes, need)} ({len(yes)} of {len(stats)} tasks with rho >= {RANKER_RHO}: "
            f"{', '.join(yes) or 'none'}; pooled rho {_span(pooled)} vs PSNR, median per image {_span(median)})")


def pl_sentence(stats: dict[str, dict], yes: list[str], need: int) -> str:
    rho_pl = _nanmean([s["pls"]["psnr"]["per_image_mean"] for s in stats.values()])
    agree = _nanmean([s["pls"]["best_agreement"] for s in stats.values()])
    return (f"ranks the PLs of one image: {_word(yes, need)} ({len(yes)} of {len(stats)} tasks; mean per-image "
            f"rho {fmt(rho_pl)} vs PSNR, its best PL is the PSNR-best on {_pct(agree)} of images, chance 33 %)")


def sensitivity_sentences(stats: dict[str, dict]) -> list[str]:
    flip_c = _nanmean([s["flip"]["clean"] for s in stats.values()])
    flip_r = _nanmean([s["flip"]["restored"] for s in stats.values()])
    spread = _nanmean([s["pls"]["score_spread"] for s in stats.values()])
    noisy = " - flip noise as large as the PLs' spread" if np.isfinite(spread) and flip_r >= spread else ""
    size = {s: _nanmean([st["size"]["clean"][str(s)] for st in stats.values()]) for s in SIZES if s != IMAGE_SIZE}
    return [(f"hflip moves the score by {fmt(flip_c, 3)} (clean) / {fmt(flip_r, 3)} (restored) on average; "
             f"the three PLs of an image spread over {fmt(spread, 3)}{noisy}"),
            "same clean content vs 128 px: " + ", ".join(f"{s} px {fmt_change(v)}" for s, v in size.items())]


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %" if np.isfinite(value) else "n/a"


def fmt_change(value: float) -> str:
    return f"{value:+.3f}" if np.isfinite(value) else "n/a"


def rankers(summary: dict, scale: str) -> list[str]:
    """The entries that rank the ladder on enough tasks on ``scale`` (raw: single metrics only)."""
    return [entry for entry, by_scale in summary.items() if scale in by_scale and by_scale[scale]["ranker"]]


# ---------------------------------------------------------------------------- report
def _rows(results: dict, cell: Callable[[dict], str], raw: bool = False,
          extra: Callable[[str, str], str] | None = None) -> list[str]:
    """One markdown row per entry and scale (with ``raw``, single metrics' raw scores too);
    ``cell(stats)`` fills a task's column."""
    lines = []
    for entry in results["entries"]:
        for scale in scales_of(entry) if raw else SCALES:
            cells = [cell(res["stats"][scale][entry]) for res in results["tasks"].values()]
            tail = [extra(entry, scale)] if extra else []
            lines.append(f"| {entry} | {scale} | " + " | ".join(cells + tail) + " |")
    return lines


def _header(results: dict, extra: Sequence[str] = ()) -> list[str]:
    cols = list(results["tasks"]) + list(extra)
    return ["| metric | scale | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]


def _ladder_cell(ref: str) -> Callable[[dict], str]:
    return lambda s: f"{fmt(s['ladder'][ref]['pooled'])} ({fmt(s['ladder'][ref]['per_image_median'])})"


def _pl_cell(s: dict) -> str:
    return (f"{fmt(s['pls']['psnr']['per_image_mean'])} / {fmt(s['pls']['ssim']['per_image_mean'])} / "
            f"{_pct(s['pls']['best_agreement'])}")


def _flip_cell(s: dict) -> str:
    return f"{fmt(s['flip']['clean'], 3)} / {fmt(s['flip']['restored'], 3)} ({fmt(s['pls']['score_spread'], 3)})"


def intro_section(results: dict) -> list[str]:
    setup = results["setup"]
    skipped = "; ".join(f"{k}: {v}" for k, v in setup["skipped"].items())
    lines = ["# Metric audit: can the NR metrics rank restorations of these images?", ""]
    if results["fast"]:
        lines += ["**FAST MODE: tiny model, a few steps and images; these numbers are NOT meaningful.**", ""]
    return lines + [
        f"Command: `{results['command']}` at commit {results['commit']}, {results['date']}.", "",
        f"{results['machine'][0].upper()}{results['machine'][1:]}. Wall time {results['elapsed_s']:.0f} s.", "",
        (f"Per task: the sets of `make_task_sets` ({setup['n_test']} held-out photos x {setup['crops']} crops = "
         f"{setup['test_images']} test images of {IMAGE_SIZE} px, unpaired (\"real\") domain), a stage-1 teacher "
         f"pretrained {setup['pretrain_steps']} steps on the paired set (`{setup['budget']}`). Metrics "
         f"{', '.join(results['entries'][:-1])}; ensemble weights {setup['weights']}."
         + (f" Left out: {skipped}." if skipped else "")), "",
        ("Scales: *registry* normalises with the registry's ranges, *calibrated* with the ranges a training run "
         "fits (percentiles of the raw scores of the teacher's multi-aug PLs of the unpaired inputs; "
         "`calibrated_ranges`), *raw* is a single metric's own score, never clipped. A single metric ranks the "
         "same on all three except where clipping to a range ties scores (the calibrated ranges are narrow, so "
         "clean images and heavy degradations often lie outside them; BRISQUE goes below the registry's 0 on "
         "sharp images); the ensemble's ranking also depends on the ranges, which set how much each metric "
         "weighs."), ""]


def ladder_section(results: dict) -> list[str]:
    summary = results["summary"]
    return [
        "## Ladder: Spearman vs PSNR, pooled over a task's images (median per image)", "",
        (f"Per test image: (1-a) x input + a x clean for a in {', '.join(f'{a:g}' for a in ALPHAS)}, and the "
         f"teacher's output; {len(LADDER_ITEMS)} items per image. Last column: tasks with pooled rho >= "
         f"{RANKER_RHO}."), "",
        *_header(results, [f"tasks >= {RANKER_RHO}"]),
        *_rows(results, _ladder_cell("psnr"), raw=True, extra=lambda e, s: str(len(summary[e][s]["ladder_tasks"]))),
        "", "## Ladder: Spearman vs SSIM, pooled (median per image)", "",
        *_header(results), *_rows(results, _ladder_cell("ssim"), raw=True), ""]


def ladder_means_section(results: dict) -> list[str]:
    metrics = results["entries"][:-1]
    lines = ["## Mean along the ladder", "",
             (f"Means over a task's test images; {', '.join(metrics)}: raw scores (lower is better for "
              "BRISQUE, NIQE and PIQE), ensemble: calibrated scale, 0-1."), "",
             "| task | quantity | " + " | ".join(LADDER_ITEMS) + " |", "|---|---|" + "---:|" * len(LADDER_ITEMS)]
    for task, res in results["tasks"].items():
        for key in ("psnr", *metrics, ENSEMBLE):
            digits = 3 if key == ENSEMBLE else 2
            lines.append(f"| {task} | {key} | " + " | ".join(fmt(v, digits) for v in res["ladder_means"][key]) + " |")
    return lines + [""]


def pl_section(results: dict) -> list[str]:
    context = "; ".join(f"{t} {fmt(r['pl_psnr_spread_db'], 3)} dB ("
                        + ", ".join(f"{a} {fmt(v)}" for a, v in r["pl_psnr_by_aug"].items()) + ")"
                        for t, r in results["tasks"].items())
    return ["## Pseudo-labels of one image (hflip, vflip, rot90)", "",
            ("Cells: mean per-image Spearman vs PSNR / vs SSIM over the 3 PLs (coarse: 3 items) / share of images "
             "whose best-scored PL is the PSNR-best (chance 33 %). Context, the PLs' PSNR spread (max - min) per "
             f"image, mean (and each PL's mean PSNR): {context}."), "",
            *_header(results), *_rows(results, _pl_cell, raw=True), ""]


def flip_section(results: dict) -> list[str]:
    return ["## Sensitivity to a horizontal flip (0-1 normalised scale)", "",
            ("Cells: mean |score(x) - score(hflip x)| on clean / restored (teacher) images, and in brackets the "
             "mean spread (max - min) of the scores of one image's three PLs, what a flip-sized error would have "
             "to stay well below to rank them."), "",
            *_header(results), *_rows(results, _flip_cell), ""]


def size_section(results: dict) -> list[str]:
    others = [s for s in SIZES if s != IMAGE_SIZE]
    lines = ["## Sensitivity to image size (0-1 normalised scale)", "",
             (f"Mean of score(size) - score({IMAGE_SIZE} px) over the test images and tasks: the same crops "
              "resampled from the source photo (clean), and degraded at that size with the test input's own seed "
              "(degraded). n/a: the metric cannot score that size; the ensemble then uses the other metrics (as "
              "block scores do)."), "",
             "| metric | scale | " + " | ".join(f"{kind} {s}" for kind in ("clean", "degraded") for s in others) + " |",
             "|---|---|" + "---:|" * (2 * len(others))]
    tasks = results["tasks"].values()
    for entry in results["entries"]:
        for scale in SCALES:
            cells = [fmt_change(_nanmean([r["stats"][scale][entry]["size"][kind][str(s)] for r in tasks]))
                     for kind in ("clean", "degraded") for s in others]
            lines.append(f"| {entry} | {scale} | " + " | ".join(cells) + " |")
    return lines + [""]


def ranges_section(results: dict) -> list[str]:
    metrics, registry = results["entries"][:-1], results["registry_ranges"]
    lines = ["## Calibrated ranges (raw units; the registry's in the header)", "",
             "| task | " + " | ".join(f"{m} ({registry[m][0]:g}-{registry[m][1]:g})" for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for task, res in results["tasks"].items():
        ranges = res["calibrated_ranges"]
        lines.append(f"| {task} | " + " | ".join(f"{ranges[m][0]:.2f}-{ranges[m][1]:.2f}" for m in metrics) + " |")
    return lines + [""]


def words_section(results: dict) -> list[str]:
    summary, n = results["summary"], len(results["tasks"])
    lines = ["## In words (calibrated scale, the one training uses)", "",
             (f"A metric ranks a task's ladder when its pooled rho vs PSNR >= {RANKER_RHO}, and is a *ranker* when "
              f"it does so on >= {needed_tasks(n)} of {n} tasks; it ranks PLs when its mean per-image rho >= "
              f"{PL_RHO} and its best PL is the PSNR-best on >= {PL_AGREE:.0%} of images."), ""]
    for entry in results["entries"]:
        lines.append(f"- **{entry}**: " + "; ".join(summary[entry]["calibrated"]["verdict"]) + ".")
        other = "registry" if entry == ENSEMBLE else RAW
        lines.append(f"  On the {other} {'scale' if other == 'registry' else 'scores'}: "
                     + "; ".join(summary[entry][other]["verdict"][:2]) + ".")
    rankers_ = results["rankers"]
    return lines + ["", (f"Rankers (calibrated scale): {', '.join(rankers_['calibrated']) or 'none'}; "
                         f"registry scale: {', '.join(rankers_['registry']) or 'none'}; raw scores: "
                         f"{', '.join(rankers_[RAW]) or 'none'}."), "",
                    "Timings per task (s): " + "; ".join(f"{t} {_timings(r)}" for t, r in results["tasks"].items()),
                    ""]


def report_lines(results: dict) -> list[str]:
    return [*intro_section(results), *ladder_section(results), *ladder_means_section(results),
            *pl_section(results), *flip_section(results), *size_section(results), *ranges_section(results),
            *words_section(results)]


def _timings(task_result: dict) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in task_result["timings_s"].items())


def json_ready(obj):
    """NaN and inf become null (strict JSON); tuples become lists."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the audit; returns what audit.json holds."""
    args = parse_args(argv)
    return with_threads(args.threads, lambda: _main(args, argv))


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = task_config(args, args.task_list[0])
    ensemble, skipped = load_ensemble(args, cfg)
    entries = [*ensemble.names, ENSEMBLE]
    print("== Metric audit: can the NR metrics rank restorations?")
    print(machine_line())
    print(f"tasks {', '.join(args.task_list)}; metrics {', '.join(ensemble.names)}"
          + (f" (left out: {', '.join(skipped)})" if skipped else "")
          + f"; pretrain {cfg.pretrain.steps} steps; test {args.n_test} photos x {args.crops} crops")
    if args.fast:
        print("FAST MODE: tiny model, a few steps and images; the numbers below are NOT meaningful")
    sys.stdout.flush()

    tasks = {}
    for task in args.task_list:
        data = collect(task, args, ensemble, args.out / task)
        tasks[task] = {"stats": analyse(data, ensemble), "calibrated_ranges": data["calibrated_ranges"],
                       "images": data["images"], "ladder_means": ladder_means(data, ensemble),
                       "pl_psnr_spread_db": mean_spread(data["pls"]["psnr"]),
                       "pl_psnr_by_aug": dict(zip(AUGMENTATIONS, data["pls"]["psnr"].mean(axis=0).tolist())),
                       "timings_s": data["timings_s"]}
        print(f"[{task}] {data['images']} test images; seconds: {_timings(tasks[task])}", flush=True)
    summary = summarise(tasks, entries)
    results = {
        "version": 1, "fast": args.fast,
        "command": "python -m experiments.metric_audit " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
        "setup": {"budget": display_path(args.budget_path), "pretrain_steps": cfg.pretrain.steps,
                  "n_test": args.n_test, "crops": args.crops, "test_images": args.n_test * args.crops,
                  "weights": ensemble.weights, "skipped": skipped, "sizes": list(SIZES), "alphas": list(ALPHAS)},
        "entries": entries, "registry_ranges": ensemble.ranges, "tasks": tasks, "summary": summary,
        "rankers": {scale: rankers(summary, scale) for scale in (RAW, *SCALES)},
        "criterion": {"ladder_rho_vs_psnr": RANKER_RHO, "tasks_needed": needed_tasks(len(tasks)),
                      "tasks_run": len(tasks), "pl_rho": PL_RHO, "pl_agreement": PL_AGREE},
    }
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    (args.out / "audit.md").write_text("\n".join(report_lines(results)))
    on_disk = json_ready(results)
    (args.out / "audit.json").write_text(json.dumps(on_disk, indent=2) + "\n")
    print_summary(results)
    print(f"report: {args.out / 'audit.md'}  json: {args.out / 'audit.json'}")
    emit_result("metric_audit_rankers", len(results["rankers"]["calibrated"]), "metrics", len(entries))
    return on_disk


def print_summary(results: dict) -> None:
    rows = []
    for entry in results["entries"]:
        for scale in SCALES:
            rho_psnr = [res["stats"][scale][entry]["ladder"]["psnr"]["pooled"] for res in results["tasks"].values()]
            rows.append([entry, scale, *(fmt(r) for r in rho_psnr),
                         "yes" if results["summary"][entry][scale]["ranker"] else "no"])
    print()
    print("ladder Spearman vs PSNR (pooled):")
    print_table(["metric", "scale", *results["tasks"], "ranker"], rows)
    print(f"wall time {results['elapsed_s']:.0f} s", flush=True)


def display_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(repo_root())) if path.is_relative_to(repo_root()) else str(path)


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root(), capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    script_logging()
    main()
    sys.exit(0)
