"""The oracle factorial (issue 15): is it the framework or the NR metrics that fails?

    python -m experiments.oracle --tasks haze --seeds 3 [--cells all] [--ladder 0,0.5] [--fast]
    python -m experiments.oracle --merge runs/f_s0 runs/f_s1 runs/f_s2 --out runs/f   # seeds run apart

Crosses where the labels' levels, drops and gating come from, {nr, oracle}, with the reward
of Eqs. 8-9, {off, nr, oracle}; each cell is a student run of the in-process reference loop
(`experiments.reference_loop`: the method's core pieces in turn, no Ray or Redis) from the same
stage-1 teacher, on the same sets and budget, one run per seed. The oracle is PSNR against
hidden ground truth (`experiments.oracle_scorer`); oracle-level cells also score the condition
ladder's rungs with it (`labelling.ladder_levels: scored`), NR-level cells keep the budget's
rule. Per cell it reports, on a held-out test set of the "real" domain (ground truth hidden
from training):

- QualiTeacher at score 7 against the stage-1 teacher and the Colabator-style baseline
  (`Config.as_baseline`, NR levels, same loop and budget), in PSNR, SSIM and NR ensemble;
- controllability: Spearman of condition 0..7 against mean PSNR and against mean NR.

Means over seeds with their range. Writes ``oracle.md`` and ``oracle.json`` into ``--out``
and ends with ``RESULT oracle_controllable_cells <n> cells target <all oracle-level cells>``.
``--fast``: tiny budget, numbers meaningless. ``--merge``: one report from runs of other seeds
(each its own process, ``--first-seed``), which must share the stage-1 teacher and test set.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit_result, machine_line, print_table
from experiments.common import fmt, with_threads
from experiments.oracle_scorer import OracleReward, OracleScorer
from experiments.quality.evaluate import spearman
from experiments.quality.targets import TASKS
from experiments.quality.tasks import stage1_files, stage1_models
from experiments.reference_loop import NRJudge, OracleJudge, ReferenceLoop, fit_oracle_scale, from_uint8, to_uint8

log = logging.getLogger(__name__)

LEVELS = ("nr", "oracle")
REWARDS = ("off", "nr", "oracle")
SWEEP = tuple(float(s) for s in range(8))
FAST_OVERRIDES = ("train.steps=6", "train.push_every=3", "pretrain.steps=4", "loss.preference.warmup_steps=2")
TARGET_SPEARMAN = 0.9


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.oracle", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="haze", help=f"comma-separated, or 'all' ({', '.join(TASKS)})")
    parser.add_argument("--cells", default="all",
                        help="comma-separated level:reward cells (e.g. oracle:off,nr:nr), or 'all' (the six)")
    parser.add_argument("--seeds", type=int, default=3, help="student runs per cell (seeds F..F+N-1)")
    parser.add_argument("--first-seed", type=int, default=0, help="F: the first seed (to add seeds to a run)")
    parser.add_argument("--ladder", default="",
                        help="labelling.ladder blends, e.g. 0,0.5 (not in the paper; default: the budget's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline runs")
    parser.add_argument("--budget", type=Path, default=Path("configs/quality_budget.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n-test", type=int, default=3, help="source photos held out for the test set")
    parser.add_argument("--crops-per-image", type=int, default=8, help="crops per source photo in every set")
    parser.add_argument("--test-split", choices=("photos", "regions"), default="photos",
                        help="photos: held-out photos (--n-test); regions: the unpaired photos' other halves, "
                             "a test set from the unpaired set's distribution (qualiteacher.data.samples)")
    parser.add_argument("--out", type=Path, default=Path("runs/oracle"))
    parser.add_argument("--reuse-stage1", action="store_true",
                        help="use the stage-1 models an earlier run left in <out>/<task> (same budget, "
                             "split and threads) instead of pretraining again: compares cells with that run's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="tiny budget: checks that it runs")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                        help="train nothing: one report in --out from the oracle.json of runs of other seeds")
    args = parser.parse_args(argv)
    args.task_list = list(TASKS) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
    if any(t not in TASKS for t in args.task_list):
        parser.error(f"unknown task in {args.tasks!r}; known: {', '.join(TASKS)}")
    pairs = [(lv, rw) for lv in LEVELS for rw in REWARDS] if args.cells == "all" else \
        [tuple(c.split(":")) for c in args.cells.split(",") if c]
    if any(len(c) != 2 or c[0] not in LEVELS or c[1] not in REWARDS for c in pairs):
        parser.error(f"--cells takes level:reward pairs with level in {LEVELS} and reward in {REWARDS}")
    args.cell_list = pairs
    args.ladder_alphas = tuple(float(a) for a in args.ladder.split(",") if a.strip())
    if args.ladder_alphas:  # the same switch as a user's: labelling.ladder
        args.overrides.append(f"labelling.ladder=[{', '.join(map(str, args.ladder_alphas))}]")
    if args.fast:
        args.overrides = list(FAST_OVERRIDES) + args.overrides
        args.crops_per_image, args.seeds = 2, 1
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    return args


# ---------------------------------------------------------------------------- one task
class Task:
    """Sets, stage-1 models, the NR ensemble, the calibrated config and the oracle's scale."""

    def __init__(self, task: str, args: argparse.Namespace):
        from qualiteacher.config import load_config
        from qualiteacher.data.paired import PairedImages, UnpairedImages
        from qualiteacher.data.samples import HIDDEN_SPLIT, make_task_sets
        from qualiteacher.iqa.ensemble import IQAEnsemble

        self.name, self.dir = task, args.out / task
        self.overrides = list(args.overrides) + [f"data.task={task}"]
        cfg = load_config(args.budget, self.overrides)
        size = cfg.labelling.image_size or 128
        self.sets = make_task_sets(task, self.dir / "data", seed=cfg.seed, size=size, n_test=args.n_test,
                                   test_split=args.test_split,
                                   crops_per_image=args.crops_per_image, overwrite=True, hidden_targets=True)
        self.stage1 = self._stage1(cfg, args)
        self.paired = PairedImages(self.sets["paired/input"], self.sets["paired/target"])
        unpaired = UnpairedImages(self.sets["unpaired/input"], size=size)
        hidden = {p.stem: p for p in sorted(self.sets[HIDDEN_SPLIT].iterdir())}
        self.inputs = torch.stack([from_uint8(img) for img in unpaired.images])
        self.hidden_gt = torch.stack([from_uint8(_read(hidden[Path(p).stem])) for p in unpaired.paths])
        self.test_x = torch.stack([from_uint8(_read(p)) for p in sorted(self.sets["test/input"].iterdir())])
        self.test_gt = np.stack([_read(p) for p in sorted(self.sets["test/target"].iterdir())])
        self.registry_ensemble = IQAEnsemble.from_config(cfg)  # NR for reports: fixed (registry) ranges
        teacher = self.stage1_model(cfg, conditioned=True)
        self.cfg = self._calibrated(cfg, teacher)
        self.nr_ensemble = IQAEnsemble.from_config(self.cfg)
        self.oracle_scale = fit_oracle_scale(teacher, self.inputs, self.hidden_gt, tuple(cfg.labelling.augmentations))
        self.oracle_taus = self._oracle_thresholds(teacher)

    def _stage1(self, cfg, args: argparse.Namespace) -> dict[str, Path]:
        files = stage1_files(self.dir)
        if args.reuse_stage1 and all(f.is_file() for f in files.values()):
            log.info("[%s] reusing the stage-1 models in %s", self.name, self.dir)
            return files
        return stage1_models(cfg, argparse.Namespace(budget_path=args.budget), self.overrides, self.sets,
                             self.dir, self.name)

    def stage1_model(self, cfg, conditioned: bool):
        from qualiteacher.checkpoint import load_restorer

        model, _ = load_restorer(self.stage1["qualiteacher" if conditioned else "baseline"],
                                 model_cfg=cfg.model if conditioned else None)
        return model.eval()

    def _calibrated(self, cfg, teacher):
        """The run's NR scale and drop thresholds, as `qualiteacher.pipelines.train.calibrate_run` fits them."""
        from qualiteacher.calibration import calibrate
        from qualiteacher.iqa.ensemble import IQAEnsemble

        ensemble = IQAEnsemble.from_config(cfg)
        clean = torch.stack([from_uint8(img) for img in self.paired.targets]) if _same_size(self.paired.targets) \
            else torch.empty(0)
        fitted = calibrate(ensemble, teacher, self.inputs.split(8), tuple(cfg.labelling.augmentations),
                           cfg.iqa.calibration_percentiles, cfg.drop.calibrate_keep, clean=clean.split(8),
                           fit_scale=cfg.iqa.calibrate)
        return fitted.applied_to(cfg)

    def _oracle_thresholds(self, teacher) -> tuple[float, float]:
        from qualiteacher.method.augment import multi_aug_pseudo_labels
        from qualiteacher.method.drop import calibrate_thresholds

        judge = OracleJudge(OracleScorer(self.oracle_scale, self.cfg.iqa.block_grid, self.cfg.iqa.min_block_weight),
                            self.cfg)
        labels = multi_aug_pseudo_labels(teacher, self.inputs, tuple(self.cfg.labelling.augmentations)).clamp(0, 1)
        keep = self.cfg.drop.calibrate_keep or 0.85
        return calibrate_thresholds(judge.normalized(labels, self.hidden_gt), keep)


def _read(path: Path) -> np.ndarray:
    from qualiteacher.imageio import read_image

    return read_image(path)


def _same_size(images: list[np.ndarray]) -> bool:
    return len({img.shape for img in images}) == 1


# ---------------------------------------------------------------------------- runs
def cell_config(task: Task, level: str, reward: str):
    cfg = task.cfg
    pref = cfg.loss.preference.model_copy(update={"enabled": reward != "off"})
    # Eq. 9 guards a metric reward against hacking; the oracle cannot be hacked, and its crops
    # would need ground truth crops the loss does not carry: off with the oracle reward.
    cons = cfg.loss.consistency.model_copy(update={"enabled": reward == "nr"})
    update = {"loss": cfg.loss.model_copy(update={"preference": pref, "consistency": cons})}
    if level == "oracle":
        update["drop"] = cfg.drop.model_copy(update=dict(zip(("tau_multi", "tau_aug"), task.oracle_taus)))
        # The ladder's rungs are measured by the oracle, not set by construction: construction
        # (a x the label's level) stands in for a noisy NR score, but the oracle measures a rung's
        # PSNR, and the rule's levels bent the top of the sweep on snow and rain
        # (experiments/QUALITY.md, "Oracle-level cells with scored rungs").
        update["labelling"] = cfg.labelling.model_copy(update={"ladder_levels": "scored"})
    return cfg.model_copy(update=update)


def run_cell(task: Task, level: str, reward: str, seed: int) -> dict:
    cfg = cell_config(task, level, reward)
    oracle = OracleScorer(task.oracle_scale, cfg.iqa.block_grid, cfg.iqa.min_block_weight)
    judge = OracleJudge(oracle, cfg) if level == "oracle" else NRJudge(task.nr_ensemble, cfg)
    reward_fn = {"off": None, "nr": task.nr_ensemble.reward, "oracle": OracleReward(task.oracle_scale)}[reward]
    model = task.stage1_model(cfg, conditioned=True)
    paired = copy.copy(task.paired)
    if cfg.loss.supervised_condition == "target_score":
        paired.levels = _paired_levels(task, cfg, level)
    loop = ReferenceLoop(cfg, model, paired, task.inputs, task.hidden_gt, judge, reward_fn)
    t0 = time.perf_counter()
    stats = loop.run(seed)
    result = evaluate(task, model, SWEEP)
    result["train_psnr7"] = train_psnr(task, model, cfg.model.score_cap)
    # The EMA teacher the run ends with, at 7: the model mean-teacher methods often ship.
    result["ema_at7"] = evaluate(task, loop.ema.teacher, (cfg.model.score_cap,))["at7"]
    result.update(seconds=round(time.perf_counter() - t0, 1), loop_seconds={k: round(v, 1) for k, v in stats.seconds.items()},
                  dropped=stats.dropped,
                  bank_labels=sum(len(v) for v in loop.bank.values()),
                  bank_levels=[round(e.score, 2) for v in loop.bank.values() for e in v])
    return result


def _paired_levels(task: Task, cfg, level: str) -> torch.Tensor:
    """Each paired target's condition on the run's scale: its NR score, or for the oracle the
    top of the scale (a clean target is as good as a label can be)."""
    from qualiteacher.student_step import target_levels

    if level == "oracle":
        return torch.full((len(task.paired.targets),), cfg.model.score_cap)
    return target_levels(cfg, task.paired.targets)


def run_baseline(task: Task, seed: int) -> dict:
    cfg = task.cfg.as_baseline()  # the run's NR scale (calibrated iqa) kept
    model = task.stage1_model(cfg, conditioned=False)
    loop = ReferenceLoop(cfg, model, copy.copy(task.paired), task.inputs, task.hidden_gt,
                         NRJudge(task.nr_ensemble, cfg))
    loop.run(seed)
    result = evaluate(task, model, (cfg.model.score_cap,))
    result["train_psnr7"] = train_psnr(task, model, cfg.model.score_cap)
    result["ema_at7"] = evaluate(task, loop.ema.teacher, (cfg.model.score_cap,))["at7"]
    print(f"[{task.name}] baseline seed {seed}: PSNR@7 {result['at7']['psnr']:.2f}, train PSNR@7 "
          f"{result['train_psnr7']:.2f}, EMA@7 {result['ema_at7']['psnr']:.2f}", flush=True)
    return result


@torch.no_grad()
def evaluate(task: Task, model, scores: Sequence[float]) -> dict:
    """Per condition: mean PSNR / SSIM against the hidden test ground truth and mean NR
    ensemble (registry ranges) of the restored test set."""
    from qualiteacher.evaluation import reference_scores

    model.eval()
    points = []
    for score in scores:
        out = model(task.test_x, score).clamp(0, 1)
        images = to_uint8(out)
        ref = [reference_scores(images[i], task.test_gt[i]) for i in range(len(images))]
        nr = task.registry_ensemble.score(from_uint8(images)).ensemble10
        points.append({"score": score, "psnr": float(np.mean([r["psnr"] for r in ref])),
                       "ssim": float(np.mean([r["ssim"] for r in ref])), "nr": float(np.nanmean(nr.numpy()))})
    at_cap = points[-1]
    out = {"at7": {k: at_cap[k] for k in ("psnr", "ssim", "nr")}, "sweep": points}
    if len(points) > 2:
        xs = [p["score"] for p in points]
        out["spearman_psnr"] = spearman(xs, [p["psnr"] for p in points])["rho"]
        out["spearman_nr"] = spearman(xs, [p["nr"] for p in points])["rho"]
    return out


@torch.no_grad()
def train_psnr(task: Task, model, score: float) -> float:
    """Mean PSNR at `score` on the run's own unpaired training inputs against their hidden
    ground truth: beside the test PSNR it shows how much of a reward's gain generalises."""
    from experiments.oracle_scorer import psnr

    model.eval()
    out = torch.cat([model(x, score).clamp(0, 1) for x in task.inputs.split(16)])
    return float(psnr(to_uint8_float(out), task.hidden_gt).mean())


def to_uint8_float(images: torch.Tensor) -> torch.Tensor:
    """Quantised as saved images are, so train and test PSNR compare like with like."""
    return (images * 255).round() / 255


def teacher_result(task: Task) -> dict:
    model = task.stage1_model(task.cfg, conditioned=False)
    at7 = evaluate(task, model, (task.cfg.model.score_cap,))["at7"]
    return at7 | {"train_psnr7": train_psnr(task, model, task.cfg.model.score_cap)}


# ---------------------------------------------------------------------------- summary
def _load_results(folder: Path) -> dict:
    path = folder / "oracle.json"
    if not path.is_file():
        raise SystemExit(f"--merge: {path} does not exist (a folder an earlier run wrote with --out)")
    results = json.loads(path.read_text())
    results["source"] = str(folder)
    return results


def merge_results(parts: list[dict], command: str) -> dict:
    """One result from runs of the same tasks, cells, stage-1 teachers and test sets at other
    seeds: every cell re-summarised over all its runs, the baseline's stats pooled."""
    first = parts[0]
    for part in parts[1:]:
        for key in ("test_split", "ladder", "fast"):
            if part.get(key) != first.get(key):
                raise ValueError(f"--merge: {part['source']} has {key} {part.get(key)!r}, "
                                 f"{first['source']} {first.get(key)!r}")
        for task, res in part["tasks"].items():
            ref = first["tasks"].get(task)
            if ref is None or res["teacher"]["psnr"] != ref["teacher"]["psnr"]:
                raise ValueError(f"--merge: {part['source']}'s {task} has another stage-1 teacher or is missing "
                                 f"from {first['source']} (each run must reuse the same stage-1 files)")
    seeds = [s for part in parts for s in part["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--merge: a seed is in more than one run ({seeds})")
    tasks = {name: _merge_task([p["tasks"][name] for p in parts if name in p["tasks"]])
             for name in first["tasks"]}
    return {"command": command, "merged": [p["command"] for p in parts], "fast": first["fast"],
            "machine": first["machine"], "ladder": first["ladder"], "seeds": sorted(seeds),
            "test_split": first.get("test_split", "photos"), "tasks": tasks,
            "elapsed_s": sum(p["elapsed_s"] for p in parts)}


def _merge_task(parts: list[dict]) -> dict:
    merged = {k: parts[0][k] for k in ("teacher", "test_images", "oracle_scale")} | {"runs": {}, "cells": {}}
    for cell in dict.fromkeys(c for p in parts for c in p["runs"]):
        merged["runs"][cell] = [r for p in parts for r in p["runs"].get(cell, [])]
        merged["cells"][cell] = summarise(merged["runs"][cell])
    baselines = [p["baseline"] for p in parts if "baseline" in p]
    if baselines:  # only summaries are kept: pool each stat's runs
        merged["baseline"] = {k: mean_range([v for b in baselines for v in b[k]["runs"]])
                              for k, stat in baselines[0].items() if isinstance(stat, dict) and "runs" in stat}
    return merged


def mean_range(values: list[float]) -> dict:
    arr = np.array(values, dtype=float)
    return {"mean": float(np.nanmean(arr)), "min": float(np.nanmin(arr)), "max": float(np.nanmax(arr)),
            "runs": [float(v) for v in arr]}


def summarise(runs: list[dict]) -> dict:
    keys = {f"{m}": [r["at7"][m] for r in runs] for m in ("psnr", "ssim", "nr")}
    out = {k: mean_range(v) for k, v in keys.items()}
    out["train_psnr"] = mean_range([r["train_psnr7"] for r in runs])
    out["ema_psnr"] = mean_range([r["ema_at7"]["psnr"] for r in runs])
    for k in ("spearman_psnr", "spearman_nr"):
        if k in runs[0]:
            out[k] = mean_range([r[k] for r in runs])
    out["sweep_psnr"] = [float(np.mean([r["sweep"][i]["psnr"] for r in runs])) for i in range(len(runs[0]["sweep"]))]
    out["sweep_nr"] = [float(np.mean([r["sweep"][i]["nr"] for r in runs])) for i in range(len(runs[0]["sweep"]))]
    if len(out["sweep_psnr"]) > 2:
        out["spearman_mean_sweep_psnr"] = spearman(list(SWEEP), out["sweep_psnr"])["rho"]
    return out


def _pm(stat: dict, digits: int = 2) -> str:
    return f"{fmt(stat['mean'], digits)} [{fmt(stat['min'], digits)}, {fmt(stat['max'], digits)}]"


def write_report(results: dict, out: Path) -> Path:
    lines = ["# Oracle factorial: levels x reward", ""]
    if results["fast"]:
        lines += ["**FAST MODE: tiny budget; these numbers are NOT meaningful.**", ""]
    lines += [f"Command: `{results['command']}`", ""]
    lines += [f"Merged from: `{c}`" for c in results.get("merged", [])] + ([""] if results.get("merged") else [])
    lines += [results["machine"], "",
              f"Test split: {results.get('test_split', 'photos')}. "
              f"Ladder: {list(results['ladder']) or 'none'}; seeds {results['seeds']}; wall time "
              f"{results['elapsed_s']:.0f} s. Values: mean [min, max] over seeds.", ""]
    for task, res in results["tasks"].items():
        t, b = res["teacher"], res.get("baseline")
        lines += [f"## {task}", "",
                  f"Test set: {res['test_images']} images. Stage-1 teacher @7: PSNR {fmt(t['psnr'])}, SSIM "
                  f"{fmt(t['ssim'], 3)}, NR {fmt(t['nr'])}."
                  + (f" Baseline: PSNR {_pm(b['psnr'])}, SSIM {_pm(b['ssim'], 3)}, NR {_pm(b['nr'])}." if b else ""),
                  "", "| levels | reward | PSNR @7 | dPSNR vs teacher | SSIM @7 | NR @7 | Spearman(cond, PSNR) "
                  "| Spearman(cond, NR) | PSNR at conditions 0..7 | EMA teacher @7 | train PSNR @7 vs teacher |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for cell, s in res["cells"].items():
            level, reward = cell.split(":")
            lines.append(f"| {level} | {reward} | {_pm(s['psnr'])} | {s['psnr']['mean'] - t['psnr']:+.2f} | "
                         f"{_pm(s['ssim'], 3)} | {_pm(s['nr'])} | {_pm(s['spearman_psnr'], 2)} | "
                         f"{_pm(s['spearman_nr'], 2)} | {' '.join(fmt(v, 1) for v in s['sweep_psnr'])} | "
                         f"{_pm(s['ema_psnr'])} | {s['train_psnr']['mean'] - t['train_psnr7']:+.2f} |")
        lines.append("")
    path = out / "oracle.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_task(task_name: str, args: argparse.Namespace) -> dict:
    task = Task(task_name, args)
    res: dict = {"teacher": teacher_result(task), "test_images": int(task.test_x.shape[0]), "cells": {},
                 "oracle_scale": task.oracle_scale.to_json(), "runs": {}}
    if not args.no_baseline:
        res["baseline"] = summarise([run_baseline(task, seed) for seed in args.seed_list])
    for level, reward in args.cell_list:
        cell = f"{level}:{reward}"
        runs = []
        for seed in args.seed_list:
            runs.append(run_cell(task, level, reward, seed))
            r = runs[-1]
            sweep = " ".join(f"{p['psnr']:.1f}" for p in r["sweep"])
            print(f"[{task_name}] {cell} seed {seed}: PSNR@7 {r['at7']['psnr']:.2f} (teacher "
                  f"{res['teacher']['psnr']:.2f}), train PSNR@7 {r['train_psnr7']:.2f} (teacher "
                  f"{res['teacher']['train_psnr7']:.2f}), EMA@7 {r['ema_at7']['psnr']:.2f}, rho(cond, PSNR) {r['spearman_psnr']:.2f}, sweep "
                  f"{sweep}, {r['seconds']:.0f} s ({r['loop_seconds']})", flush=True)
        res["runs"][cell] = runs
        res["cells"][cell] = summarise(runs)
    return res


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    return with_threads(args.threads, lambda: _main(args, argv))


def _main(args: argparse.Namespace, argv) -> dict:
    from qualiteacher.config import load_config
    from qualiteacher.iqa.weights import prepare

    started = time.perf_counter()
    command = "python -m experiments.oracle " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        try:
            merged = merge_results([_load_results(d) for d in args.merge], command)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        return finish(merged, args.out)
    cfg = load_config(args.budget, args.overrides)
    prepare(cfg.paths.resolved_weights_dir(), log=lambda _m: None)
    tasks = {t: run_task(t, args) for t in args.task_list}
    # The ladder the runs used: --ladder, else the budget's.
    results = {"command": command, "fast": args.fast, "machine": machine_line(),
               "ladder": list(cfg.labelling.ladder), "seeds": args.seed_list, "test_split": args.test_split,
               "tasks": tasks, "elapsed_s": round(time.perf_counter() - started, 1)}
    return finish(results, args.out)


def finish(results: dict, out: Path) -> dict:
    """Count the controllable oracle-level cells, write oracle.json and oracle.md, print the table."""
    tasks = results["tasks"]
    oracle_cells = [(t, c) for t, r in tasks.items() for c in r["cells"] if c.startswith("oracle:")]
    controllable = sum(tasks[t]["cells"][c]["spearman_psnr"]["mean"] >= TARGET_SPEARMAN for t, c in oracle_cells)
    results["controllable_oracle_cells"] = controllable
    (out / "oracle.json").write_text(json.dumps(results, indent=2) + "\n")
    report = write_report(results, out)
    rows = [[t, c, s["psnr"]["mean"], s["psnr"]["mean"] - r["teacher"]["psnr"], s["ssim"]["mean"],
             s["spearman_psnr"]["mean"], s["spearman_nr"]["mean"], s["ema_psnr"]["mean"],
             s["train_psnr"]["mean"] - r["teacher"]["train_psnr7"]]
            for t, r in tasks.items() for c, s in r["cells"].items()]
    print_table(["task", "cell", "PSNR@7", "vs teacher", "SSIM@7", "rho PSNR", "rho NR", "EMA@7",
                 "train vs teacher"], rows)
    print(f"report: {report}")
    emit_result("oracle_controllable_cells", controllable, "cells", len(oracle_cells))
    return results


if __name__ == "__main__":
    from experiments.common import script_logging

    script_logging()
    main()
