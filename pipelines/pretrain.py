"""Stage 1: supervised pretraining on paired synthetic data; the result is the first teacher.

L1 between ``model(x, score_cap)`` and the clean target on random crops. The condition is
``score_cap`` because paired targets are clean, i.e. of the best quality the model is
asked for at inference. The command is `qualiteacher pretrain` (`pipelines/cli.py`)::

    qualiteacher pretrain --config configs/quickstart.yaml \
        --paired-input D/paired/input --paired-target D/paired/target --out runs/x/pretrain.pt
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qualiteacher.checkpoint import save_model_file
from qualiteacher.config import Config
from qualiteacher.data.paired import PairedImages
from qualiteacher.device import pick_device
from qualiteacher.models.build import build_model

# final_loss is the mean over this many last steps: one batch's loss is too noisy.
_FINAL_WINDOW = 10


def _paired_dirs(cfg: Config, input_dir: Path | None, target_dir: Path | None) -> tuple[Path, Path]:
    input_dir = input_dir or cfg.data.paired_input_dir
    target_dir = target_dir or cfg.data.paired_target_dir
    if input_dir is None or target_dir is None:
        raise ValueError(
            "pretraining needs paired data: pass the input and target folders "
            "(--paired-input/--paired-target) or set data.paired_input_dir and data.paired_target_dir"
        )
    return Path(input_dir), Path(target_dir)


def load_paired(cfg: Config, input_dir: Path | None, target_dir: Path | None,
                log: Callable[[str], None] = print) -> PairedImages:
    """The paired set, with every skipped file logged (errors name the file)."""
    data = PairedImages(*_paired_dirs(cfg, input_dir, target_dir), max_pixels=cfg.data.max_image_pixels)
    for path, reason in data.errors:
        log(f"skipped {path}: {reason}")
    return data


def pretrain(
    cfg: Config,
    paired_input_dir: str | Path | None,
    paired_target_dir: str | Path | None,
    out_path: str | Path,
    log: Callable[[str], None] = print,
    data: PairedImages | None = None,
) -> Path:
    """Train ``build_model(cfg.model)`` for ``cfg.pretrain.steps`` L1 steps; write a model file.

    ``data`` may be passed to reuse an already loaded set. Returns ``out_path``.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if data is None:
        data = load_paired(cfg, _opt_path(paired_input_dir), _opt_path(paired_target_dir), log)
    device = pick_device(cfg.train.use_gpu)
    model = build_model(cfg.model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
    p = cfg.pretrain
    log(f"pretrain: {len(data)} pairs, {p.steps} steps, batch {p.batch_size}, "
        f"crop {cfg.data.crop_size}, lr {p.lr}, device {device}")
    recent: deque[float] = deque(maxlen=_FINAL_WINDOW)
    start, every = time.perf_counter(), max(1, p.steps // 10)
    for step in range(1, p.steps + 1):
        x, y = (t.to(device) for t in data.sample_batch(p.batch_size, cfg.data.crop_size, rng))
        loss = F.l1_loss(model(x, cfg.model.score_cap), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain loss became {loss.item()} at step {step}; lower pretrain.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent.append(loss.item())
        if step % every == 0 or step == p.steps:
            log(f"pretrain step {step}/{p.steps} l1 {recent[-1]:.4f} ({time.perf_counter() - start:.1f}s)")
    extra: dict[str, int | float | str] = {"stage": "pretrain", "steps": p.steps, "seed": cfg.seed,
                                           "task": cfg.data.task}
    if recent:
        extra["final_loss"] = float(np.mean(recent))
    out = save_model_file(out_path, model.cpu(), cfg.model, extra=extra)
    log(f"pretrain: wrote {out} in {time.perf_counter() - start:.1f}s")
    return out


def _opt_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)
