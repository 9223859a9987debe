"""EMA weight push latency to 1, 2 and 4 teacher actors (quickstart model and ~25M).

One push is what the student's rank 0 does every `push_every` steps: one `ray.put` of the
EMA's CPU state dict, then `TeacherWorker.set_weights(ref, version)` on every teacher
actor, waiting until all of them have loaded it. Measured on a local Ray (actors with
num_cpus=0.1, so four fit beside everything else on a 2-core machine; an already
initialised Ray is reused), for

* the quickstart NAFNet (configs/quickstart.yaml), and
* a ~25M-parameter NAFNet (width 32, encoders [2, 2, 4, 8], 10 middle blocks,
  decoders [2, 2, 2, 2]; the count is printed).

Side by side with the naive way, for comparison: the state dict passed by value in every
`set_weights` call (serialised once per actor instead of once).

Result: the latency of one push of the ~25M model to 4 teachers. Target: at most 2000 ms
(a push must stay well below the time between pushes: `push_every` student steps).

    python -m benchmarks.weight_push [--fast]
"""

from __future__ import annotations

import itertools
import math
import time

from benchmarks.common import (
    compare,
    emit_result,
    header,
    make_parser,
    print_table,
    ray_session,
    repo_root,
    reps_and_warmup,
)

TARGET_MS = 2000.0
BIG_MODEL = {"arch": "nafnet", "width": 32, "enc_blocks": [2, 2, 4, 8], "middle_blocks": 10,
             "dec_blocks": [2, 2, 2, 2]}


def model_configs(fast: bool) -> dict[str, dict]:
    from qualiteacher.config import load_config

    quick = load_config(repo_root() / "configs" / "quickstart.yaml").model.model_dump(mode="json")
    if fast:
        return {"quickstart": quick}
    return {"quickstart": quick, "25m": BIG_MODEL}


def main(argv: list[str] | None = None) -> float:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--actors", default=None, help="comma-separated teacher counts (default 1,2,4; fast 1,2)")
    args = parser.parse_args(argv)
    reps, warmup = reps_and_warmup(args, full=(7, 1), fast=(2, 1))
    counts = [int(c) for c in (args.actors or ("1,2" if args.fast else "1,2,4")).split(",")]

    import ray

    from qualiteacher.config import ModelConfig
    from qualiteacher.method.ema import EMA
    from qualiteacher.models.build import build_model, count_parameters
    from services.teacher import TeacherWorker

    version = itertools.count(1)
    rows, result_ms = [], float("nan")
    with ray_session(num_cpus=4):
        header("EMA weight push: one ray.put + set_weights on N teacher actors, wait for all", args.fast, [
            (f"ray {ray.__version__}, cluster CPUs {ray.cluster_resources().get('CPU')}; teacher actors "
            f"num_cpus=0.1; teachers {counts}; {warmup} warm-up + {reps} timed pushes per way, median"),
        ])
        for label, model_cfg in model_configs(args.fast).items():
            model = build_model(ModelConfig.model_validate(model_cfg))
            n_params = count_parameters(model)
            state = EMA(model, 0.999).cpu_state_dict()
            mib = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
            actor_cls = ray.remote(TeacherWorker).options(num_cpus=0.1)
            actors = [actor_cls.remote(model_cfg, None, -1) for _ in range(max(counts))]
            ray.get([a.get_version.remote() for a in actors])  # all started

            def push(n: int, state=state, actors=actors) -> None:
                ref = ray.put(state)
                ray.get([a.set_weights.remote(ref, next(version)) for a in actors[:n]])

            def push_by_value(n: int, state=state, actors=actors) -> None:
                ray.get([a.set_weights.remote(state, next(version)) for a in actors[:n]])

            def put_only(state=state) -> None:
                ray.put(state)  # the reference is dropped at once (freed)

            ways = {}
            for n in counts:
                ways[f"put+set {n}"] = lambda n=n: push(n)
                ways[f"by value {n}"] = lambda n=n: push_by_value(n)
            ways["put only"] = put_only
            timings = compare(ways, reps=reps, warmup=warmup)
            versions = ray.get([a.get_version.remote() for a in actors])
            for n in counts:
                t, v = timings[f"put+set {n}"], timings[f"by value {n}"]
                rows.append([label, f"{n_params / 1e6:.2f}", f"{mib:.1f}", n, t.median * 1e3, t.spread,
                             v.median * 1e3])
                if label == "25m" and n == 4:
                    result_ms = t.median * 1e3
            rows.append([label, f"{n_params / 1e6:.2f}", f"{mib:.1f}", "put only", timings["put only"].median * 1e3,
                         timings["put only"].spread, ""])
            for a in actors:
                ray.kill(a)
            assert len(set(versions[:min(counts)])) == 1, versions  # every pushed actor holds the newest
            time.sleep(0.2)
    print_table(["model", "M params", "state MiB", "teachers", "push median ms", "min-max ms",
                 "by-value median ms"], rows)
    if math.isnan(result_ms):  # no 25M / 4-teacher row (fast mode, --actors): the slowest push measured
        result_ms = max(r[4] for r in rows if r[3] != "put only")
        print(f"no ~25M / 4-teacher push measured: RESULT is the slowest push measured, {result_ms:.0f} ms")
    else:
        print(f"push latency, ~25M model to 4 teachers: {result_ms:.0f} ms (target <= {TARGET_MS:.0f} ms)")
    emit_result("push_latency_25m_4", result_ms, "ms", TARGET_MS)
    return result_ms


if __name__ == "__main__":
    main()
