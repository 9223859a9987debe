import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg19

from qualiteacher.config import ModelConfig, PreferenceConfig
from qualiteacher.losses.consistency import cropped_consistency_loss, random_box
from qualiteacher.losses.perceptual import (
    VGG19_URL,
    VGGPerceptualLoss,
    vgg19_weights_path,
)
from qualiteacher.losses.pixel import block_weighted_l1, l1
from qualiteacher.losses.preference import (
    identity_loss,
    preference_loss,
    preference_step,
)
from qualiteacher.models.build import build_model
from qualiteacher.models.injection import injection_parameters, injection_snapshot

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def reward(y: torch.Tensor) -> torch.Tensor:
    """Differentiable stand-in for the IQA ensemble: brightness and smoothness, in [0, 1]."""
    gray = y.mean(1, keepdim=True)
    lap = (
        F.conv2d(gray, LAPLACIAN.to(y)[None, None], padding=1).abs().mean(dim=(1, 2, 3))
    )
    return 0.5 * y.mean(dim=(1, 2, 3)).clamp(0, 1) + 0.5 * (1 - torch.tanh(lap))


def student(arch: str = "nafnet") -> nn.Module:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            arch=arch, width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1]
        )
    )
    with torch.no_grad():  # off init, so zero-init blocks and the injection are active
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def x_batch(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def assert_grads_reach(model: nn.Module, include_injection: bool = True) -> None:
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    backbone = [
        g for k, g in grads.items() if "score_injection" not in k and g is not None
    ]
    assert backbone and sum(g.abs().sum() for g in backbone) > 0
    if include_injection:
        inj = [g for k, g in grads.items() if "score_injection" in k and g is not None]
        assert inj and sum(g.abs().sum() for g in inj) > 0


# ---- pixel ---------------------------------------------------------------------------


def test_block_weighted_l1_values():
    pred, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    ones = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(block_weighted_l1(pred, target, ones), l1(pred, target))
    torch.testing.assert_close(
        block_weighted_l1(pred, target, 0.5 * ones), 0.5 * l1(pred, target)
    )
    torch.testing.assert_close(block_weighted_l1(pred, target, None), l1(pred, target))
    with pytest.raises(ValueError, match="weight_map"):
        block_weighted_l1(pred, target, torch.ones(2, 1, 4, 4))


def test_block_weighted_l1_zero_region_contributes_nothing():
    pred, target = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    weight = torch.ones(1, 1, 8, 8)
    weight[..., :4, :] = 0.0
    wild = pred.clone()
    wild[..., :4, :] = 100.0  # huge error only where the weight is zero
    torch.testing.assert_close(
        block_weighted_l1(wild, target, weight), block_weighted_l1(pred, target, weight)
    )
    wild.requires_grad_(True)
    block_weighted_l1(wild, target, weight).backward()
    assert torch.all(wild.grad[..., :4, :] == 0) and torch.any(
        wild.grad[..., 4:, :] != 0
    )


def test_block_weighted_l1_gradients_reach_student():
    model, x = student(), x_batch()
    weight = torch.rand(2, 1, 32, 32)
    block_weighted_l1(
        model(x, torch.tensor([5.0, 6.0])), torch.rand_like(x), weight
    ).backward()
    assert_grads_reach(model)


# ---- preference ----------------------------------------------------------------------


def test_preference_loss_hand_values():
    q_h, q_l = torch.tensor([0.6, 0.5]), torch.tensor([0.4, 0.5])
    out = preference_loss(q_h, q_l, torch.tensor([0.3, 0.5]), beta=0.5, margin=0.1)
    sp = lambda z: math.log1p(math.exp(-z))  # -log sigmoid(z)
    torch.testing.assert_close(
        out["rank"], torch.tensor((sp(0.1 / 0.5) + sp(-0.1 / 0.5)) / 2)
    )
    torch.testing.assert_close(
        out["anchor"], torch.tensor((sp(0.3 / 0.5) + sp(0.0)) / 2)
    )


@pytest.mark.parametrize("arch", ["nafnet", "unet"])
def test_preference_step_one_batched_forward_and_gradients(arch):
    model, x = student(arch), x_batch(n=3)
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    cfg = PreferenceConfig()
    losses, out = preference_step(
        model,
        x,
        reward,
        torch.tensor([0.2, 0.3, 0.4]),
        cfg,
        torch.Generator().manual_seed(0),
    )
    assert calls == [6]  # y_h and y_l in one forward of 2N
    assert set(out["s_low"].tolist()) <= {4.0, 5.0, 6.0}
    assert out["y_high"].shape == out["y_low"].shape == x.shape
    expected = cfg.weight_rank * losses["rank"] + cfg.weight_anchor * losses["anchor"]
    torch.testing.assert_close(losses["total"], expected)
    for name in ("rank", "anchor"):
        model.zero_grad()
        losses[name].backward(retain_graph=True)
        assert_grads_reach(model)


def test_preference_rank_gradient_at_zero_init_injection():
    # Fresh injection (y_h == y_l): the rank loss still gives its last layer a gradient.
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=8, enc_blocks=[1], dec_blocks=[1]))
    losses, out = preference_step(model, x_batch(), reward, 0.0, PreferenceConfig())
    torch.testing.assert_close(out["y_high"], out["y_low"])
    losses["rank"].backward()
    last = model.score_injection["middle"].mlp[-1].weight.grad
    assert last is not None and last.abs().sum() > 0


def test_identity_loss_values_and_gradient():
    model = student()
    initial = injection_snapshot(model)
    assert identity_loss(model, initial).item() == 0.0
    params = injection_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)
    loss = identity_loss(model, initial)
    n = sum(p.numel() for p in params.values())
    torch.testing.assert_close(loss, torch.tensor(0.01 * n))
    loss.backward()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, 2 * (p.detach() - initial[k]))
        assert p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="empty"):
        identity_loss(model, {})
    with pytest.raises(ValueError, match="do not match"):
        identity_loss(model, {"score_injection.other.weight": torch.zeros(1)})


def test_preference_step_adds_identity_term():
    model = student()
    initial = injection_snapshot(model)
    with torch.no_grad():
        injection_parameters(model)["score_injection.middle.mlp.2.bias"].add_(1.0)
    cfg = PreferenceConfig()
    losses, _ = preference_step(model, x_batch(), reward, 0.1, cfg, initial=initial)
    assert losses["identity"].item() > 0
    expected = cfg.weight_rank * losses["rank"] + cfg.weight_anchor * losses["anchor"]
    torch.testing.assert_close(
        losses["total"], expected + cfg.weight_identity * losses["identity"]
    )


# ---- consistency ---------------------------------------------------------------------


def test_random_box_area_and_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        top, left, h, w = random_box(40, 60, 0.25, g)
        assert (h, w) == (20, 30) and 0 <= top <= 20 and 0 <= left <= 30


def test_random_box_grows_to_min_side_within_the_image():
    g = torch.Generator().manual_seed(0)
    assert random_box(40, 60, 0.25, g, min_side=25)[2:] == (25, 30)
    assert random_box(40, 60, 0.25, g, min_side=96) == (0, 0, 40, 60)


@pytest.mark.parametrize("arch", ["nafnet", "unet"])
def test_consistency_gradients_reach_student(arch):
    model, x = student(arch), x_batch(size=48)
    loss = cropped_consistency_loss(
        model, x, reward, 0.25, torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert_grads_reach(model)


def test_consistency_full_crop_is_zero_and_reuses_output():
    model, x = student(), x_batch()
    assert (
        cropped_consistency_loss(model, x, reward, crop_area=1.0).item()
    ) == pytest.approx(0.0, abs=1e-7)
    y = model(x, 7.0)
    g = lambda: torch.Generator().manual_seed(5)
    a = cropped_consistency_loss(model, x, reward, 0.25, g())
    b = cropped_consistency_loss(model, x, reward, 0.25, g(), full_output=y)
    torch.testing.assert_close(a, b)


# ---- perceptual ----------------------------------------------------------------------


def test_perceptual_missing_file_names_path(tmp_path):
    expected = tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert vgg19_weights_path(tmp_path) == expected
    with pytest.raises(FileNotFoundError) as err:
        VGGPerceptualLoss(tmp_path)
    assert str(expected) in str(err.value) and VGG19_URL in str(err.value)


def test_perceptual_loads_local_file_and_gives_gradients(tmp_path):
    torch.manual_seed(0)
    with torch.device("meta"):  # skip allocating the unused classifier
        features = vgg19(weights=None).features
    features = features.to_empty(device="cpu")
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    path = vgg19_weights_path(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)

    loss_fn = VGGPerceptualLoss(tmp_path)
    torch.testing.assert_close(loss_fn.features[0].weight, features[0].weight)
    loss_fn.train()
    assert not loss_fn.training
    model, x = student(), x_batch()
    loss = loss_fn(model(x, 7.0), torch.rand_like(x))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert_grads_reach(model)
    assert all(p.grad is None for p in loss_fn.parameters())
