"""Labelling efficiency: the training job with and without re-labelling what has not changed.

The demo's training phase (`qualiteacher.pipelines.train.run` with `configs/quickstart.yaml` on the
bundled sample sets: local Ray, teacher and scorer actors, the Ray Train student) runs
twice in one process, on the same data and the same stage-1 teacher (both made once,
before either run):

* before: `labelling.relabel_unchanged: true`, the old loop: pass after pass over every
  image, whether or not the teacher changed since its last labels. The teacher is
  deterministic and label ids are `image.v{version}.{aug}`, so every repeat is offered to
  the gate as a duplicate, after a teacher forward and a full IQA scoring;
* after: the default: an image is labelled again only once the teacher is newer than its
  last scored labels; with nothing new the labeller waits for the next weight push.

Both runs share one Redis (a key prefix each). Reported per run: the bank's gate counters
(`MemoryBank.stats`: candidates offered, duplicates among them), PL sets labelled and
scored (the labeller's stats in the summary), the student's steps per second (rank 0's
step in the bank's meta, polled, from its first step to its last: the wait for the first
bank entries is not counted) and the run's wall time (calibration and the start of the
actors and of Ray Train included). With `--reps N` the runs take turns (before, after;
after, before; ...) and the run of median wall time is reported for each way.

Result: the duplicates' share of the candidates after the change. Target: at most 5%.

    python -m benchmarks.labelling_efficiency [--fast] [--steps N] [--reps N] [--redis-url URL]
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import (
    apply_threads,
    compare,
    emit_result,
    header,
    iqa_weights_dir,
    make_parser,
    print_table,
    redis_session,
    repo_root,
    unique_prefix,
)

TARGET_PCT = 5.0
WAYS = {"before (relabel_unchanged)": True, "after (default)": False}


class StepClock(threading.Thread):
    """Polls rank 0's step in the bank's meta; remembers when it first and last moved."""

    def __init__(self, bank, interval: float = 0.2):
        super().__init__(daemon=True, name="step-clock")
        self.bank, self.interval = bank, interval
        self.done = threading.Event()
        self.first: tuple[int, float] | None = None  # (step, time) of the first step seen
        self.last: tuple[int, float] = (0, 0.0)

    def run(self) -> None:
        import redis

        while not self.done.wait(self.interval):
            try:
                step = self.bank.status.read().student_step
            except redis.RedisError:
                continue
            if step > self.last[0]:
                now = time.perf_counter()
                self.first = self.first or (step, now)
                self.last = (step, now)

    def steps_per_s(self) -> float:
        self.done.set()
        self.join(timeout=5)
        if self.first is None or self.last[1] <= self.first[1]:
            return float("nan")
        return (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])


def base_overrides(args) -> tuple[Path, list[str]]:
    """The config file and the overrides every run shares (--steps, the student's budget)."""
    if args.fast:  # the smoke config: a width-8 model on 96 px images
        return repo_root() / "configs" / "smoke.yaml", [f"train.steps={args.steps or 2}"]
    return repo_root() / "configs" / "quickstart.yaml", [f"train.steps={args.steps or 30}"]


def shared_inputs(cfg, root: Path) -> list[str]:
    """Make the data sets and the stage-1 teacher once; overrides that point a run at them."""
    from qualiteacher.pipelines.pretrain import pretrain
    from qualiteacher.pipelines.train import prepare_data

    from qualiteacher.run_dir import RunDir

    shared = RunDir(root)  # laid out as a run folder: its data sets and stage-1 teacher
    data = prepare_data(cfg, shared)
    stage1 = shared.pretrain
    pretrain(cfg, data["paired_input"], data["paired_target"], stage1, log=lambda _msg: None)
    return [f"data.paired_input_dir={data['paired_input']}", f"data.paired_target_dir={data['paired_target']}",
            f"data.unpaired_dir={data['unpaired']}", f"pretrain.checkpoint={stage1}"]


def train_once(config: Path, overrides: list[str], relabel_unchanged: bool, url: str, run_dir: Path) -> dict:
    """One training job; its summary, the bank's counters and the student's steps/s."""
    from qualiteacher.pipelines.train import run
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.redis_server import redis_client

    from qualiteacher.config import load_config

    tag = unique_prefix("le")
    cfg = load_config(config, [*overrides, f"labelling.relabel_unchanged={str(relabel_unchanged).lower()}",
                               f"redis.url={url}", f"redis.prefix={tag}", f"ray.namespace={tag}"])
    bank = MemoryBank(redis_client(url), tag, cfg.gating.top_k)
    clock = StepClock(bank)
    clock.start()
    try:
        started = time.perf_counter()
        summary = run(cfg, run_dir)
        wall_s = time.perf_counter() - started
        return {"summary": summary, "wall_s": wall_s, "steps_per_s": clock.steps_per_s(),
                "counters": bank.stats()["counters"], "problems": bank.check_invariants()}
    finally:
        clock.done.set()
        bank.clear()


def duplicate_pct(r: dict) -> float:
    """Duplicates as a share of the candidates offered to the gate, in %."""
    return 100.0 * r["counters"]["duplicates"] / max(r["counters"]["candidates"], 1)


def table_row(way: str, r: dict) -> list:
    counters, labelling = r["counters"], r["summary"]["labelling"]
    return [way, r["summary"]["steps"], r["summary"]["teacher_version"], labelling["labelled"],
            labelling["scored"], counters["candidates"], counters["duplicates"], duplicate_pct(r),
            r["steps_per_s"], r["wall_s"], "ok" if not r["problems"] else r["problems"][0]]


def main(argv: list[str] | None = None, *, redis_url: str | None = None) -> float:
    parser = make_parser(__doc__.splitlines()[0], redis=True)
    parser.add_argument("--steps", type=int, default=None, help="student steps per run (default 30, fast 2)")
    # The job's driver calibrates in this process: by default with torch's own thread count, as
    # the demo runs; the other benchmarks' default of one thread would slow the timed runs.
    parser.set_defaults(threads=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        apply_threads(args)
    reps = args.reps or 1

    import ray
    from qualiteacher.pipelines.train import init_ray

    from qualiteacher.config import load_config

    config, overrides = base_overrides(args)
    iqa_weights_dir()
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    started_ray = not ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="qt-bench-labelling-") as tmp, \
            redis_session(redis_url or args.redis_url) as url:
        root = Path(tmp)
        cfg = load_config(config, overrides)
        init_ray(cfg)  # as the job does (reused when running already)
        header("Labelling efficiency: the training job re-labelling unchanged images (before) and not (after)",
               args.fast, [
                   (f"config {config.relative_to(repo_root())} with {' '.join(overrides)}; "
                    f"ray {ray.__version__}, cluster CPUs {ray.cluster_resources().get('CPU')}; "
                    f"{reps} run(s) per way, taking turns, median"),
               ])
        overrides += shared_inputs(cfg, root)
        counter = itertools.count()

        def job(way: str) -> None:
            run_dir = root / f"run{next(counter)}"
            runs[way].append(train_once(config, overrides, WAYS[way], url, run_dir))

        try:
            compare({way: (lambda way=way: job(way)) for way in WAYS}, reps=reps, warmup=0)  # turns
        finally:
            if started_ray:
                ray.shutdown()
    picked = {way: median_run(results) for way, results in runs.items()}
    print_table(["way", "steps", "teacher v", "PL sets labelled", "scored", "candidates", "duplicates",
                 "dup %", "student steps/s", "wall s", "invariants"], [table_row(w, r) for w, r in picked.items()])
    before, after = picked.values()
    labelled = [r["summary"]["labelling"]["labelled"] for r in (before, after)]
    print(f"duplicates {duplicate_pct(before):.1f}% of candidates before, {duplicate_pct(after):.1f}% after; "
          f"PL sets labelled {labelled[0]} before, {labelled[1]} after; student {before['steps_per_s']:.3f} "
          f"steps/s before, {after['steps_per_s']:.3f} after ({after['steps_per_s'] / before['steps_per_s']:.2f}x); "
          f"wall {before['wall_s']:.0f} s before, {after['wall_s']:.0f} s after "
          f"(target: duplicates <= {TARGET_PCT:g}% after)")
    emit_result("duplicate_share", duplicate_pct(after), "%", TARGET_PCT)
    return duplicate_pct(after)


def median_run(results: list[dict]) -> dict:
    """The run of (lower) median wall time: one run's numbers, so they fit together."""
    return sorted(results, key=lambda r: r["wall_s"])[(len(results) - 1) // 2]


if __name__ == "__main__":
    main()
