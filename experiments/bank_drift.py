"""Does the bank drift? One offline-default student run (NR levels, no reward), followed
round by round: after each labelling round, the EMA teacher's PSNR @7 on the training inputs
and the bank's labels' mean PSNR, mean level and how many are left from the stage-1 teacher,
all against the inputs' hidden ground truth.

    python -m experiments.bank_drift --task lowlight --seed 1 --out runs/cl1b   [--fast]

`--out` is an `experiments.oracle` run's folder whose stage-1 files are reused. On low light
the labels the gate kept got worse while their level rose (experiments/QUALITY.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import torch

from experiments import oracle
from experiments.common import with_threads
from experiments.oracle_scorer import psnr
from experiments.reference_loop import ReferenceLoop, from_uint8


def parse_args(argv: Sequence[str] | None, prog: str = "experiments.bank_drift",
               description: str = __doc__.splitlines()[0]) -> argparse.Namespace:
    """One offline-default student run's arguments (also experiments.weight_path's)."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    parser.add_argument("--task", default="lowlight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bank_drift", help="an oracle run's --out (its stage-1 files are reused)")
    parser.add_argument("--test-split", choices=("photos", "regions"), default="regions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="tiny budget: checks that it runs")
    args = parser.parse_args(argv)
    argv_oracle = ["--tasks", args.task, "--ladder", "0,0.5", "--test-split", args.test_split, "--out", args.out,
                   "--threads", str(args.threads), "--reuse-stage1", "--no-baseline", "--cells", "nr:off",
                   "--seeds", "1", "--first-seed", str(args.seed)]
    return oracle.parse_args(argv_oracle + (["--fast"] if args.fast else []))


class FollowedLoop(ReferenceLoop):
    """The reference loop, with a row of bank statistics after every labelling round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds: list[dict] = []

    @torch.no_grad()
    def label_all(self, teacher, version: int) -> None:
        super().label_all(teacher, version)
        # label ids are "{image}.v{version}.{augmentation}" (ReferenceLoop._gate)
        rows = [(f"{image_id}.v0." in e.label_id, float(psnr(from_uint8(e.label.image)[None], self.gt[i:i + 1])),
                 e.score)
                for i, image_id in enumerate(self.ids) for e in self.bank.get(image_id, [])]
        teacher_db = float(psnr(teacher(self.inputs, self.cfg.model.score_cap).clamp(0, 1), self.gt).mean())
        self.rounds.append({"version": version, "teacher_psnr": teacher_db, "labels": len(rows),
                            "label_psnr": float(np.mean([r[1] for r in rows])) if rows else float("nan"),
                            "label_level": float(np.mean([r[2] for r in rows])) if rows else float("nan"),
                            "from_stage1": sum(r[0] for r in rows)})


def report(args: argparse.Namespace) -> int:
    task = oracle.Task(args.task_list[0], args)
    cfg = oracle.cell_config(task, "nr", "off")
    model = task.stage1_model(cfg, conditioned=True)
    loop = FollowedLoop(cfg, model, task.paired, task.inputs, task.hidden_gt, oracle.NRJudge(task.nr_ensemble, cfg))
    loop.run(args.seed_list[0])
    print("| round (teacher version) | EMA teacher @7, train PSNR | bank labels | their mean PSNR | their mean level "
          "| from the stage-1 teacher |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in loop.rounds:
        print(f"| {r['version']} | {r['teacher_psnr']:.2f} | {r['labels']} | {r['label_psnr']:.2f} | "
              f"{r['label_level']:.2f} | {r['from_stage1']} |", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return with_threads(args.threads, lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
