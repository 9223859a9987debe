"""The command line and the training budget it selects (shared with experiments.ablation)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import repo_root
from experiments.quality.targets import TASKS
from qualiteacher.data.samples import TEST_SPLITS, test_photo_count

FULL_SWEEP = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
FAST_SWEEP = (0.0, 3.5, 7.0)
DEFAULT_BUDGET = Path("configs/quality_budget.yaml")
FAST_BUDGET = Path("configs/smoke.yaml")
# The fast variant: smoke-sized model, a few steps, one teacher.
FAST_OVERRIDES = (
    "train.steps=4", "train.push_every=2", "train.checkpoint_every=4", "train.bank_wait_s=60",
    "pretrain.steps=4", "labelling.teachers=1", "loss.preference.warmup_steps=2",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    import experiments.quality as package  # its docstring describes the experiment

    parser = argparse.ArgumentParser(prog="python -m experiments.quality", description=package.__doc__.splitlines()[0])
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
    parser.add_argument("--test-split", choices=TEST_SPLITS, default="photos",
                        help="photos: held-out photos (--n-test of them); regions: the other halves of the "
                             "unpaired photos, the training inputs' own distribution (5 photos; ignores --n-test)")
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


def budget_info(args: argparse.Namespace) -> dict:
    from qualiteacher.config import load_config

    cfg = load_config(args.budget_path, base_overrides(args))
    return {"file": str(args.budget_path), "overrides": base_overrides(args), "train_steps": cfg.train.steps,
            "pretrain_steps": cfg.pretrain.steps, "batch_size": cfg.train.batch_size,
            "bank_batch_size": cfg.train.bank_batch_size, "crop_size": cfg.data.crop_size,
            "width": cfg.model.width, "metrics": cfg.iqa.metrics, "use_gpu": cfg.train.use_gpu,
            "image_size": cfg.labelling.image_size, "crops_per_image": args.crops, "n_test": args.n_test,
            "test_split": args.test_split,
            "test_images": test_photo_count(args.n_test, args.test_split) * args.crops, "sweep": args.sweep_scores}
