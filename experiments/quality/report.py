"""The targets' status, report.md and the printed summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import format_number, print_table
from experiments.common import fmt, fmt_signed
from experiments.quality.targets import LABELS, METHODS, TARGET_SPEARMAN, TARGET_TASKS_WON, TASKS


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
