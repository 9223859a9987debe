"""Labelling throughput with 1 and 2 scorer actors when scoring is the bottleneck.

The real pipeline: a `qualiteacher.services.labeller.Labeller` actor streams images through a teacher
actor (multi-aug pseudo-labels), scorer actors (3 metrics on every PL, 3x3 block maps,
gate into the Redis bank) with its back-pressure and in-flight limits. The teacher is
tiny (a width-4, one-level NAFNet, about 3k parameters) and scoring is heavy (BRISQUE,
NIQE and PIQE on 288 px PLs plus their 3x3 block maps, 96 px blocks so NIQE scores blocks
too), so the scorer pool is the bottleneck. Dual drop is off, so every image is fully
scored and gated.

On 2 cores the teacher still needs CPU time: if one image costs T ms of teacher and S ms
of scorer time, 2 scorers can at best reach 2S / (S + T) times the throughput of one
(the teacher and one scorer already overlap). The full run measures T and S in-process
(one thread each) and prints that bound beside the result.

Two labellers (1 scorer, 2 scorers), each with its own Ray namespace and a fresh Redis
prefix, run side by side in one process: they take turns, one labelling pass over all
images each time, after a new weight version is pushed (so every pass makes new label ids
and the gate really admits and evicts). Scorers get num_cpus=1 (so one torch thread each,
as Ray sets OMP_NUM_THREADS), the teacher 0.5. Throughput = images scored / wall time of
`Labeller.run(max_rounds=1)`.

Result: images/s with 2 scorers over images/s with 1. Target: at least 1.6x on 2 cores.

    python -m benchmarks.scorer_scaling [--fast] [--redis-url URL]
"""

from __future__ import annotations

import uuid

from benchmarks.common import (
    compare,
    emit_result,
    header,
    make_parser,
    print_table,
    ray_session,
    redis_session,
    repo_root,
    reps_and_warmup,
    sample_images,
)

TARGET = 1.6


def bench_config(n_scorers: int, size: int, batch: int, grid: int, tag: str) -> dict:
    from qualiteacher.config import load_config

    cfg = load_config(repo_root() / "configs" / "smoke.yaml", [
        "iqa.metrics={brisque: 0.4, niqe: 0.3, piqe: 0.3}", "iqa.device=cpu", f"iqa.block_grid={grid}",
        "drop.enabled=false",
        "model.width=4", "model.enc_blocks=[1]", "model.middle_blocks=1", "model.dec_blocks=[1]",
        "labelling.teachers=1", f"labelling.scorers={n_scorers}", f"labelling.batch_size={batch}",
        "labelling.in_flight_per_scorer=2", f"labelling.image_size={size}",
        "labelling.scorer_resources={num_cpus: 1.0, num_gpus: 0}",
        "labelling.teacher_resources={num_cpus: 0.5, num_gpus: 0}",
        f"redis.prefix=bsc{n_scorers}{tag}", f"ray.namespace=bench-scorers-{n_scorers}-{tag}",
    ])
    return cfg.model_dump(mode="json")


def component_bound(cfg: dict, url: str, images: list) -> tuple[float, float]:
    """(teacher ms/image, scorer ms/image) of one batch in this process, one torch thread."""
    import time

    import numpy as np
    import torch
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.redis_server import redis_client
    from qualiteacher.services.scorer import ScorerWorker
    from qualiteacher.services.teacher import TeacherWorker

    from qualiteacher.config import ModelConfig
    from qualiteacher.flat_weights import flatten
    from qualiteacher.models.build import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = dict(cfg, redis=dict(cfg["redis"], prefix=cfg["redis"]["prefix"] + "c"))
    try:
        batch = np.stack(images)
        weights = flatten(build_model(ModelConfig.model_validate(cfg["model"])).state_dict())
        teacher = TeacherWorker(cfg["model"], weights, 0)
        scorer = ScorerWorker(cfg, url)
        pls, finite, _ = teacher.label(batch)
        scorer.process([f"c{i}" for i in range(len(images))], pls, finite, 0)  # warm-up
        t0 = time.perf_counter()
        for _ in range(2):
            pls, finite, _ = teacher.label(batch)
        t1 = time.perf_counter()
        for v in (1, 2):
            scorer.process([f"c{i}" for i in range(len(images))], pls, finite, v)
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
        MemoryBank(redis_client(url), cfg["redis"]["prefix"], 3).clear()
    per = 2 * len(images) / 1e3
    return (t1 - t0) / per, (t2 - t1) / per


def main(argv: list[str] | None = None, *, redis_url: str | None = None) -> float:
    parser = make_parser(__doc__.splitlines()[0], redis=True)
    parser.add_argument("--images", type=int, default=None, help="images per pass (default 16, fast 4)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 288, fast 96)")
    parser.add_argument("--batch", type=int, default=2, help="images per teacher / scorer call")
    parser.add_argument("--grid", type=int, default=3)
    args = parser.parse_args(argv)
    reps, warmup = reps_and_warmup(args, full=(3, 1), fast=(1, 1))
    n_images = args.images or (4 if args.fast else 16)
    size = args.size or (96 if args.fast else 288)

    import ray
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.labeller import Labeller
    from qualiteacher.services.redis_server import redis_client

    from qualiteacher.config import ModelConfig
    from qualiteacher.flat_weights import flatten
    from qualiteacher.models.build import build_model

    images = sample_images(n_images, size)
    ids = [f"im{i}" for i in range(n_images)]
    tag = uuid.uuid4().hex[:8]
    with ray_session(num_cpus=4), redis_session(redis_url or args.redis_url) as url:
        header("Labelling throughput (teacher -> scorers -> bank) with 1 and 2 scorer actors", args.fast, [
            (f"ray {ray.__version__}, cluster CPUs {ray.cluster_resources().get('CPU')}; {n_images} images of "
            f"{size} px per pass, batches of {args.batch}; metrics brisque/niqe/piqe + {args.grid}x{args.grid} "
            f"block maps ({size // args.grid} px blocks); tiny teacher (width-4 one-level NAFNet); {warmup} warm-up + "
            f"{reps} timed passes each, median"),
        ])
        labellers, states, cfgs = {}, {}, {}
        for n in (1, 2):
            cfg = bench_config(n, size, args.batch, args.grid, tag)
            model = build_model(ModelConfig.model_validate(cfg["model"]))
            ref = ray.put(flatten(model.state_dict()))
            labellers[n] = ray.remote(Labeller).options(num_cpus=0, max_concurrency=8).remote(
                cfg, url, ids, images, [ref], 0, 0.0)
            states[n], cfgs[n] = [ref, 0], cfg
        scored: dict[int, list[int]] = {1: [], 2: []}

        def one_pass(n: int) -> None:
            lab, state = labellers[n], states[n]
            state[1] += 1  # a new teacher version: new label ids, real gating work
            ray.get(lab.push_weights.remote([state[0]], state[1]))
            before = ray.get(lab.stats.remote())["scored"]
            after = ray.get(lab.run.remote(max_rounds=1))["scored"]
            scored[n].append(after - before)

        try:
            timings = compare({1: lambda: one_pass(1), 2: lambda: one_pass(2)}, reps=reps, warmup=warmup)
            stats = {n: ray.get(lab.stats.remote()) for n, lab in labellers.items()}
            client = redis_client(url)
            banks = {n: MemoryBank(client, cfgs[n]["redis"]["prefix"], 3) for n in (1, 2)}
            bank_rows = {n: (b.num_images(), b.stats()["entries"], b.check_invariants()) for n, b in banks.items()}
        finally:
            for lab in labellers.values():
                ray.kill(lab)
            client = redis_client(url)
            for n in (1, 2):
                MemoryBank(client, cfgs[n]["redis"]["prefix"], 3).clear()
                for key in client.scan_iter(match=f"{cfgs[n]['redis']['prefix']}:input:*", count=1000):
                    client.delete(key)

        bound = None if args.fast else component_bound(cfgs[1], url, images[:args.batch])
    rows = []
    for n in (1, 2):
        t = timings[n]
        per_pass = scored[n][-1]
        imgs, entries, problems = bank_rows[n]
        rows.append([n, per_pass, t.median, f"{t.spread}", per_pass / t.median, stats[n]["scorers"],
                     f"{imgs}/{entries}", "ok" if not problems else problems[0]])
    print_table(["scorers", "images/pass", "median s/pass", "min-max ms", "images/s", "pool", "bank images/entries",
                 "invariants"], rows)
    if any(s != n_images for n in (1, 2) for s in scored[n]):
        print(f"WARNING: a pass did not score every image: {scored}")
    speedup = (scored[2][-1] / timings[2].median) / (scored[1][-1] / timings[1].median)
    if bound is not None:
        teacher_ms, scorer_ms = bound
        print(f"in-process, one thread: teacher {teacher_ms:.0f} ms/image, scorer {scorer_ms:.0f} ms/image; "
              f"best possible on 2 cores 2S/(S+T) = {2 * scorer_ms / (scorer_ms + teacher_ms):.2f}x")
    print(f"scaling (images/s with 2 scorers / with 1): {speedup:.2f}x (target >= {TARGET:g}x on 2 cores)")
    emit_result("scorer_scaling", speedup, "x", TARGET)
    return speedup


if __name__ == "__main__":
    main()
