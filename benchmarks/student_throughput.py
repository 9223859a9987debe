"""Student training throughput: batched score conditioning vs one forward per stored PL.

Same model (the quickstart NAFNet, score-conditioned), same crops (96 px), same data (a
step draws `images` inputs with their top-3 bank PLs, block weight maps and levels), same
loss (block-weighted L1 to the PL) followed by backward and an Adam step:

* batched (what `qualiteacher.student_step.step_losses` does): each input once, restored at its 3 PLs'
  levels by one shared forward (`restore_conditions`: the encoder runs once per input,
  the bottleneck, where the score enters, and the decoder run on the 3 conditions in one
  batch);
* batched, inputs repeated (informational; the previous way): one forward of all
  N = 3 * images samples, the condition an [N] tensor of the PLs' levels;
* reference (the authors' release): one batch-size-1 forward per stored PL with that PL's
  level, the losses summed, then one backward and one optimiser step.

Both compute the same gradients (checked below, on the same weights). The result is
samples/s batched over samples/s reference. Target: at least 2x.

    python -m benchmarks.student_throughput [--fast] [--device cuda]
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from benchmarks.common import (
    apply_threads,
    bench_device,
    compare,
    device_sync,
    emit_result,
    header,
    make_parser,
    print_table,
    repo_root,
    reps_and_warmup,
    sample_images,
)

TARGET = 2.0
PLS_PER_IMAGE = 3


def make_batch(images: int, crop: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Bank-like samples: degraded inputs (each repeated for its 3 PLs), 3 PLs per input
    (the clean crop with small seeded perturbations), 3x3 block weight maps upsampled to
    the crop, levels in [3, 7]."""
    from qualiteacher.data.degradations import degrade

    rng = np.random.default_rng(seed)
    clean = sample_images(images, crop, seed)
    xs, pls = [], []
    for img in clean:
        degraded = degrade(img, "haze", rng, "unpaired")
        for _ in range(PLS_PER_IMAGE):
            xs.append(degraded)
            noisy = img.astype(np.float32) + rng.normal(0, 4, img.shape)
            pls.append(np.clip(noisy, 0, 255).astype(np.uint8))
    to_t = lambda arr: torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float().div_(255.0)
    n = len(xs)
    grid = torch.from_numpy(rng.uniform(0.1, 2.0, size=(n, 1, 3, 3)).astype(np.float32))
    weights = torch.nn.functional.interpolate(grid, size=(crop, crop), mode="bilinear", align_corners=False)
    level = torch.from_numpy(rng.uniform(3.0, 7.0, size=n).astype(np.float32))
    return {"x": to_t(xs), "pl": to_t(pls), "weights": weights, "level": level}


def batched_loss(model, batch) -> torch.Tensor:
    from qualiteacher.losses.pixel import block_weighted_l1
    from qualiteacher.models.injection import restore_conditions

    x = batch["x"][::PLS_PER_IMAGE]  # make_batch repeats each input for its PLs
    pred = restore_conditions(model, x, batch["level"].reshape(-1, PLS_PER_IMAGE)).flatten(0, 1)
    return block_weighted_l1(pred, batch["pl"], batch["weights"])


def repeated_loss(model, batch) -> torch.Tensor:
    from qualiteacher.losses.pixel import block_weighted_l1

    return block_weighted_l1(model(batch["x"], batch["level"]), batch["pl"], batch["weights"])


def reference_loss(model, batch) -> torch.Tensor:
    from qualiteacher.losses.pixel import block_weighted_l1

    n = batch["x"].shape[0]
    total = torch.zeros((), device=batch["x"].device)
    for i in range(n):
        s = slice(i, i + 1)
        pred = model(batch["x"][s], batch["level"][s])
        total = total + block_weighted_l1(pred, batch["pl"][s], batch["weights"][s])
    return total / n  # the same objective as the batched mean


def train_step(model, opt, loss_fn, batch) -> float:
    loss = loss_fn(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def gradient_gap(model, batch) -> float:
    """Max |grad batched - grad reference| on the same weights (should be ~1e-7)."""
    grads = []
    for fn in (batched_loss, reference_loss):
        m = copy.deepcopy(model)
        m.zero_grad(set_to_none=True)
        fn(m, batch).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters() if p.grad is not None]))
    return float((grads[0] - grads[1]).abs().max())


def main(argv: list[str] | None = None) -> float:
    parser = make_parser(__doc__.splitlines()[0], device=True)
    parser.add_argument("--images", type=int, default=None, help="inputs per step, 3 PLs each (default 4, fast 1)")
    parser.add_argument("--config", default=str(repo_root() / "configs" / "quickstart.yaml"))
    args = parser.parse_args(argv)
    apply_threads(args)
    reps, warmup = reps_and_warmup(args, full=(7, 2), fast=(1, 1))
    images = args.images or (1 if args.fast else 4)

    from qualiteacher.config import load_config
    from qualiteacher.models.build import build_model, count_parameters
    from qualiteacher.models.injection import injection_parameters

    device = bench_device(args)
    cfg = load_config(args.config)
    crop = cfg.data.crop_size
    torch.manual_seed(0)
    base = build_model(cfg.model)
    # Non-zero injection so the condition really changes the output (it is zero-initialised).
    with torch.no_grad():
        for p in injection_parameters(base).values():
            p.normal_(0, 0.02)
    base.to(device)
    batch = {k: v.to(device) for k, v in make_batch(images, crop).items()}
    n = batch["x"].shape[0]
    header("Student training step: batched score conditioning vs one bs-1 forward per stored PL", args.fast, [
        (f"model {cfg.model.arch} width {cfg.model.width} ({count_parameters(base) / 1e6:.3f} M parameters, "
        f"from {args.config}); crop {crop} px; {images} inputs x {PLS_PER_IMAGE} PLs = {n} samples per step; "
        f"block-weighted L1 + backward + Adam step; {warmup} warm-up + {reps} timed steps each, median; "
        f"device {device}"),
    ])

    gap = gradient_gap(base, batch)
    models = {k: copy.deepcopy(base) for k in ("batched", "repeated", "reference")}
    opts = {k: torch.optim.Adam(m.parameters(), lr=2e-4) for k, m in models.items()}
    way = lambda k, fn: lambda: train_step(models[k], opts[k], fn, batch)
    ways = {
        "batched (shared encoder, [N, 3] conditions)": way("batched", batched_loss),
        "reference (bs-1 forward per PL)": way("reference", reference_loss),
        "batched, inputs repeated (info)": way("repeated", repeated_loss),
    }
    timings = compare(ways, reps=reps, warmup=warmup, sync=device_sync(device))
    rows = [[name, t.median * 1e3, t.spread, n / t.median] for name, t in timings.items()]
    print_table(["way", "median ms/step", "min-max ms", "samples/s"], rows)
    print(f"max |gradient difference| batched vs reference (same weights): {gap:.2e}")
    b, r, _ = timings.values()
    speedup = r.median / b.median
    print(f"speed-up (samples/s batched / samples/s reference): {speedup:.2f}x (target >= {TARGET:g}x)")
    emit_result("student_speedup", speedup, "x", TARGET)
    return speedup


if __name__ == "__main__":
    main()
