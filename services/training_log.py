"""Rank 0's training log: TensorBoard events in the run folder, the monitor's stream in Redis.

What is logged, under which tags, and when to probe is `qualiteacher.training_log`'s; this
module writes it to both sinks, so TensorBoard and the monitor show the same numbers.
Logging never stops training: while Redis is away the stream misses those steps (TensorBoard
still gets them), with one warning per outage.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import redis
import torch
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.training_stream import TrainingStream

from qualiteacher.config import Config
from qualiteacher.imageio import encode_png
from qualiteacher.probe import load_probe_set, restore_probes, side_by_side
from qualiteacher.run_dir import RunDir
from qualiteacher.training_log import (
    PROBE_INPUT,
    Rate,
    bank_scalars,
    labelled_sets,
    probe_due,
    score_histogram,
    step_scalars,
)

log = logging.getLogger(__name__)
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class TrainingLog:
    """Opened by rank 0 once per worker start (`open`), fed once per step (`record`)."""

    def __init__(self, cfg: Config, writer, stream: TrainingStream, bank: MemoryBank,
                 probe_inputs: np.ndarray | None, device: torch.device) -> None:
        self.cfg, self.writer, self.stream, self.bank = cfg, writer, stream, bank
        self.probe_inputs, self.device = probe_inputs, device
        self.steps, self.sets = Rate(), Rate()
        self.redis_ok = True

    @classmethod
    def open(cls, cfg: Config, run_dir: str | Path, unpaired_dir: str | Path, bank: MemoryBank,
             device: torch.device, start_step: int) -> TrainingLog:
        """Events go to ``run_dir/tensorboard``. ``start_step``: the steps this worker has already
        (its checkpoint's); TensorBoard hides what an earlier attempt logged after it (this one
        logs those steps again), and a start at 0 clears the stream of an earlier run."""
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(RunDir(run_dir).tensorboard), purge_step=start_step + 1, flush_secs=10)
        probes = None
        if cfg.train.probe_every_pushes:
            probes = load_probe_set(unpaired_dir, cfg.train.probe_images, cfg.labelling.image_size,
                                    cfg.data.max_image_pixels)
        self = cls(cfg, writer, TrainingStream(bank.client, cfg.redis.prefix), bank, probes, device)
        if start_step == 0:
            self._to_redis(self.stream.reset)
        return self

    def record(self, step: int, losses: dict[str, torch.Tensor], lr: float, teacher_version: int,
               model: torch.nn.Module) -> None:
        """After the step numbered ``step`` (1-based): its scalars every ``train.log_every``
        steps and at the last, probe images when the step's push is one to probe."""
        tc = self.cfg.train
        if step % tc.log_every == 0 or step == tc.steps:
            self._scalars(step, {k: float(v.detach()) for k, v in losses.items()}, lr, teacher_version)
        if self.probe_inputs is not None and probe_due(step, teacher_version, tc.push_every, tc.probe_every_pushes):
            self._probe(step, teacher_version, model)

    def close(self) -> None:
        self.writer.close()

    # ------------------------------------------------------------------ internals
    def _scalars(self, step: int, losses: dict[str, float], lr: float, teacher_version: int) -> None:
        now = time.monotonic()
        scalars = step_scalars(losses, lr, teacher_version)
        rate = self.steps.update(step, now)
        if rate is not None:
            scalars["train/steps_per_s"] = rate
        stats = self._to_redis(self.bank.stats)
        if stats is not None:
            scalars.update(bank_scalars(stats))
            sets_rate = self.sets.update(labelled_sets(stats), now)
            if sets_rate is not None:
                scalars["bank/labelled_sets_per_s"] = sets_rate
            histogram = score_histogram(stats)
            if histogram is not None:
                self.writer.add_histogram_raw("bank/score_histogram", global_step=step, **histogram)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self._to_redis(lambda: self.stream.add(step, scalars))

    def _probe(self, step: int, teacher_version: int, model: torch.nn.Module) -> None:
        images = restore_probes(model, self.probe_inputs, self.cfg.train.probe_scores, self.device)
        for name, batch in images.items():
            tag = "probe/input" if name == PROBE_INPUT else f"probe/score_{name}"
            self.writer.add_images(tag, batch, step, dataformats="NHWC")
        k, h, w = self.probe_inputs.shape[:3]
        pngs = {name: encode_png(side_by_side(batch), compress_level=3) for name, batch in images.items()}
        self._to_redis(lambda: self.stream.put_probes(step, teacher_version, pngs, k, w, h))
        log.info("step %d: probe images at scores %s", step, ", ".join(n for n in images if n != PROBE_INPUT))

    def _to_redis(self, call):
        """``call()``, or None while Redis is away (the client has already retried)."""
        try:
            result = call()
        except REDIS_ERRORS as exc:
            if self.redis_ok:
                log.warning("training log: Redis unreachable (%s); TensorBoard only until it is back",
                            type(exc).__name__)
            self.redis_ok = False
            return None
        self.redis_ok = True
        return result
