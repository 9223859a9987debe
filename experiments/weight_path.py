"""Where on the way from the stage-1 teacher does the student lose? One offline-default
student run (NR levels, no reward), then test PSNR along the straight line from the stage-1
weights to the student's, the run's EMA teacher, and the two mixes of backbone and injection.

    python -m experiments.weight_path --task lowlight --seed 1 --out runs/cl2b   [--fast]

`--out` is an `experiments.oracle` run's folder whose stage-1 files are reused. On low light
the student's backbone restored less on its own and its injection at 7 made up for it only
in part (experiments/QUALITY.md, "Low light: the backbone restores less").
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence

from experiments import bank_drift, oracle
from experiments.common import with_threads
from experiments.reference_loop import ReferenceLoop
from qualiteacher.models.injection import injection_parameters

LAMBDAS = (0.0, 0.1, 0.26, 0.5, 0.75, 1.0)
SCORES = (5.0, 6.0, 7.0)


def mix(start: dict, end: dict, share: float, injection: set[str], injection_share: float | None = None) -> dict:
    """start + share x (end - start), the injection layers at `injection_share` (default `share`)."""
    out = {}
    for name, a in start.items():
        b = end[name]
        t = injection_share if injection_share is not None and name in injection else share
        out[name] = a + t * (b - a) if a.is_floating_point() else b
    return out


def psnr_at(task: oracle.Task, model) -> list[float]:
    return [oracle.evaluate(task, model, (s,))["at7"]["psnr"] for s in SCORES]


def report(args: argparse.Namespace) -> int:
    task = oracle.Task(args.task_list[0], args)
    cfg = oracle.cell_config(task, "nr", "off")
    model = task.stage1_model(cfg, conditioned=True)
    start = copy.deepcopy(model.state_dict())
    loop = ReferenceLoop(cfg, model, task.paired, task.inputs, task.hidden_gt, oracle.NRJudge(task.nr_ensemble, cfg))
    loop.run(args.seed_list[0])
    end = copy.deepcopy(model.state_dict())
    injection = set(injection_parameters(model))

    def psnr_of(weights: dict) -> list[float]:
        model.load_state_dict(weights)  # the student's own weights are not needed after this
        return psnr_at(task, model)

    rows = [(f"stage-1 + {lam:g} x (student - stage-1)", psnr_of(mix(start, end, lam, injection))) for lam in LAMBDAS]
    rows.append(("the run's EMA teacher", psnr_at(task, loop.ema.teacher)))
    rows.append(("the student's backbone, the stage-1 injection", psnr_of(mix(start, end, 1.0, injection, 0.0))))
    rows.append(("the stage-1 backbone, the student's injection", psnr_of(mix(start, end, 0.0, injection, 1.0))))
    print("| model | " + " | ".join(f"@{s:g}" for s in SCORES) + " |")
    print("|---|" + "---:|" * len(SCORES))
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = bank_drift.parse_args(argv, "experiments.weight_path", __doc__.splitlines()[0])
    return with_threads(args.threads, lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
