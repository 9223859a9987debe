"""The whole experiment: every task in one Ray session, then plots, results.json and the report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import emit_result, machine_line, ray_session
from experiments.common import with_threads
from experiments.quality.args import base_overrides, budget_info, parse_args
from experiments.quality.plots import bars_plot, controllability_plot
from experiments.quality.report import print_summary, target_status, write_report
from experiments.quality.targets import TARGET_SPEARMAN, TARGET_TASKS_WON, TASKS
from experiments.quality.tasks import run_task

RESULT_KEYS = ("version", "fast", "command", "budget", "tasks", "tasks_run", "tasks_won", "targets",
               "target_status", "machine", "elapsed_s")
TASK_KEYS = ("methods", "ground_truth", "sweep", "spearman", "comparisons", "won", "runs", "timings_s")


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; returns what results.json holds."""
    args = parse_args(argv)
    return with_threads(args.threads, lambda: _main(args, argv))


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
