"""The Ray Train student loop: bank pseudo-labels + paired data -> every loss -> EMA -> push.

Each rank draws its own bank samples (Ray Data is bounded-only, the bank is not), and every
rank runs exactly `train.steps` steps, so collective calls always line up. The step's losses
are `qualiteacher.student_step.step_losses` (importable without Ray). Gradients are averaged
with one flat all-reduce after backward instead of a DDP wrapper: a step runs the student
several times (pixel, preference at two scores, cropped consistency) and a manual
all-reduce is correct for any number of forwards.

Rank 0 keeps the EMA teacher; every `push_every` steps it packs its state into one byte
buffer (`qualiteacher.flat_weights`, which Ray reads without a copy), does one `ray.put`
and hands `(ref, version)` to the labeller, which forwards it to every teacher. The job hands
the labeller's actor handle over in the loop's config (`qualiteacher.pipelines.train.run_student`).
Checkpoints (student, EMA, optimiser, step, teacher version) go through `ray.train.report`;
a restarted run resumes from the latest one. Rank 0 also keeps the training log
(`services/training_log.py`: TensorBoard events in the run folder, the monitor's stream and
probe images in Redis).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import redis
import torch
from qualiteacher.services.bank.codec import decode_image, decode_weights
from qualiteacher.services.bank.inputs import InputStore
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.redis_server import redis_client
from qualiteacher.services.training_log import TrainingLog

from qualiteacher.checkpoint import load_training_state, save_training_state
from qualiteacher.config import Config
from qualiteacher.data.paired import PairedImages
from qualiteacher.flat_weights import flatten
from qualiteacher.method.bank_batch import BankBatch, BankLabel, assemble_bank_batch
from qualiteacher.method.ema import EMA
from qualiteacher.models.build import build_model
from qualiteacher.models.injection import injection_snapshot
from qualiteacher.student_step import (
    StepContext,
    average_gradients,
    gradients_finite,
    perceptual_fn,
    reward_fn,
    step_losses,
    set_learning_rates,
    student_optimizer,
    target_levels,
)

log = logging.getLogger(__name__)


class BankBatches:
    """Samples bank records from Redis and hands them to the core as a `BankBatch`."""

    def __init__(self, cfg: Config, redis_url: str, rng: np.random.Generator):
        client = redis_client(redis_url)
        self.bank = MemoryBank(client, cfg.redis.prefix, cfg.gating.top_k)
        self.inputs = InputStore(client, cfg.redis.prefix)
        self.crop = cfg.data.crop_size
        self.cap = cfg.model.score_cap
        self.rng = rng

    def report_progress(self, step: int, total: int, loss: float) -> None:
        """Rank 0's step and loss, for the driver's progress line and the monitor."""
        try:
            self.bank.status.report_progress(step, total, loss)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # progress is informational; training goes on

    def record_start(self) -> None:
        """Count worker-group starts: within one job, every start after the first is a
        restart by Ray Train (a worker or its node lost), from a checkpoint or from scratch."""
        self.bank.status.count_start()

    def record_resume(self, step: int) -> None:
        """Count restarts from a checkpoint (worker failure or a re-run job), for the summary."""
        self.bank.status.count_resume(step)

    def wait_for_entries(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.bank.num_images() == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def sample(self, n: int, device: torch.device) -> BankBatch | None:
        """`n` bank images, each with all its labels on one crop (`assemble_bank_batch`), or
        None when the bank is empty or Redis is unreachable (the step then trains on paired
        data only; the client already retried with backoff)."""
        try:
            sets = self.bank.sample_sets(n, self.rng)
            inputs = self.inputs.get_many({entries[0].image_id for entries in sets})
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("bank unreachable (%s); this step uses paired data only", type(exc).__name__)
            return None
        sets = [entries for entries in sets if entries[0].image_id in inputs]
        labels = [[BankLabel(decode_image(e.image), decode_weights(e.weights), e.level,
                             tuple(zip(e.ladder_alphas, e.ladder_levels))) for e in entries]
                  for entries in sets]
        batch = assemble_bank_batch([inputs[entries[0].image_id] for entries in sets], labels,
                                    self.crop, self.cap, self.rng)
        return None if batch is None else batch.to(device)


def _save_checkpoint(model, ema, opt, step, version, cfg) -> ray.train.Checkpoint:
    from ray.train import Checkpoint

    directory = Path(tempfile.mkdtemp(prefix="qt-ckpt-"))
    save_training_state(directory, student_state=model.state_dict(), ema_state=ema.state_dict(),
                        optimizer_state=opt.state_dict(), step=step, teacher_version=version,
                        model_cfg=cfg.model)
    return Checkpoint.from_directory(str(directory))


def train_loop_per_worker(loop_cfg: dict) -> None:
    """Entry point of every Ray Train worker."""
    import ray.train
    from ray.train.torch import get_device

    cfg = Config.model_validate(loop_cfg["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if cfg.train.use_gpu else torch.device("cpu")

    model = build_model(cfg.model)
    model.load_state_dict(ray.get(loop_cfg["init_state"][0]))
    initial_injection = injection_snapshot(model) if cfg.model.score_condition else None
    model.to(device)
    opt = student_optimizer(cfg, model)
    ema = EMA(model, cfg.ema.decay)
    step, version = 0, int(loop_cfg["init_version"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_training_state(d)
        model.load_state_dict(state["student"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, version = int(state["step"]), int(state["teacher_version"])
        log.info("rank %d resumed at step %d, teacher version %d", rank, step, version)
    if initial_injection is not None:
        initial_injection = {k: v.to(device) for k, v in initial_injection.items()}

    rng = np.random.default_rng([cfg.seed, rank, step])
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank * 7919 + step)
    paired = PairedImages(loop_cfg["paired_input_dir"], loop_cfg["paired_target_dir"],
                          max_pixels=cfg.data.max_image_pixels)
    if rank == 0:
        for path, reason in paired.errors:
            log.warning("paired data: skipping %s: %s", path, reason)
    if cfg.loss.supervised_condition == "target_score" and cfg.model.score_condition:
        paired.levels = target_levels(cfg, paired.targets)
        log.info("supervised conditions of the %d paired targets: %s", len(paired),
                 ", ".join(f"{v:.2f}" for v in paired.levels.tolist()))
    bank = BankBatches(cfg, loop_cfg["redis_url"], rng)
    if rank == 0:
        bank.record_start()
    if checkpoint is not None and rank == 0:
        bank.record_resume(step)
    bank.wait_for_entries(cfg.train.bank_wait_s)
    step_ctx = StepContext(device=device, rng=rng, gen=gen, reward=reward_fn(cfg),
                           initial_injection=initial_injection, perceptual=perceptual_fn(cfg, device))
    labeller = loop_cfg["labeller"] if rank == 0 else None
    training_log = TrainingLog.open(cfg, loop_cfg["run_dir"], loop_cfg["unpaired_dir"], bank.bank, device,
                                    step) if rank == 0 else None
    push = None
    skipped = 0

    while step < cfg.train.steps:
        batch = bank.sample(cfg.train.bank_batch_size, device)
        losses = step_losses(cfg, model, paired, batch, step_ctx, step=step)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        average_gradients(model, world)
        if gradients_finite(model):  # identical on every rank after the all-reduce
            set_learning_rates(cfg, opt, step)
            opt.step()
            ema.update(model)
        else:
            skipped += 1
            log.warning("rank %d: non-finite gradients at step %d; update skipped", rank, step)
        step += 1
        if step % cfg.train.push_every == 0:
            version += 1
            if rank == 0:
                if push is not None:
                    ray.get(push)  # at most one push in flight
                ref = ray.put(flatten(ema.teacher.state_dict()))  # one copy, from any device
                push = labeller.push_weights.remote([ref], version)
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        metrics.update(step=step, teacher_version=version, skipped_updates=skipped)
        if rank == 0:
            bank.report_progress(step, cfg.train.steps, metrics["total"])
            training_log.record(step, losses, opt.param_groups[0]["lr"], version, model)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            ckpt = _save_checkpoint(model, ema, opt, step, version, cfg) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
    if push is not None:
        ray.get(push)
    if training_log is not None:
        training_log.close()
