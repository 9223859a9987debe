"""EMA weight push latency to 1, 2 and 4 teacher actors: flat buffer against state dict.

One push is what the student's rank 0 does every `push_every` steps: pack the EMA's
weights, one `ray.put`, then `TeacherWorker.set_weights(ref, version)` on every teacher
actor, waiting until all of them have loaded it. Three ways side by side, each timed from
the EMA's weights to every teacher loaded:

* flat (the push path): `flatten` the EMA's state dict into one byte buffer
  (`qualiteacher.flat_weights`), one `ray.put`; each teacher reads the buffer from Ray's
  shared-memory object store without a copy and copies it into its model;
* state dict (the push path before): the EMA's CPU state dict, one `ray.put`, each
  teacher `ray.get`s it (Ray pickles torch tensors, so every teacher deserialises a copy)
  and loads it;
* by value (naive): the state dict passed in every call, serialised once per teacher.

A second table splits the two by-reference ways into their stages (pack, `ray.put`, and
one teacher's `ray.get` + load in this process), to show where the time goes.

Measured on a local Ray (actors with num_cpus=0.1, so four fit beside everything else on
a 2-core machine; an already initialised Ray is reused), for the quickstart NAFNet
(configs/quickstart.yaml) and a ~25M-parameter NAFNet (width 32, encoders [2, 2, 4, 8],
10 middle blocks, decoders [2, 2, 2, 2]; the count is printed).

Result: the latency of one flat push of the ~25M model to 4 teachers. Target: under
150 ms (a push must stay well below the time between pushes, `push_every` student steps,
and should not stall the student's rank 0, which waits for the previous push).

    python -m benchmarks.weight_push [--fast]
"""

from __future__ import annotations

import itertools
import math
import time

from benchmarks.common import (
    apply_threads,
    compare,
    emit_result,
    header,
    make_parser,
    print_table,
    ray_session,
    repo_root,
    reps_and_warmup,
)

TARGET_MS = 150.0
BIG_MODEL = {"arch": "nafnet", "width": 32, "enc_blocks": [2, 2, 4, 8], "middle_blocks": 10,
             "dec_blocks": [2, 2, 2, 2]}
WAYS = ("flat", "state dict", "by value")


def model_configs(fast: bool) -> dict[str, dict]:
    from qualiteacher.config import load_config

    quick = load_config(repo_root() / "configs" / "quickstart.yaml").model.model_dump(mode="json")
    if fast:
        return {"quickstart": quick}
    return {"quickstart": quick, "25m": BIG_MODEL}


def state_dict_teacher():
    """A teacher that also takes a plain state dict: the push path before flat weights."""
    from qualiteacher.services.teacher import TeacherWorker

    class StateDictTeacher(TeacherWorker):
        def set_state_dict(self, state: dict, version: int) -> int:
            if version > self.version:
                self.model.load_state_dict(state)
                self.version = int(version)
            return self.version

    return StateDictTeacher


def push_ways(ema, actors: list, counts: list[int]) -> dict:
    """Every push way for every teacher count; each push gets one new version for all."""
    import ray

    from qualiteacher.flat_weights import flatten

    version = itertools.count(1)

    def flat(n: int) -> None:
        ref, v = ray.put(flatten(ema.teacher.state_dict())), next(version)
        loaded(v, [a.set_weights.remote(ref, v) for a in actors[:n]])

    def state_dict(n: int) -> None:
        ref, v = ray.put(ema.cpu_state_dict()), next(version)
        loaded(v, [a.set_state_dict.remote(ref, v) for a in actors[:n]])

    def by_value(n: int) -> None:
        state, v = ema.cpu_state_dict(), next(version)
        loaded(v, [a.set_state_dict.remote(state, v) for a in actors[:n]])

    fns = dict(zip(WAYS, (flat, state_dict, by_value)))
    return {(way, n): (lambda fn=fn, n=n: fn(n)) for n in counts for way, fn in fns.items()}


def loaded(version: int, calls: list) -> None:
    """Wait for every teacher; each must have loaded this push (none ignored it as stale)."""
    import ray

    held = ray.get(calls)
    assert held == [version] * len(calls), (version, held)


def stage_ways(ema, model) -> dict:
    """Pack, put, and one teacher's get + load, for both by-reference formats."""
    import ray

    from qualiteacher.flat_weights import flatten

    state, flat = ema.cpu_state_dict(), flatten(ema.teacher.state_dict())
    refs = {"state dict": ray.put(state), "flat": ray.put(flat)}
    return {
        ("pack", "state dict"): ema.cpu_state_dict,
        ("pack", "flat"): lambda: flatten(ema.teacher.state_dict()),
        ("ray.put", "state dict"): lambda: ray.put(state),  # the reference is dropped at once (freed)
        ("ray.put", "flat"): lambda: ray.put(flat),
        ("get + load", "state dict"): lambda: model.load_state_dict(ray.get(refs["state dict"])),
        ("get + load", "flat"): lambda: ray.get(refs["flat"]).load_into(model),
    }


def main(argv: list[str] | None = None) -> float:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--actors", default=None, help="comma-separated teacher counts (default 1,2,4; fast 1,2)")
    args = parser.parse_args(argv)
    apply_threads(args)  # the student's rank 0 packs and puts with its actor's thread count
    reps, warmup = reps_and_warmup(args, full=(7, 1), fast=(2, 1))
    counts = [int(c) for c in (args.actors or ("1,2" if args.fast else "1,2,4")).split(",")]

    import ray

    rows, stage_rows, result_ms = [], [], float("nan")
    with ray_session(num_cpus=4):
        header("EMA weight push: pack + one ray.put + set_weights on N teacher actors, wait for all", args.fast, [
            (f"ray {ray.__version__}, cluster CPUs {ray.cluster_resources().get('CPU')}; teacher actors "
            f"num_cpus=0.1; teachers {counts}; {warmup} warm-up + {reps} timed pushes per way, median"),
        ])
        for label, model_cfg in model_configs(args.fast).items():
            size, pushes, stages = measure(model_cfg, counts, reps, warmup)
            rows += [push_row(label, size, n, pushes) for n in counts]
            stage_rows += [stage_row(label, stage, stages) for stage in ("pack", "ray.put", "get + load")]
            if label == "25m" and 4 in counts:
                result_ms = pushes["flat", 4].median * 1e3
    print_table(["model", "M params", "state MiB", "teachers", "flat ms", "flat min-max ms", "state dict ms",
                 "by value ms", "state dict / flat", "by value / flat"], rows)
    print("\nwhere the time goes (one teacher's get + load measured in this process):")
    print_table(["model", "stage", "flat ms", "state dict ms", "state dict / flat"], stage_rows)
    return report(result_ms, rows)


def measure(model_cfg: dict, counts: list[int], reps: int, warmup: int) -> tuple:
    """((M params, state MiB), push timings, stage timings) of one model."""
    import ray

    from qualiteacher.config import ModelConfig
    from qualiteacher.method.ema import EMA
    from qualiteacher.models.build import build_model, count_parameters

    model = build_model(ModelConfig.model_validate(model_cfg))
    ema = EMA(model, 0.999)
    mib = sum(t.numel() * t.element_size() for t in ema.teacher.state_dict().values()) / 2**20
    actor_cls = ray.remote(state_dict_teacher()).options(num_cpus=0.1)
    actors = [actor_cls.remote(model_cfg, None, -1) for _ in range(max(counts))]
    ray.get([a.get_version.remote() for a in actors])  # all started
    pushes = compare(push_ways(ema, actors, counts), reps=reps, warmup=warmup)
    stages = compare(stage_ways(ema, model), reps=reps, warmup=warmup)
    for a in actors:
        ray.kill(a)
    time.sleep(0.2)
    return (count_parameters(model) / 1e6, mib), pushes, stages


def push_row(label: str, size: tuple[float, float], n: int, t: dict) -> list:
    flat, sd, value = (t[way, n].median * 1e3 for way in WAYS)
    return [label, f"{size[0]:.2f}", f"{size[1]:.1f}", n, flat, t["flat", n].spread, sd, value,
            f"{sd / flat:.2f}x", f"{value / flat:.2f}x"]


def stage_row(label: str, stage: str, s: dict) -> list:
    flat, sd = s[stage, "flat"].median * 1e3, s[stage, "state dict"].median * 1e3
    return [label, stage, flat, sd, f"{sd / flat:.2f}x"]


def report(result_ms: float, rows: list) -> float:
    if math.isnan(result_ms):  # no 25M / 4-teacher row (fast mode, --actors): the slowest flat push measured
        result_ms = max(r[4] for r in rows)
        print(f"no ~25M / 4-teacher push measured: RESULT is the slowest flat push measured, {result_ms:.0f} ms")
    else:
        print(f"flat push latency, ~25M model to 4 teachers: {result_ms:.0f} ms (target < {TARGET_MS:.0f} ms)")
    emit_result("push_latency_25m_4", result_ms, "ms", TARGET_MS)
    return result_ms


if __name__ == "__main__":
    main()
