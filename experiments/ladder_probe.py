"""Where the judge's levels put the condition ladder's rungs (no training).

    python -m experiments.ladder_probe --tasks all --out runs/oracle_regions [--fast]

For each task, the stage-1 teacher (the one an earlier `experiments.oracle` run left in
<out>/<task>, or a fresh one) labels the unpaired training inputs; the calibrated NR ensemble
judges the labels, and the rungs of each image's best label (a = 0: the input itself, a = 0.5)
are scored as `labelling.ladder_levels: scored` scored them. Against the inputs' hidden
ground truth it reports how many rungs reach the cap (7), where every level at or above it
trains condition 7, the one inference uses, and the PSNR of what trains there. This is the
measurement behind `ladder_levels: constructed` (experiments/QUALITY.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from experiments import oracle
from experiments.common import with_threads
from experiments.oracle_scorer import psnr

ALPHAS = (0.0, 0.5)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.ladder_probe", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--out", default="runs/ladder_probe", help="an oracle run's --out (its stage-1 files are reused)")
    parser.add_argument("--test-split", choices=("photos", "regions"), default="regions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="tiny budget: checks that it runs")
    args = parser.parse_args(argv)
    tasks = "all" if args.tasks == "all" else args.tasks
    argv_oracle = ["--tasks", tasks, "--ladder", ",".join(map(str, ALPHAS)), "--test-split", args.test_split,
                   "--out", args.out, "--threads", str(args.threads), "--reuse-stage1", "--no-baseline"]
    return oracle.parse_args(argv_oracle + (["--fast"] if args.fast else []))


@torch.no_grad()
def probe(task: oracle.Task) -> dict:
    from qualiteacher.method.augment import multi_aug_pseudo_labels
    from qualiteacher.method.judge import judge, ladder_levels

    cfg, cap = task.cfg, task.cfg.model.score_cap
    teacher = task.stage1_model(cfg, conditioned=True)
    labels = multi_aug_pseudo_labels(teacher, task.inputs, tuple(cfg.labelling.augmentations)).clamp(0, 1)
    verdict = judge(task.nr_ensemble, labels, cfg)
    n, k = labels.shape[:2]
    label_db = psnr(labels.flatten(0, 1), task.hidden_gt.repeat_interleave(k, 0)).reshape(n, k)
    rows = torch.arange(n)
    best = labels[rows, verdict.best]
    rung_levels = ladder_levels(task.nr_ensemble, task.inputs, best, ALPHAS)
    rung_db = torch.stack([psnr(a * best + (1 - a) * task.inputs, task.hidden_gt) for a in ALPHAS], dim=1)
    best_level = verdict.levels[rows, verdict.best]
    at_cap = torch.cat([verdict.levels.flatten(), rung_levels.flatten()]) >= cap
    slot_db = torch.cat([label_db.flatten(), rung_db.flatten()])
    return {"images": n,
            "input_at_cap": float((rung_levels[:, 0] >= cap).float().mean()),
            "half_blend_at_cap": float((rung_levels[:, 1] >= cap).float().mean()),
            "rung_above_its_label": float((rung_levels >= best_level[:, None]).any(dim=1).float().mean()),
            "cap_slots": int(at_cap.sum()), "cap_rungs": int((rung_levels >= cap).sum()),
            "cap_slot_psnr": float(slot_db[at_cap].mean()) if at_cap.any() else float("nan"),
            "label_psnr": float(label_db.mean())}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return with_threads(args.threads, lambda: report(args))


def report(args: argparse.Namespace) -> int:
    print("| task | images | input at the cap | a=0.5 blend at the cap | a rung >= its label | slots at the cap "
          "(rungs) | PSNR of the slots at the cap | PSNR of the labels |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for name in args.task_list:
        r = probe(oracle.Task(name, args))
        print(f"| {name} | {r['images']} | {r['input_at_cap']:.0%} | {r['half_blend_at_cap']:.0%} | "
              f"{r['rung_above_its_label']:.0%} | {r['cap_slots']} ({r['cap_rungs']}) | {r['cap_slot_psnr']:.2f} | "
              f"{r['label_psnr']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
