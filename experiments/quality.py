"""Restoration quality: QualiTeacher against its stage-1 teacher and the Colabator-style baseline.

    python -m experiments.quality --tasks haze [--budget configs/quality_budget.yaml] \
        [--out runs/quality] [--set train.steps=400 ...] [--fast]

For each task (snow, rain, haze, lowlight, underwater; ``--tasks all`` for the five):

1. the sets are made once from the bundled photos (``make_task_sets``): a paired synthetic
   set, an unpaired "real" set with shifted degradation ranges, and a held-out test set of
   the "real" domain whose ground truth is hidden from training;
2. the stage-1 teacher is pretrained once on the paired set (``pretrain.pt``), and both
   students start from that same file (``pretrain.checkpoint``);
3. QualiTeacher (``train.mode=qualiteacher``) and the baseline (``Config.as_baseline()``)
   train under the same budget: the same config, steps, seed and data, each in its own run
   folder, Ray namespace and embedded Redis;
4. the test inputs are evaluated (PSNR / SSIM against the hidden ground truth, the NR
   ensemble on 0-10) as they are (degraded input), restored by the stage-1 teacher at score
   7, by the baseline student, and by the QualiTeacher student at score 7;
5. the QualiTeacher student restores the test set at every condition of the sweep (0..7)
   and the Spearman correlation between condition and mean NR ensemble of the output is
   the controllability score.

Targets (the paper's claims, reported whatever they come out as): QualiTeacher at score 7
above its teacher and above the baseline in PSNR on hidden ground truth and in NR ensemble
on at least 4 of the 5 tasks; controllability Spearman >= 0.9. A task is "won" when all
four comparisons are won.

Writes ``report.md``, ``results.json`` and PNG plots (controllability curves, per-task
bars, a before/after grid per task) into the report folder (default ``runs/quality``; the
run folders go under ``<out>/<task>/``). The last line printed is

    RESULT quality_tasks_won <n> tasks target 4

The budget is a config file (default ``configs/quality_budget.yaml``) plus ``--set``
overrides; a GPU is used when CUDA is available (``train.use_gpu=true`` is added unless
``--set train.use_gpu=...`` says otherwise). ``--fast`` is a tiny budget (the smoke model,
a few steps, a reduced sweep) that only shows that the script works: its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import (
    emit_result,
    format_number,
    machine_line,
    print_table,
    ray_session,
    repo_root,
)

TASKS = ("snow", "rain", "haze", "lowlight", "underwater")
TARGET_TASKS_WON = 4
TARGET_SPEARMAN = 0.9
# What is compared, in report order; "qualiteacher" is the student at score 7.
METHODS = ("input", "teacher", "baseline", "qualiteacher")
LABELS = {
    "input": "degraded input",
    "teacher": "stage-1 teacher @7",
    "baseline": "baseline student",
    "qualiteacher": "QualiTeacher @7",
    "gt": "ground truth",
}
FULL_SWEEP = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
FAST_SWEEP = (0.0, 3.5, 7.0)
DEFAULT_BUDGET = Path("configs/quality_budget.yaml")
FAST_BUDGET = Path("configs/smoke.yaml")
# The fast variant: smoke-sized model, a few steps, one teacher.
FAST_OVERRIDES = (
    "train.steps=4", "train.push_every=2", "train.checkpoint_every=4", "train.bank_wait_s=60",
    "pretrain.steps=4", "labelling.teachers=1", "loss.preference.warmup_steps=2",
)
RESULT_KEYS = ("version", "fast", "command", "budget", "tasks", "tasks_run", "tasks_won", "targets",
               "target_status", "machine", "elapsed_s")
TASK_KEYS = ("methods", "ground_truth", "sweep", "spearman", "comparisons", "won", "runs", "timings_s")

log = logging.getLogger("experiments.quality")


# ---------------------------------------------------------------------------- arguments
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.quality", description=__doc__.splitlines()[0])
    add_run_arguments(parser, out=Path("runs/quality"))
    parser.add_argument("--grid-images", type=int, default=None, help="test images in the before/after grid (2; fast 1)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="do not train: evaluate the runs an earlier call left under --out (same tasks)")
    args = parser.parse_args(argv)
    finish_run_arguments(parser, args)
    args.grid_n = args.grid_images or (1 if args.fast else 2)
    return args


def add_run_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The arguments this benchmark shares with `experiments.ablation`: tasks, budget, sets, sweep."""
    parser.add_argument("--tasks", default="haze",
                        help=f"comma-separated tasks, or 'all' ({', '.join(TASKS)}); default haze")
    parser.add_argument("--budget", type=Path, default=None,
                        help=f"config with the training budget (default {DEFAULT_BUDGET}; fast: {FAST_BUDGET})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run, e.g. --set train.steps=400 (repeatable)")
    parser.add_argument("--out", type=Path, default=out, help=f"report folder (default {out})")
    parser.add_argument("--sweep", default=None,
                        help="comma-separated score conditions for the controllability sweep (default 0..7)")
    parser.add_argument("--crops-per-image", type=int, default=None,
                        help="crops per source photo in every set (default 8; fast 2)")
    # 3 photos x 8 crops = 24 test images: with 8 (2 x 4) two runs of one setting differed
    # by 0.75 dB, more than most of the differences the benchmark is there to show.
    parser.add_argument("--n-test", type=int, default=3, help="source photos held out for the test set (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of this process (pretraining, restoring, scoring; default 1: "
                             "on a busy 2-core machine 2 threads can be several times slower)")
    parser.add_argument("--fast", action="store_true",
                        help="tiny budget (smoke model, a few steps, reduced sweep): checks that it runs; "
                             "the numbers mean nothing")


def finish_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the shared arguments and add what follows from them (task_list, sweep_scores, ...)."""
    args.task_list = list(TASKS) if args.tasks.strip() == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.task_list if t not in TASKS]
    if unknown or not args.task_list:
        parser.error(f"unknown task(s) {unknown or args.tasks!r}; known: {', '.join(TASKS)} or all")
    if args.sweep is None:
        args.sweep_scores = list(FAST_SWEEP if args.fast else FULL_SWEEP)
    else:
        args.sweep_scores = sorted({float(s) for s in args.sweep.split(",") if s.strip()})
        if len(args.sweep_scores) < 2:
            parser.error("--sweep needs at least two conditions")
    args.crops = args.crops_per_image or (2 if args.fast else 8)
    args.budget_path = args.budget or (FAST_BUDGET if args.fast else DEFAULT_BUDGET)
    if not args.budget_path.is_absolute() and not args.budget_path.exists():
        args.budget_path = repo_root() / args.budget_path


def base_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides shared by every run of every task: the fast budget, the user's, the GPU."""
    overrides = list(FAST_OVERRIDES if args.fast else ()) + list(args.overrides)
    if not any(o.split("=", 1)[0].strip() == "train.use_gpu" for o in args.overrides):
        import torch

        if torch.cuda.is_available():
            overrides.append("train.use_gpu=true")
    return overrides


# ---------------------------------------------------------------------------- evaluation
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


# ---------------------------------------------------------------------------- one task
def run_task(task: str, args: argparse.Namespace, out: Path) -> dict:
    from qualiteacher.pipelines.restore import restore_folder
    from qualiteacher.config import load_config
    from qualiteacher.iqa.ensemble import IQAEnsemble

    task_dir = out / task
    overrides = base_overrides(args) + [f"data.task={task}"]
    base_cfg = load_config(args.budget_path, overrides)
    if args.evaluate_only:
        sets, stage1, runs, timings = _existing_runs(task_dir)
    else:
        sets, stage1, runs, timings = _train_task(task, args, task_dir, overrides, base_cfg)
    test_in, test_gt = sets["test/input"], sets["test/target"]

    t0 = time.perf_counter()
    ensemble = IQAEnsemble.from_config(base_cfg)
    cap = base_cfg.model.score_cap
    restored = task_dir / "restored"
    sources = {"teacher": stage1["baseline"], "baseline": Path(runs["baseline"]["checkpoint"]),
               "qualiteacher": Path(runs["qualiteacher"]["checkpoint"])}
    folders = {"input": test_in}
    for name, checkpoint in sources.items():
        folders[name] = restored / name
        restore_checked(restore_folder, checkpoint, test_in, folders[name], cap)
    methods = {name: evaluate(folder, ensemble, test_gt) for name, folder in folders.items()}
    ground_truth = evaluate(test_gt, ensemble, None)
    sweep, rho = controllability(sources["qualiteacher"], sets, ensemble, restored / "qualiteacher_score",
                                 args.sweep_scores, task_dir / "qualiteacher")
    timings["evaluate"] = time.perf_counter() - t0
    comparisons, won = compare_methods(methods)
    result = {"methods": methods, "ground_truth": ground_truth, "sweep": sweep, "spearman": rho,
              "comparisons": comparisons, "won": won, "runs": runs,
              "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "grid": grid_plot(task, folders, test_gt, methods, out / f"grid_{task}.png", args.grid_n)}
    result["timings_s"]["total"] = round(sum(timings.values()), 1)
    return result


def _train_task(task: str, args: argparse.Namespace, task_dir: Path, overrides: list[str], base_cfg):
    """Sets, one stage-1 model, and the two students: (sets, stage1 files, runs, timings)."""
    sets, stage1, timings = prepare_task(task, args, task_dir, overrides, base_cfg)
    runs: dict[str, dict] = {}
    for mode in ("qualiteacher", "baseline"):
        runs[mode], timings[f"train_{mode}"] = train_student(task, args, task_dir / mode, overrides, sets,
                                                             stage1[mode], ["train.mode=qualiteacher"],
                                                             baseline=mode == "baseline")
    return sets, stage1, runs, timings


def prepare_task(task: str, args: argparse.Namespace, task_dir: Path, overrides: list[str], base_cfg):
    """A fresh task folder with the sets and the stage-1 models: (sets, stage1 files, timings)."""
    from qualiteacher.data.samples import make_task_sets

    if task_dir.exists():
        shutil.rmtree(task_dir)  # a run folder that exists would be resumed, not trained afresh
    task_dir.mkdir(parents=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sets = make_task_sets(task, task_dir / "data", seed=base_cfg.seed, size=base_cfg.labelling.image_size or 128,
                          n_test=args.n_test, crops_per_image=args.crops, overwrite=True)
    timings["data"] = time.perf_counter() - t0
    print(f"[{task}] sets in {task_dir / 'data'}: "
          + ", ".join(f"{k} {len(list(v.iterdir()))}" for k, v in sets.items()), flush=True)

    t0 = time.perf_counter()
    stage1 = stage1_models(base_cfg, args, overrides, sets, task_dir, task)
    timings["pretrain"] = time.perf_counter() - t0
    print(f"[{task}] stage-1 teacher: {base_cfg.pretrain.steps} steps in {timings['pretrain']:.0f} s", flush=True)
    return sets, stage1, timings


def train_student(task: str, args: argparse.Namespace, run_dir: Path, overrides: list[str], sets: dict[str, Path],
                  stage1: Path, extra: list[str], baseline: bool = False) -> tuple[dict, float]:
    """One student run from ``stage1`` on the task's sets, in its own run folder, Ray
    namespace and embedded Redis: (run info, seconds). ``extra``: this run's own overrides.
    ``baseline``: the baseline of that config (`Config.as_baseline`), whose method fields
    (the budget's ladder and dual drop among them) take the baseline's values."""
    from qualiteacher.pipelines.train import headline_line
    from qualiteacher.pipelines.train import run as train_run
    from qualiteacher.config import load_config

    shared = [f"data.paired_input_dir={sets['paired/input'].resolve()}",
              f"data.paired_target_dir={sets['paired/target'].resolve()}",
              f"data.unpaired_dir={sets['unpaired/input'].resolve()}"]
    namespace = f"quality-{task}-{run_dir.name}-{os.getpid()}"
    cfg = load_config(args.budget_path, overrides + shared + list(extra) + [
        f"ray.namespace={namespace}", f"pretrain.checkpoint={stage1.resolve()}"])
    if baseline:
        cfg = cfg.as_baseline()
    t0 = time.perf_counter()
    summary = train_run(cfg, run_dir)
    seconds = time.perf_counter() - t0
    print(f"[{task}] {run_dir.name}: {headline_line(summary)}", flush=True)
    return _run_info(summary, run_dir), seconds


def _run_info(summary: dict, run_dir: Path) -> dict:
    if not summary.get("checkpoint"):
        raise RuntimeError(f"the run in {run_dir} left no checkpoint (summary: {summary})")
    info = {k: summary.get(k) for k in ("steps", "teacher_version", "checkpoint", "elapsed_s", "bank_images",
                                         "bank_entries", "dropped", "final_losses")}
    info["run_dir"] = str(run_dir)
    return info


def _existing_runs(task_dir: Path):
    """--evaluate-only: what an earlier run of this script left in ``task_dir``."""
    from qualiteacher.data.samples import SPLITS
    from qualiteacher.run_dir import RunDir

    sets = {split: task_dir / "data" / split for split in SPLITS}
    stage1 = {"baseline": task_dir / "pretrain.pt", "qualiteacher": task_dir / "pretrain_conditioned.pt"}
    summaries = {mode: RunDir(task_dir / mode).summary for mode in ("qualiteacher", "baseline")}
    missing = [str(p) for p in [*sets.values(), *stage1.values(), *summaries.values()] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"--evaluate-only needs a finished earlier run in {task_dir}; missing {missing}")
    runs = {mode: _run_info(json.loads(path.read_text()), path.parent) for mode, path in summaries.items()}
    timings = {f"train_{mode}": float(r["elapsed_s"] or 0.0) for mode, r in runs.items()}
    return sets, stage1, runs, timings


def stage1_models(base_cfg, args: argparse.Namespace, overrides: list[str], sets: dict[str, Path],
                  task_dir: Path, task: str) -> dict[str, Path]:
    """One stage-1 model for both students: {"baseline": file, "qualiteacher": file}.

    The backbone is pretrained once without score injection (``pretrain.pt``); the
    QualiTeacher student starts from the same weights with zero-initialised injection
    layers attached (``pretrain_conditioned.pt``), so both files compute the same function
    (checked here on a test image) and both students start from the very same teacher. The
    train pipeline cannot do this itself: it builds the student from the stage-1 file's own
    model config and loads it strictly, so a score-conditioned ``pretrain.pt`` breaks a
    baseline (unconditioned) run and vice versa.
    """
    import torch

    from qualiteacher.pipelines.pretrain import pretrain
    from qualiteacher.checkpoint import load_restorer, save_model_file
    from qualiteacher.config import load_config
    from qualiteacher.imageio import list_images, read_image, to_tensor

    backbone_cfg = load_config(args.budget_path, overrides + ["model.score_condition=false"])
    stage1 = task_dir / "pretrain.pt"
    pretrain(backbone_cfg, sets["paired/input"], sets["paired/target"], stage1,
             log=lambda m: log.info("[%s] %s", task, m))
    conditioned = task_dir / "pretrain_conditioned.pt"
    model, _ = load_restorer(stage1, model_cfg=base_cfg.model)
    save_model_file(conditioned, model, base_cfg.model,
                    extra={"stage": "pretrain", "backbone": stage1.name, "task": task})
    backbone, _ = load_restorer(stage1)
    with torch.inference_mode():
        x = to_tensor(read_image(list_images(sets["test/input"])[0]))
        diff = (backbone(x, base_cfg.model.score_cap) - model(x, base_cfg.model.score_cap)).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"the conditioned stage-1 copy differs from the backbone by {diff}")
    return {"baseline": stage1, "qualiteacher": conditioned}


def restore_checked(restore_folder, checkpoint: Path, in_dir: Path, out_dir: Path, score: float) -> None:
    results = restore_folder(checkpoint, in_dir, out_dir, score=score)
    failed = [(str(p), e) for p, e in results if e is not None]
    if failed:
        raise RuntimeError(f"restoring {in_dir} with {checkpoint} at score {score:g} failed: {failed[:3]}")


# ---------------------------------------------------------------------------- plots
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grid_plot(task: str, folders: dict[str, Path], gt_dir: Path, methods: dict[str, dict], path: Path,
              n: int) -> str:
    """Rows: the first ``n`` test images; columns: input, teacher, baseline, QualiTeacher, GT."""
    from qualiteacher.imageio import list_images, read_image

    plt = pyplot()
    names = [p.name for p in list_images(gt_dir)][:max(1, n)]
    columns = [*METHODS, "gt"]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.6 * len(columns), 3.1 * len(names) + 0.4),
                             squeeze=False)
    for r, name in enumerate(names):
        for c, column in enumerate(columns):
            ax = axes[r][c]
            folder = gt_dir if column == "gt" else folders[column]
            ax.imshow(read_image(folder / name))
            ax.set_xticks([]), ax.set_yticks([])
            title = LABELS[column]
            if column != "gt":
                row = next(i for i in methods[column]["per_image"] if i["file"] == name)
                title += f"\n{row['psnr']:.2f} dB, NR {row['ensemble']:.2f}"
            ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"{task}: held-out test images (PSNR vs hidden GT, NR ensemble 0-10)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def controllability_plot(tasks: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    fig, (ax_nr, ax_psnr) = plt.subplots(1, 2, figsize=(10, 4))
    for task, res in tasks.items():
        scores = [s["score"] for s in res["sweep"]]
        line, = ax_nr.plot(scores, [s["ensemble"] for s in res["sweep"]], marker="o",
                           label=f"{task} (rho {res['spearman']['rho']:.2f})")
        ax_nr.axhline(res["methods"]["teacher"]["ensemble"], color=line.get_color(), ls=":", lw=1)
        ax_psnr.plot(scores, [s["psnr"] for s in res["sweep"]], marker="o", color=line.get_color(), label=task)
        ax_psnr.axhline(res["methods"]["teacher"]["psnr"], color=line.get_color(), ls=":", lw=1)
    ax_nr.set(xlabel="score condition", ylabel="mean NR ensemble of the output (0-10)",
              title="Controllability (dotted: stage-1 teacher)")
    ax_psnr.set(xlabel="score condition", ylabel="mean PSNR vs hidden GT (dB)", title="PSNR along the sweep")
    ax_nr.legend(fontsize=8)
    ax_psnr.legend(fontsize=8)
    for ax in (ax_nr, ax_psnr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars_plot(tasks: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    names = list(tasks)
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 3 + 2.2 * len(names)), 4.4))
    width = 0.8 / len(METHODS)
    x = np.arange(len(names))
    for ax, metric, label in ((axes[0], "psnr", "PSNR vs hidden GT (dB)"), (axes[1], "ensemble", "NR ensemble (0-10)")):
        for k, method in enumerate(METHODS):
            values = [tasks[t]["methods"][method][metric] for t in names]
            bars = ax.bar(x + (k - (len(METHODS) - 1) / 2) * width, values, width, label=LABELS[method])
            ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
        if metric == "ensemble":
            ax.scatter(x, [tasks[t]["ground_truth"]["ensemble"] for t in names], marker="_", s=400, color="k",
                       label="ground truth", zorder=3)
        ax.set_xticks(x, names)
        ax.set_ylabel(label)
        lo = min(tasks[t]["methods"][m][metric] for t in names for m in METHODS)
        hi = max(tasks[t]["methods"][m][metric] for t in names for m in METHODS)
        if metric == "ensemble":
            hi = max(hi, max(tasks[t]["ground_truth"]["ensemble"] for t in names))
        pad = 0.15 * (hi - lo) + 1e-6
        ax.set_ylim(lo - pad, hi + 2 * pad)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("Per task: input, stage-1 teacher, baseline student, QualiTeacher student @7 (means over the test set)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- report
def target_status(tasks: dict[str, dict]) -> dict:
    won = sum(res["won"] for res in tasks.values())
    run = len(tasks)
    if won >= TARGET_TASKS_WON:
        tasks_status = "met"
    elif won + (len(TASKS) - run) >= TARGET_TASKS_WON:
        tasks_status = f"undecided: {run} of {len(TASKS)} tasks run, {won} won"
    else:
        tasks_status = f"missed by {TARGET_TASKS_WON - won - (len(TASKS) - run)} task(s)"
    rhos = {t: res["spearman"]["rho"] for t, res in tasks.items()}
    return {
        "tasks_won": {"value": won, "of": run, "target": TARGET_TASKS_WON, "status": tasks_status},
        "spearman": {t: {"rho": r, "target": TARGET_SPEARMAN,
                         "status": "met" if tasks[t]["spearman"]["met"] else
                         ("missed (rho undefined: constant output quality)" if not np.isfinite(r)
                          else f"missed by {TARGET_SPEARMAN - r:.3f}")}
                     for t, r in rhos.items()},
    }


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"


def fmt_signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def write_report(results: dict, out: Path) -> Path:
    tasks = results["tasks"]
    status = results["target_status"]
    budget = results["budget"]
    lines = ["# Restoration quality: QualiTeacher vs stage-1 teacher vs Colabator-style baseline", ""]
    if results["fast"]:
        lines += ["**FAST MODE: tiny model and a few steps; these numbers are NOT meaningful.**", ""]
    lines += [
        f"Command: `{results['command']}`", "",
        (f"{results['machine'][0].upper()}{results['machine'][1:]}; load average at the end {results['load_end']}. "
        f"Wall time {results['elapsed_s']:.0f} s."), "",
        (f"Budget: `{budget['file']}` with overrides `{' '.join(budget['overrides']) or '-'}`: "
        f"pretrain {budget['pretrain_steps']} steps, each student {budget['train_steps']} steps "
        f"(batch {budget['batch_size']} paired + {budget['bank_batch_size']} bank, crop {budget['crop_size']}), "
        f"NAFNet width {budget['width']}, NR ensemble {budget['metrics']}, device "
        f"{'GPU' if budget['use_gpu'] else 'CPU'}. Test set: {budget['test_images']} held-out images of the "
        f"unpaired (\"real\") domain per task, ground truth hidden from training."), "",
        "## Targets", "",
        "| target | value | status |", "|---|---|---|",
        (f"| QualiTeacher @7 beats teacher and baseline in PSNR and NR ensemble on >= {TARGET_TASKS_WON} of 5 tasks "
        f"| {status['tasks_won']['value']} of {status['tasks_won']['of']} run | {status['tasks_won']['status']} |"),
    ]
    for task, s in status["spearman"].items():
        lines.append(f"| controllability Spearman >= {TARGET_SPEARMAN} ({task}) | {fmt(s['rho'], 3)} | {s['status']} |")
    lines += ["", "## Per task (means over the test images)", ""]
    for task, res in tasks.items():
        lines += [f"### {task}", "",
                  "| images | PSNR (dB) | SSIM | NR ensemble (0-10) | NR unscorable |",
                  "|---|---:|---:|---:|---:|"]
        for method in METHODS:
            m = res["methods"][method]
            lines.append(f"| {LABELS[method]} | {fmt(m['psnr'])} | {fmt(m['ssim'], 3)} | {fmt(m['ensemble'])} | "
                         f"{m['nr_failed']} of {m['count']} |")
        g = res["ground_truth"]
        lines.append(f"| {LABELS['gt']} | - | - | {fmt(g['ensemble'])} | {g['nr_failed']} of {g['count']} |")
        lines += ["", "| QualiTeacher @7 vs | PSNR margin (dB) | NR margin (images scored on both sides) | won |",
                  "|---|---:|---:|---|"]
        for other in ("teacher", "baseline"):
            p, e = res["comparisons"][f"psnr_vs_{other}"], res["comparisons"][f"ensemble_vs_{other}"]
            lines.append(f"| {LABELS[other]} | {fmt_signed(p['margin'])} | {fmt_signed(e['margin'])} ({e['images']}) | "
                         f"{'yes' if p['won'] and e['won'] else 'no'} |")
        sp = res["spearman"]
        lines += ["", (f"Task won: **{'yes' if res['won'] else 'no'}**. Controllability: Spearman rho "
                  f"{fmt(sp['rho'], 3)} (p {fmt(sp['p_value'], 4)}) between condition and mean NR ensemble "
                  f"over the {sp['images']} test images scorable at every condition; median per-image rho "
                  f"{fmt(sp['per_image_median'], 3)}."
                  + (f" On the run's calibrated scale (what the condition was trained on; secondary): rho "
                     f"{fmt(sp['calibrated']['rho'], 3)}." if sp.get("calibrated") else "")), "",
                  "| condition | " + " | ".join(f"{s['score']:g}" for s in res["sweep"]) + " |",
                  "|---|" + "---:|" * len(res["sweep"]),
                  "| NR ensemble | " + " | ".join(fmt(s["ensemble"]) for s in res["sweep"]) + " |",
                  *(["| NR ensemble, run's calibrated ranges | "
                     + " | ".join(fmt(s["ensemble_calibrated"]) for s in res["sweep"]) + " |"]
                    if sp.get("calibrated") else []),
                  "| PSNR (dB) | " + " | ".join(fmt(s["psnr"]) for s in res["sweep"]) + " |",
                  "| SSIM | " + " | ".join(fmt(s["ssim"], 3) for s in res["sweep"]) + " |",
                  "| NR unscorable | " + " | ".join(str(s["nr_failed"]) for s in res["sweep"]) + " |", ""]
        runs = res["runs"]
        lines += ["| run | steps | teacher version | bank images / entries | dropped | train time (s) |",
                  "|---|---:|---:|---|---|---:|"]
        for mode in ("qualiteacher", "baseline"):
            r = runs[mode]
            lines.append(f"| {mode} | {r['steps']} | {r['teacher_version']} | {r['bank_images']} / "
                         f"{r['bank_entries']} | {json.dumps(r['dropped'])} | {res['timings_s'][f'train_{mode}']:.0f} |")
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings_s"].items()), "",
                  f"![before/after {task}]({res['grid']})", ""]
    lines += ["## Plots", "", "![controllability](controllability.png)", "", "![per task](per_task.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def budget_info(args: argparse.Namespace) -> dict:
    from qualiteacher.config import load_config

    cfg = load_config(args.budget_path, base_overrides(args))
    return {"file": str(args.budget_path), "overrides": base_overrides(args), "train_steps": cfg.train.steps,
            "pretrain_steps": cfg.pretrain.steps, "batch_size": cfg.train.batch_size,
            "bank_batch_size": cfg.train.bank_batch_size, "crop_size": cfg.data.crop_size,
            "width": cfg.model.width, "metrics": cfg.iqa.metrics, "use_gpu": cfg.train.use_gpu,
            "image_size": cfg.labelling.image_size, "crops_per_image": args.crops, "n_test": args.n_test,
            "test_images": args.n_test * args.crops, "sweep": args.sweep_scores}


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; returns what results.json holds."""
    args = parse_args(argv)
    return with_threads(args.threads, lambda: _main(args, argv))


def with_threads(threads: int, run):
    """``run()`` with this process's torch intra-op threads set to ``threads``; the old
    value is restored after, so a calling process (e.g. pytest) is left as it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def prepare_run(args: argparse.Namespace) -> Path:
    """The report folder, created, and the offline metric weights, prepared."""
    from qualiteacher.config import load_config
    from qualiteacher.iqa.weights import prepare

    args.out.mkdir(parents=True, exist_ok=True)
    prepare(load_config(args.budget_path, base_overrides(args)).paths.resolved_weights_dir(), log=lambda _m: None)
    return args.out


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    started = time.perf_counter()
    out = prepare_run(args)
    budget = budget_info(args)
    machine = machine_line()
    print("== Restoration quality: QualiTeacher vs stage-1 teacher vs baseline")
    print(machine)
    print(f"budget {budget['file']}: pretrain {budget['pretrain_steps']} steps, students {budget['train_steps']} steps "
          f"each, {'GPU' if budget['use_gpu'] else 'CPU'}; tasks {', '.join(args.task_list)}; "
          f"sweep {', '.join(f'{s:g}' for s in args.sweep_scores)}")
    if args.fast:
        print("FAST MODE: tiny model and a few steps; the numbers below are NOT meaningful")
    sys.stdout.flush()

    tasks: dict[str, dict] = {}
    session = contextlib.nullcontext() if args.evaluate_only else ray_session(num_cpus=max(4, os.cpu_count() or 1))
    with session:
        for task in args.task_list:
            tasks[task] = run_task(task, args, out)
    controllability_plot(tasks, out / "controllability.png")
    bars_plot(tasks, out / "per_task.png")
    status = target_status(tasks)
    results = {
        "version": 1, "fast": args.fast,
        "command": "python -m experiments.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget": budget, "tasks": tasks, "tasks_run": list(tasks), "tasks_won": status["tasks_won"]["value"],
        "targets": {"tasks_won": TARGET_TASKS_WON, "of_tasks": len(TASKS), "spearman": TARGET_SPEARMAN},
        "target_status": status, "machine": machine,
        "load_end": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "plots": {"controllability": "controllability.png", "per_task": "per_task.png",
                  "grids": {t: r["grid"] for t, r in tasks.items()}},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report = write_report(results, out)
    print_summary(results)
    print(f"report: {report}  results: {out / 'results.json'}")
    emit_result("quality_tasks_won", results["tasks_won"], "tasks", TARGET_TASKS_WON)
    return results


def print_summary(results: dict) -> None:
    rows = []
    for task, res in results["tasks"].items():
        for method in METHODS:
            m = res["methods"][method]
            rows.append([task, LABELS[method], m["psnr"], m["ssim"], m["ensemble"], f"{m['nr_failed']}/{m['count']}"])
    print()
    print_table(["task", "images", "PSNR dB", "SSIM", "NR ens", "NR unscorable"], rows)
    print()
    rows = []
    for task, res in results["tasks"].items():
        c = res["comparisons"]
        rows.append([task, fmt_signed(c["psnr_vs_teacher"]["margin"]), fmt_signed(c["psnr_vs_baseline"]["margin"]),
                     fmt_signed(c["ensemble_vs_teacher"]["margin"]), fmt_signed(c["ensemble_vs_baseline"]["margin"]),
                     "yes" if res["won"] else "no", fmt(res["spearman"]["rho"], 3)])
    print_table(["task", "dPSNR vs teacher", "dPSNR vs baseline", "dNR vs teacher", "dNR vs baseline", "won",
                 "spearman"], rows)
    s = results["target_status"]
    print(f"\ntarget: tasks won {s['tasks_won']['value']}/{s['tasks_won']['of']} (need {TARGET_TASKS_WON} of "
          f"{len(TASKS)}): {s['tasks_won']['status']}")
    for task, sp in s["spearman"].items():
        print(f"target: controllability Spearman {task} {fmt(sp['rho'], 3)} (need >= {TARGET_SPEARMAN}): {sp['status']}")
    print(f"wall time {format_number(results['elapsed_s'])} s; load average at the end {results['load_end']}")
    sys.stdout.flush()


def script_logging() -> None:
    """Progress lines on stderr when run as a script; Ray and HTTP chatter kept down."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("ray", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    script_logging()
    main()
    sys.exit(0)
