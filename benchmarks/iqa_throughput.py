"""IQA scoring with block weight maps: the scorer's batched path vs the reference code's way.

Same metrics (BRISQUE, NIQE, PIQE, weights 0.4/0.3/0.3), same images (photos bundled with
scikit-image at 288 px), same 3x3 block grid (96 px blocks, so NIQE scores blocks too):

* batched (what `qualiteacher.services.scorer.ScorerWorker.process` does): `IQAEnsemble.score` on the
  whole batch, then `IQAEnsemble.block_scores`, which unfolds every block of every image
  into one batch; each metric call takes at most `iqa.max_batch_pixels` pixels (the
  quickstart config's 82944: 1 image or 9 blocks at 288 px), as the scorer's does;
* one call per metric (informational): the same without a pixel limit;
* reference (the authors' release): one image at a time, its global score one call per
  metric, then its blocks scored in a Python loop, one call per block and metric;
* reference, pyiqa as released (informational): the same loop with pyiqa's own functions
  where the project runs faster ones with the same results (`qualiteacher.iqa.pyiqa_speedups`),
  i.e. the reference code as it runs.

All produce the same numbers (checked below). The speed-up (the RESULT line) is images/s
batched over images/s reference, both on the same metric code, so it measures the batching
alone; the speed-up over the reference code as it runs is printed too. Target: at least 3x.

    python -m benchmarks.iqa_throughput [--fast] [--device cuda]
"""

from __future__ import annotations

import copy

import torch

from benchmarks.common import (
    apply_threads,
    bench_device,
    compare,
    device_sync,
    emit_result,
    header,
    iqa_weights_dir,
    make_parser,
    print_table,
    repo_root,
    reps_and_warmup,
    sample_images,
    to_batch,
)

METRICS = {"brisque": 0.4, "niqe": 0.3, "piqe": 0.3}
TARGET = 3.0


def batched_path(ensemble, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ensemble (N,), block scores (N, grid, grid)) the way the scorer computes them."""
    scores = ensemble.score(x)
    return scores.ensemble, ensemble.block_scores(x, grid)


def reference_path(ensemble, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same outputs, one image at a time and one block at a time (per metric)."""
    n, _, h, w = x.shape
    bh, bw = h // grid, w // grid
    block_names = ensemble.block_metric_names(min(bh, bw))
    totals, blocks = [], []
    for i in range(n):
        image = x[i:i + 1]
        raw = {name: ensemble.raw_scores(image, [name]).get(name) for name in ensemble.names}
        totals.append(ensemble.combine(ensemble.normalize(raw)))
        grid_scores = torch.empty(grid, grid)
        for r in range(grid):
            for c in range(grid):
                block = image[:, :, r * bh:(r + 1) * bh, c * bw:(c + 1) * bw]
                raw_b = {name: ensemble.raw_scores(block, [name])[name] for name in block_names}
                grid_scores[r, c] = ensemble.combine(ensemble.normalize(raw_b))[0]
        blocks.append(grid_scores)
    return torch.cat(totals), torch.stack(blocks)


def per_metric_table(ensemble, x: torch.Tensor, grid: int, *, reps: int, warmup: int, sync=None) -> None:
    """Where the time goes: each metric's full-image and block scoring, batched vs looped."""
    n, c, h, w = x.shape
    bh, bw = h // grid, w // grid
    blocks = torch.nn.functional.unfold(x[:, :, :bh * grid, :bw * grid], (bh, bw), stride=(bh, bw))
    blocks = blocks.transpose(1, 2).reshape(n * grid * grid, c, bh, bw)
    rows = []
    for name in ensemble.names:
        parts = [("full image", x)]
        if name in ensemble.block_metric_names(min(bh, bw)):
            parts.append((f"{grid * grid} blocks", blocks))
        for part, batch in parts:
            t = compare({
                "batched": lambda b=batch, m=name: ensemble.raw_scores(b, [m]),
                "loop": lambda b=batch, m=name: [ensemble.raw_scores(b[i:i + 1], [m]) for i in range(b.shape[0])],
            }, reps=reps, warmup=warmup, sync=sync)
            rows.append([name, part, t["batched"].median * 1e3 / n, t["loop"].median * 1e3 / n,
                         t["loop"].median / t["batched"].median])
    print("per metric, ms per image (batched: one call for all images / all blocks; loop: one call each)")
    print_table(["metric", "part", "batched ms/img", "loop ms/img", "loop/batched"], rows)


def main(argv: list[str] | None = None) -> float:
    parser = make_parser(__doc__.splitlines()[0], device=True)
    parser.add_argument("--images", type=int, default=None, help="images per call (default 12, fast 1)")
    parser.add_argument("--size", type=int, default=288)
    parser.add_argument("--grid", type=int, default=3)
    parser.add_argument("--config", default=str(repo_root() / "configs" / "quickstart.yaml"),
                        help="the scorer's config: its iqa.max_batch_pixels")
    args = parser.parse_args(argv)
    apply_threads(args)
    reps, warmup = reps_and_warmup(args, full=(5, 1), fast=(1, 0))
    n = args.images or (1 if args.fast else 12)

    from qualiteacher.config import load_config
    from qualiteacher.iqa.ensemble import IQAEnsemble
    from qualiteacher.iqa.pyiqa_speedups import pyiqa_as_released

    device = bench_device(args)
    sync = device_sync(device)
    max_pixels = load_config(args.config).iqa.batch_pixels_for(device.type)
    ensemble = IQAEnsemble(METRICS, iqa_weights_dir(), device.type, max_batch_pixels=max_pixels)
    cap_text = f"at most {max_pixels} pixels per metric call" if max_pixels else "one call per metric"
    one_call = copy.copy(ensemble)  # the same loaded metrics, no pixel limit
    one_call.max_batch_pixels = None
    x = to_batch(sample_images(n, args.size)).to(device)
    block = args.size // args.grid
    header("IQA scoring + block weight maps: batched (scorer) vs per image, per block (reference)", args.fast, [
        (f"metrics {METRICS}; {n} images of {args.size} px; grid {args.grid}x{args.grid} "
        f"({block} px blocks, block metrics {ensemble.block_metric_names(block)}); "
        f"scorer path: {cap_text} (iqa.max_batch_pixels of {args.config} for {device.type}); "
        f"{warmup} warm-up + {reps} timed repetitions each, median; device {device}"),
    ])

    n_block_metrics = len(ensemble.block_metric_names(block))
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str, fn):
        def run() -> None:
            outputs[name] = fn()
        return run

    batched, reference, single = "batched (scorer path)", "reference (loop)", "batched, one call per metric (info)"
    released = "reference, pyiqa as released (info)"

    def reference_as_released():
        with pyiqa_as_released():
            return reference_path(ensemble, x, args.grid)

    ways = {
        batched: keep(batched, lambda: batched_path(ensemble, x, args.grid)),
        reference: keep(reference, lambda: reference_path(ensemble, x, args.grid)),
        released: keep(released, reference_as_released),
    }
    if not args.fast and max_pixels:  # without a cap the scorer path is this row already
        ways[single] = keep(single, lambda: batched_path(one_call, x, args.grid))
    timings = compare(ways, reps=reps, warmup=warmup, sync=sync)
    per_call = max(1, (max_pixels or n * args.size ** 2) // args.size ** 2)
    chunks = -(-n // per_call)
    calls = {batched: chunks * (len(METRICS) + n_block_metrics),
             reference: n * (len(METRICS) + args.grid ** 2 * n_block_metrics),
             released: n * (len(METRICS) + args.grid ** 2 * n_block_metrics),
             single: len(METRICS) + n_block_metrics}
    rows = []
    for name, t in timings.items():
        rows.append([name, calls[name], t.median * 1e3, t.spread, n / t.median, t.median * 1e3 / n])
    print_table(["way", "metric calls", "median ms", "min-max ms", "images/s", "ms/image"], rows)
    if not args.fast:
        per_metric_table(one_call, x, args.grid, reps=reps, warmup=warmup, sync=sync)

    # Same work, same answers: the ways must agree.
    e_b, blocks_b = outputs[batched]
    for name in (reference, released):
        e_r, blocks_r = outputs[name]
        print(f"max |difference| batched vs {name}: ensemble {float((e_b - e_r).abs().max()):.2e}, "
              f"block scores {float((blocks_b - blocks_r).abs().max()):.2e}")
    print(f"speed-up over the reference code as it runs (pyiqa as released): "
          f"{timings[released].median / timings[batched].median:.2f}x (info)")
    speedup = timings[reference].median / timings[batched].median
    print(f"speed-up (images/s batched / images/s reference, same metric code): {speedup:.2f}x "
          f"(target >= {TARGET:g}x)")
    emit_result("iqa_speedup", speedup, "x", TARGET)
    return speedup


if __name__ == "__main__":
    main()
