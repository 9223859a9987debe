"""Gradients reach the student through every loss when the reward is the real IQA ensemble."""

from __future__ import annotations

import pytest
import torch

from qualiteacher.method.bank_batch import upsample_block_weights

from qualiteacher.config import ModelConfig, PreferenceConfig
from qualiteacher.losses.consistency import cropped_consistency_loss
from qualiteacher.losses.pixel import block_weighted_l1
from qualiteacher.losses.preference import preference_step
from qualiteacher.models.build import build_model
from qualiteacher.models.injection import injection_parameters, injection_snapshot


@pytest.fixture()
def student():
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=8, enc_blocks=[1, 1], dec_blocks=[1, 1], middle_blocks=1))
    with torch.no_grad():  # move injection layers off zero-init so conditioning matters
        for p in injection_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _image(size=96):
    gen = torch.Generator().manual_seed(3)
    ramp = torch.linspace(0, 1, size)
    base = (ramp[None, :] * ramp[:, None]).expand(1, 3, size, size)
    return (0.6 * base + 0.2 * torch.rand(1, 3, size, size, generator=gen)).repeat(2, 1, 1, 1)


def _assert_grads(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no gradient reached the student"
    flat = torch.cat([g.flatten() for g in grads])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0


def test_preference_losses_backprop_through_ensemble(student, offline_ensemble):
    initial = injection_snapshot(student)
    with torch.no_grad():
        for p in injection_parameters(student).values():
            p.add_(0.01)
    cfg = PreferenceConfig(warmup_steps=0)
    q_min = torch.full((2,), 0.3)
    losses, _ = preference_step(student, _image(), offline_ensemble.reward, q_min, cfg,
                                generator=torch.Generator().manual_seed(0), initial=initial)
    for name in ("rank", "anchor", "identity"):
        student.zero_grad()
        losses[name].backward(retain_graph=True)
        _assert_grads(student)


def test_consistency_loss_backprops_through_ensemble(student, offline_ensemble):
    loss = cropped_consistency_loss(student, _image(), offline_ensemble.reward, crop_area=0.25,
                                    generator=torch.Generator().manual_seed(1))
    assert loss.item() > 0
    loss.backward()
    _assert_grads(student)


def test_block_weighted_pixel_loss_with_real_weight_map(student, offline_ensemble):
    x = _image()
    pl = x.flip(-1)
    wmap = torch.stack([upsample_block_weights(grid.numpy(), pl.shape[-2:])
                        for grid in offline_ensemble.block_weights(pl, grid=2)])
    block_weighted_l1(student(x, 5.0), pl, wmap).backward()
    _assert_grads(student)
