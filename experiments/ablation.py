"""The paper's ablation (its Table 3): rows (a) to (e), each adding one part of the method.

    python -m experiments.ablation --tasks haze [--rows a,b,c,d,e] [--repeats 3] [--out runs/ablation] \
        [--budget configs/quality_budget.yaml] [--set train.steps=400 ...] [--fast]

The rows switch the four parts that `configs/*.yaml` can turn off, one at a time and in
this order (row (e) is the full method, the `qualiteacher` run of `experiments.quality`):

    (a) pseudo-labels only: multi-aug PLs, top-3 bank, block weights; no score condition
    (b) + score condition (Eqs. 5-7; restored at score 7)
    (c) + score-based preference optimisation (Eq. 8)
    (d) + cropped consistency (Eq. 9)
    (e) + dual drop: QualiTeacher

Per task everything else is what `experiments.quality` does: the same sets, one stage-1
model (row (a) starts from the unconditioned file, rows (b)-(e) from the same weights with
zero-initialised injection layers), the same budget and seed, each row in its own run
folder, Ray namespace and embedded Redis. Each row is evaluated on the held-out test set
(PSNR / SSIM against the hidden ground truth, NR ensemble 0-10) and the score-conditioned
rows also get the controllability sweep (Spearman between condition and NR ensemble).

A part "helps" when adding it raised both PSNR and the NR ensemble over the row before
(the paper's claim for every row). Writes ``ablation.md``, ``ablation.json`` and
``ablation.png`` into the report folder; the last line printed is

    RESULT ablation_parts_helping <n> parts target <4 x tasks>

Runs of the same config vary (the labeller and the student run concurrently, so the bank's
content depends on timing; `experiments/QUALITY.md` measured up to 0.6 in NR between two
runs of one config): ``--repeats N`` trains every row N times (student seeds seed, seed+1,
...) and reports the means with the range over the runs, so a difference between rows can
be read against that noise. ``--fast`` only shows that the script works: its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import emit_result, machine_line, print_table, ray_session
from experiments.common import fmt, fmt_signed, script_logging, with_threads
from experiments.quality.args import add_run_arguments, base_overrides, budget_info, finish_run_arguments
from experiments.quality.evaluate import common_nr_mean, controllability, evaluate, restore_checked, scored_names, spearman
from experiments.quality.plots import pyplot
from experiments.quality.run import prepare_run
from experiments.quality.tasks import prepare_task, train_student


@dataclass(frozen=True)
class Row:
    name: str  # what this row adds, for the report
    overrides: tuple[str, ...]  # on top of the budget config (whose method is the full one)
    conditioned: bool  # score-conditioned student: starts from the conditioned stage-1 copy, gets a sweep


# Cumulative: each row turns one more part on. The budget config has every part on.
ROWS: dict[str, Row] = {
    "a": Row("pseudo-labels only", ("model.score_condition=false", "loss.preference.enabled=false",
                                    "loss.consistency.enabled=false", "drop.enabled=false"), False),
    "b": Row("+ score condition", ("loss.preference.enabled=false", "loss.consistency.enabled=false",
                                   "drop.enabled=false"), True),
    "c": Row("+ preference (Eq. 8)", ("loss.consistency.enabled=false", "drop.enabled=false"), True),
    "d": Row("+ cropped consistency (Eq. 9)", ("drop.enabled=false",), True),
    "e": Row("+ dual drop (QualiTeacher)", (), True),
}
FAST_SWEEP = (0.0, 7.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__.splitlines()[0])
    add_run_arguments(parser, out=Path("runs/ablation"))
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows to run, of {', '.join(ROWS)} (default all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="student runs per row, seeds seed, seed+1, ... (default 1); rows report the mean "
                             "and the range, so a difference between rows can be read against the noise")
    args = parser.parse_args(argv)
    finish_run_arguments(parser, args)
    if args.fast and args.sweep is None:
        args.sweep_scores = list(FAST_SWEEP)
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.row_list if r not in ROWS]
    if unknown or not args.row_list:
        parser.error(f"unknown row(s) {unknown or args.rows!r}; known: {', '.join(ROWS)}")
    args.row_list = [r for r in ROWS if r in args.row_list]  # table order, whatever the order given
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


# ---------------------------------------------------------------------------- one task
def run_task(task: str, args: argparse.Namespace, out: Path) -> dict:
    from qualiteacher.config import load_config
    from qualiteacher.iqa.ensemble import IQAEnsemble

    task_dir = out / task
    overrides = base_overrides(args) + [f"data.task={task}"]
    base_cfg = load_config(args.budget_path, overrides)
    sets, stage1, timings = prepare_task(task, args, task_dir, overrides, base_cfg)
    ensemble = IQAEnsemble.from_config(base_cfg)
    cap = base_cfg.model.score_cap
    restored = task_dir / "restored"
    teacher = evaluate_checkpoint(stage1["baseline"], sets, ensemble, restored / "teacher", cap)
    rows: dict[str, dict] = {}
    for key in args.row_list:
        row = ROWS[key]
        runs = []
        for r in range(args.repeats):
            name = f"row_{key}" if args.repeats == 1 else f"row_{key}_seed{base_cfg.seed + r}"
            runs.append(run_row(task, args, row, name, task_dir, overrides, sets, stage1, ensemble, cap,
                                base_cfg.seed + r, timings))
        rows[key] = {"name": row.name, "overrides": list(row.overrides), **mean_of_runs(runs)}
    mark_helping(rows, teacher)
    return {"teacher": teacher, "rows": rows, "timings_s": {k: round(v, 1) for k, v in timings.items()}}


def run_row(task, args, row: Row, name: str, task_dir: Path, overrides: list[str], sets: dict[str, Path],
            stage1: dict[str, Path], ensemble, cap: float, seed: int, timings: dict) -> dict:
    """One student run of ``row`` with ``seed``, evaluated at the cap (and swept if conditioned)."""
    start = stage1["qualiteacher" if row.conditioned else "baseline"]
    info, timings[f"train_{name}"] = train_student(
        task, args, task_dir / name, overrides, sets, start, ["train.mode=qualiteacher", f"seed={seed}", *row.overrides])
    t0 = time.perf_counter()
    checkpoint = Path(info["checkpoint"])
    result = {"seed": seed, "run": info,
              "at_cap": evaluate_checkpoint(checkpoint, sets, ensemble, task_dir / "restored" / name, cap)}
    if row.conditioned:
        sweep, rho = controllability(checkpoint, sets, ensemble, task_dir / "restored" / f"{name}_score",
                                             args.sweep_scores, task_dir / name)
        result["sweep"] = [{k: p[k] for k in ("score", "psnr", "ssim", "ensemble", "images")} for p in sweep]
        result["spearman"] = {k: rho[k] for k in ("rho", "p_value", "images", "met")}
    timings[f"evaluate_{name}"] = time.perf_counter() - t0
    return result


def mean_of_runs(runs: list[dict]) -> dict:
    """A row from its runs: means (per image too, so NR margins keep to commonly scored
    images), each metric's range over the runs, the mean sweep and its Spearman rho."""
    first = runs[0]["at_cap"]
    at_cap = {k: float(np.mean([r["at_cap"][k] for r in runs])) for k in ("psnr", "ssim", "ensemble")}
    at_cap["per_image"] = [{"file": item["file"],
                            "psnr": float(np.mean([r["at_cap"]["per_image"][i]["psnr"] for r in runs])),
                            "ensemble": float(np.mean([r["at_cap"]["per_image"][i]["ensemble"] for r in runs]))}
                           for i, item in enumerate(first["per_image"])]
    at_cap["nr_failed"] = max(r["at_cap"]["nr_failed"] for r in runs)
    at_cap["count"] = first["count"]
    out = {"at_cap": at_cap, "runs": runs, "train_s": float(np.mean([r["run"]["elapsed_s"] or 0 for r in runs])),
           "range": {k: [min(r["at_cap"][k] for r in runs), max(r["at_cap"][k] for r in runs)]
                     for k in ("psnr", "ssim", "ensemble")}}
    if "sweep" in runs[0]:
        out["sweep"] = [{"score": point["score"],
                         **{k: float(np.mean([r["sweep"][i][k] for r in runs])) for k in ("psnr", "ssim", "ensemble")}}
                        for i, point in enumerate(runs[0]["sweep"])]
        rho = spearman([p["score"] for p in out["sweep"]], [p["ensemble"] for p in out["sweep"]])
        out["spearman"] = rho | {"per_run": [r["spearman"]["rho"] for r in runs]}
    return out


def evaluate_checkpoint(checkpoint: Path, sets: dict[str, Path], ensemble, folder: Path, score: float) -> dict:
    """The test set restored by ``checkpoint`` at ``score``, evaluated (per image: file, PSNR, NR)."""
    from qualiteacher.pipelines.restore import restore_folder

    restore_checked(restore_folder, checkpoint, sets["test/input"], folder, score)
    result = evaluate(folder, ensemble, sets["test/target"])
    return {k: result[k] for k in ("psnr", "ssim", "ensemble", "count", "nr_failed")} | {
        "per_image": [{k: i.get(k) for k in ("file", "psnr", "ensemble")} for i in result["per_image"]]}


def mark_helping(rows: dict[str, dict], teacher: dict) -> None:
    """Margins of each row over the stage-1 teacher and over the row before it; "helps"
    when the part the row adds raised both PSNR and NR ensemble (NR over the images both
    sides could score)."""
    previous = None
    for key, row in rows.items():
        here = row["at_cap"]
        row["vs_teacher"] = margins(here, teacher)
        order = list(ROWS)
        if previous is not None and order.index(key) == order.index(previous[0]) + 1:  # the row it adds to
            row["vs_previous"] = margins(here, previous[1]["at_cap"])
            row["helps"] = bool(row["vs_previous"]["psnr"] > 0 and row["vs_previous"]["ensemble"] > 0)
        previous = (key, row)


def margins(a: dict, b: dict) -> dict:
    names = scored_names(a, b)
    return {"psnr": a["psnr"] - b["psnr"],
            "ensemble": common_nr_mean(a, names) - common_nr_mean(b, names),
            "nr_images": len(names)}


# ---------------------------------------------------------------------------- report
def write_report(results: dict, out: Path) -> Path:
    f, signed = fmt, fmt_signed
    lines = ["# Ablation: the parts of QualiTeacher, one row at a time", ""]
    if results["fast"]:
        lines += ["**FAST MODE: tiny model and a few steps; these numbers are NOT meaningful.**", ""]
    lines += [f"Command: `{results['command']}`", "",
              f"{results['machine']}. Wall time {results['elapsed_s']:.0f} s.", "",
              (f"Budget: `{results['budget']['file']}` with overrides "
               f"`{' '.join(results['budget']['overrides']) or '-'}`; each row is {results['repeats']} run(s) of "
               "that config with the row's overrides (student seeds seed, seed+1, ...; one stage-1 model): means, "
               "and in brackets the range over the runs. A part helps when its row's means beat the row before it "
               "in both PSNR and NR. Spearman: of the mean sweep."), "",
              f"Parts that helped: **{results['parts_helping']}** of {results['parts_compared']} compared.", ""]
    for task, res in results["tasks"].items():
        t = res["teacher"]
        lines += [f"## {task}", "",
                  ("| row | adds | PSNR (dB) | SSIM | NR ensemble | vs row before: PSNR / NR | helps | "
                   "vs teacher: PSNR / NR | Spearman | train (s) |"),
                  "|---|---|---:|---:|---:|---|---|---|---:|---:|",
                  (f"| teacher | stage-1 model @7 | {f(t['psnr'])} | {f(t['ssim'], 3)} | {f(t['ensemble'])} "
                   "| - | - | - | - | - |")]
        for key, row in res["rows"].items():
            vt, vp = row["vs_teacher"], row.get("vs_previous")
            before = f"{signed(vp['psnr'])} / {signed(vp['ensemble'])}" if vp else "-"
            helps = ("yes" if row["helps"] else "no") if "helps" in row else "-"
            rho = f(row["spearman"]["rho"], 3) if "spearman" in row else "-"
            cells = [_with_range(row, "psnr", 2), _with_range(row, "ssim", 3), _with_range(row, "ensemble", 2)]
            lines.append(f"| ({key}) | {row['name']} | {' | '.join(cells)} | {before} | {helps} | "
                         f"{signed(vt['psnr'])} / {signed(vt['ensemble'])} | {rho} | {row['train_s']:.0f} |")
        lines += ["", "Overrides per row: " + "; ".join(
            f"({k}) `{' '.join(r['overrides']) or '-'}`" for k, r in res["rows"].items()), ""]
    lines += ["![ablation](ablation.png)", ""]
    path = out / "ablation.md"
    path.write_text("\n".join(lines))
    return path


def _with_range(row: dict, metric: str, digits: int) -> str:
    """The row's mean, with the range over its runs when there are several."""
    mean = fmt(row["at_cap"][metric], digits)
    if len(row["runs"]) == 1:
        return mean
    low, high = row["range"][metric]
    return f"{mean} ({fmt(low, digits)}-{fmt(high, digits)})"


def ablation_plot(tasks: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.2 * len(tasks)), squeeze=False)
    for r, (task, res) in enumerate(tasks.items()):
        keys = list(res["rows"])
        for ax, metric, label in ((axes[r][0], "psnr", "PSNR vs hidden GT (dB)"),
                                  (axes[r][1], "ensemble", "NR ensemble (0-10)")):
            values = [res["rows"][k]["at_cap"][metric] for k in keys]
            spread = np.array([[v - res["rows"][k]["range"][metric][0] for k, v in zip(keys, values)],
                               [res["rows"][k]["range"][metric][1] - v for k, v in zip(keys, values)]])
            bars = ax.bar([f"({k})" for k in keys], values, color="tab:blue", yerr=spread, capsize=3)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
            ax.axhline(res["teacher"][metric], color="k", ls=":", lw=1, label="stage-1 teacher")
            finite = [v for v in [*values, res["teacher"][metric],
                                  *(x for k in keys for x in res["rows"][k]["range"][metric])] if np.isfinite(v)]
            if finite:
                pad = 0.2 * (max(finite) - min(finite)) + 0.05
                ax.set_ylim(min(finite) - pad, max(finite) + pad)
            ax.set(title=f"{task}: {label}")
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("; ".join(f"({k}) {row.name}" for k, row in ROWS.items())
                 + "\nbars: mean over the row's runs; whiskers: their range", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    """Run the ablation; returns what ablation.json holds."""
    args = parse_args(argv)
    return with_threads(args.threads, lambda: _main(args, argv))


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    started = time.perf_counter()
    out = prepare_run(args)
    machine = machine_line()
    print("== Ablation: rows " + ", ".join(f"({k}) {ROWS[k].name}" for k in args.row_list))
    print(machine)
    if args.fast:
        print("FAST MODE: tiny model and a few steps; the numbers below are NOT meaningful")
    sys.stdout.flush()
    tasks: dict[str, dict] = {}
    with ray_session(num_cpus=max(4, os.cpu_count() or 1)):
        for task in args.task_list:
            tasks[task] = run_task(task, args, out)
    compared = [row for res in tasks.values() for row in res["rows"].values() if "helps" in row]
    results = {
        "version": 1, "fast": args.fast,
        "command": "python -m experiments.ablation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "budget": budget_info(args), "rows": {k: {"name": r.name, "overrides": list(r.overrides)}
                                                      for k, r in ROWS.items() if k in args.row_list},
        "tasks": tasks, "parts_helping": sum(row["helps"] for row in compared), "parts_compared": len(compared),
        "repeats": args.repeats, "machine": machine, "elapsed_s": round(time.perf_counter() - started, 1),
    }
    (out / "ablation.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    ablation_plot(tasks, out / "ablation.png")
    report = write_report(results, out)
    print_summary(results)
    print(f"report: {report}  results: {out / 'ablation.json'}")
    emit_result("ablation_parts_helping", results["parts_helping"], "parts", len(compared))
    return results


def print_summary(results: dict) -> None:
    rows = []
    for task, res in results["tasks"].items():
        t = res["teacher"]
        rows.append([task, "teacher", t["psnr"], t["ssim"], t["ensemble"], "-", "-", "-"])
        for key, row in res["rows"].items():
            vp = row.get("vs_previous")
            rows.append([task, f"({key}) {row['name']}", _with_range(row, "psnr", 2), _with_range(row, "ssim", 3),
                         _with_range(row, "ensemble", 2),
                         fmt_signed(vp["psnr"]) if vp else "-", fmt_signed(vp["ensemble"]) if vp else "-",
                         fmt(row["spearman"]["rho"], 3) if "spearman" in row else "-"])
    print()
    print_table(["task", "row", "PSNR dB", "SSIM", "NR ens", "dPSNR vs prev", "dNR vs prev", "spearman"], rows)
    print(f"\nparts that helped (both PSNR and NR above the row before): {results['parts_helping']} of "
          f"{results['parts_compared']}; wall time {results['elapsed_s']:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    script_logging()
    main()
    sys.exit(0)
