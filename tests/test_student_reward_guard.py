"""A bank batch the reward cannot score (a flat crop) skips the method losses for one step
instead of killing the student worker (which Ray Train would restart into the same batch)."""

from __future__ import annotations

import numpy as np
import torch

from qualiteacher.config import load_config
from qualiteacher.iqa.ensemble import IQAEnsemble
from qualiteacher.method.bank_batch import BankBatch
from qualiteacher.models.build import build_model
from qualiteacher.models.injection import injection_snapshot
from qualiteacher.student_step import StepContext, step_losses


class _Paired:
    def sample_batch(self, n, crop, rng):
        x = torch.rand(n, 3, crop, crop)
        return x, x


def _flat_batch(n: int) -> BankBatch:
    return BankBatch(x=torch.full((n, 3, 96, 96), 0.5), pl=torch.full((n, 2, 3, 96, 96), 0.5),
                     weights=torch.ones(n, 2, 1, 96, 96), level=torch.full((n, 2), 7.0),
                     mask=torch.ones(n, 2, dtype=torch.bool), label_mask=torch.ones(n, 2, dtype=torch.bool))


def test_flat_bank_batch_skips_reward_terms(weights_dir):
    cfg = load_config("configs/smoke.yaml", ["data.crop_size=96", "train.bank_batch_size=2"])
    ensemble = IQAEnsemble.from_config(cfg)
    model = build_model(cfg.model)

    def flat_reward(y):  # what the real ensemble does when the student's output is flat
        return ensemble.reward(torch.full_like(y, 0.5)) + 0 * y.mean()

    ctx = StepContext(device=torch.device("cpu"), rng=np.random.default_rng(0), gen=torch.Generator().manual_seed(0),
                      reward=flat_reward, initial_injection=injection_snapshot(model))
    out = step_losses(cfg, model, _Paired(), _flat_batch(2), ctx, step=10)
    assert "pixel" in out and torch.isfinite(out["total"])
    out["total"].backward()
