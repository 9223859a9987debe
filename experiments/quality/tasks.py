"""One task: its sets, one stage-1 model, the two students, and their evaluation."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from experiments.quality.args import base_overrides
from experiments.quality.evaluate import compare_methods, controllability, evaluate, restore_checked
from experiments.quality.plots import grid_plot

log = logging.getLogger("experiments.quality")


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
                          n_test=args.n_test, crops_per_image=args.crops, overwrite=True,
                          test_split=args.test_split)
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


def stage1_files(task_dir: Path) -> dict[str, Path]:
    """Where `stage1_models` writes the two stage-1 files of a task folder."""
    return {"baseline": task_dir / "pretrain.pt", "qualiteacher": task_dir / "pretrain_conditioned.pt"}


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
    files = stage1_files(task_dir)
    stage1 = files["baseline"]
    pretrain(backbone_cfg, sets["paired/input"], sets["paired/target"], stage1,
             log=lambda m: log.info("[%s] %s", task, m))
    conditioned = files["qualiteacher"]
    model, _ = load_restorer(stage1, model_cfg=base_cfg.model)
    save_model_file(conditioned, model, base_cfg.model,
                    extra={"stage": "pretrain", "backbone": stage1.name, "task": task})
    backbone, _ = load_restorer(stage1)
    with torch.inference_mode():
        x = to_tensor(read_image(list_images(sets["test/input"])[0]))
        diff = (backbone(x, base_cfg.model.score_cap) - model(x, base_cfg.model.score_cap)).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"the conditioned stage-1 copy differs from the backbone by {diff}")
    return files
