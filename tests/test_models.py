import copy

import pytest
import torch
from torch import nn

from qualiteacher.config import ModelConfig
from qualiteacher.losses.preference import preference_loss
from qualiteacher.models.build import build_model, count_parameters, load_backbone_state
from qualiteacher.models.injection import (
    ScoreInjection,
    attach_score_injection,
    clamp_score,
    injection_parameters,
    restore_conditions,
    score_context,
    sinusoidal_embedding,
)

ARCHS = ["nafnet", "unet"]


def small_cfg(arch: str, condition: bool = True) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        width=8,
        enc_blocks=[1, 1],
        middle_blocks=1,
        dec_blocks=[1, 1],
        score_condition=condition,
    )


def perturb(model: nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its init so zero-init blocks (NAFNet beta/gamma) do something.
    The same values whatever the layout (`randn_like` of a channels-last weight would fill
    it in memory order)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, dtype=p.dtype, device=p.device))


def image(h: int = 37, w: int = 53, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_sinusoidal_embedding_shape_and_distinct():
    s = torch.tensor([0.0, 4.0, 7.0, 10.0])
    e = sinusoidal_embedding(s, num_frequencies=5, max_score=10.0)
    assert e.shape == (4, 10)
    assert e.abs().max() <= 1.0
    assert (
        torch.cdist(e, e).fill_diagonal_(1.0).min() > 1e-3
    )  # different scores, different codes


@pytest.mark.parametrize("frequencies", [1, 4, 16])
def test_sinusoidal_embedding_is_ordinal(frequencies):
    """Nearby scores embed nearby: the cosine similarity to any score falls strictly as the
    other score moves away from it, in either direction, over the whole 0-10 range."""
    grid = torch.linspace(0.0, 10.0, 41)
    e = torch.nn.functional.normalize(sinusoidal_embedding(grid, frequencies, 10.0), dim=1)
    sim = e @ e.T
    for i in range(len(grid)):
        right, left = sim[i, i:], sim[i, : i + 1].flip(0)
        assert (right[1:] < right[:-1]).all() and (left[1:] < left[:-1]).all(), f"score {grid[i]:.2f}"
    # one score step apart is close; the ends of the scale are far apart
    assert sim[28, 24] > 0.9 > 0.5 > sim[0, 40]
    # 7 is closer to 4 than to 0 (the old wide-band embedding had them equally far)
    assert sim[28, 16] > sim[28, 0] + 0.2


def test_clamp_score_merges_above_cap():
    assert clamp_score(torch.tensor([3.0, 7.0, 8.5, 10.0])).tolist() == [
        3.0,
        7.0,
        7.0,
        7.0,
    ]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("condition", [True, False])
def test_odd_shapes(arch, condition):
    model = build_model(small_cfg(arch, condition))
    x = image(37, 53)
    for score in (None, 5.0, torch.tensor([4.0, 9.0])):
        assert model(x, score).shape == x.shape
    assert model(image(5, 3, n=1)).shape == (1, 3, 5, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_injection_starts_as_identity_and_loads_unconditioned_state(arch):
    torch.manual_seed(0)
    plain = build_model(small_cfg(arch, condition=False))
    perturb(plain)
    cond = build_model(small_cfg(arch, condition=True))
    load_backbone_state(cond, plain.state_dict())
    x = image()
    with torch.no_grad():
        ref = plain(x)
        for score in (None, 0.0, 4.0, 7.0, 10.0, torch.tensor([2.0, 6.5])):
            torch.testing.assert_close(cond(x, score), ref, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_injection_becomes_score_dependent_after_training_step(arch):
    torch.manual_seed(0)
    model = build_model(small_cfg(arch))
    perturb(model)
    inj = injection_parameters(model)
    backbone_before = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if "score_injection" not in k
    }
    opt = torch.optim.SGD(inj.values(), lr=0.1)
    x = image()
    with torch.no_grad():  # perturb() moved the injection off zero: compare with the gap before
        gap_before = (model(x, 7.0).mean() - model(x, 1.0).mean()).item()
    # 7 against 1: with the ordinal embedding nearby scores start nearby, so one step moves
    # them apart by little (7 against 4 differed in the 5th decimal on the U-Net)
    y = model(torch.cat([x, x]), torch.tensor([7.0, 7.0, 1.0, 1.0]))
    q = y.mean(dim=(1, 2, 3))  # brightness as a stand-in reward
    loss = preference_loss(q[:2], q[2:], 0.0, beta=1.0, margin=0.1)["rank"]
    loss.backward()
    opt.step()
    with torch.no_grad():
        y7, y1, y9 = model(x, 7.0), model(x, 1.0), model(x, 9.0)
    assert (y7 - y1).abs().max() > 1e-6
    assert (y7.mean() - y1.mean()).item() > gap_before  # the step pushed the high-score output's reward up
    torch.testing.assert_close(
        y9, y7, rtol=0, atol=0
    )  # scores above the cap merge into it
    for k, v in model.state_dict().items():
        if k in backbone_before:
            assert torch.equal(v, backbone_before[k]), k


def test_load_backbone_state_rejects_mismatches():
    cond = build_model(small_cfg("nafnet", True))
    plain = build_model(small_cfg("nafnet", False))
    # A conditioned file loads into the unconditioned model (its injection keys are dropped)...
    load_backbone_state(plain, cond.state_dict())
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(plain(x), cond(x, 7.0), atol=1e-6)
    # ... but any other unexpected key is still an error naming it.
    extra = dict(plain.state_dict(), **{"not_a_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not_a_layer"):
        load_backbone_state(plain, extra)
    state = plain.state_dict()
    del state["intro.weight"]
    with pytest.raises(ValueError, match="intro.weight"):
        load_backbone_state(cond, state)
    load_backbone_state(
        cond, cond.state_dict()
    )  # same architecture with injection: fine


def test_attach_missing_layer_names_it():
    model = build_model(small_cfg("unet", False))
    with pytest.raises(KeyError, match="no_such_layer"):
        attach_score_injection(model, ["middle", "no_such_layer"], 4, 10.0)
    with pytest.raises(ValueError, match="empty"):
        attach_score_injection(model, [], 4, 10.0)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1)
        )
        self.head = nn.Conv2d(5, 3, 1)

    def forward(self, x):
        return self.head(self.features(x))


def test_attach_to_any_backbone_by_name():
    torch.manual_seed(0)
    model = Toy()
    injections = attach_score_injection(
        model, ["features.2"], num_frequencies=4, max_score=10.0
    )
    assert (
        injections["features__2"].channels == 5
    )  # inferred from the layer's last conv
    x = image(16, 16)
    with pytest.raises(RuntimeError, match="features.2"):
        model(x)  # no score set: never silently skip the injection
    with torch.no_grad():
        nn.init.normal_(injections["features__2"].mlp[-1].weight)
        with score_context(model, torch.tensor([3.0, 3.0])):
            y3 = model(x)
        with score_context(model, torch.tensor([7.0, 7.0])):
            y7 = model(x)
    assert (y3 - y7).abs().max() > 1e-4
    assert model.score_injection.current_score is None  # context restored


def test_deepcopy_rebinds_injection_to_the_copy():
    torch.manual_seed(0)
    model = build_model(small_cfg("nafnet"))
    perturb(model)
    twin = copy.deepcopy(model)
    x = image()
    with torch.no_grad():
        before = model(x, 7.0)
        for p in injection_parameters(twin).values():
            p.add_(1.0)
        assert torch.equal(
            model(x, 7.0), before
        )  # the copy's hooks use the copy's modules
        assert not torch.equal(twin(x, 7.0), before)


def test_injection_parameters_and_count():
    cond = build_model(small_cfg("unet", True))
    plain = build_model(small_cfg("unet", False))
    inj = injection_parameters(cond)
    assert inj and all(k.startswith("score_injection.middle.") for k in inj)
    assert count_parameters(cond) == count_parameters(plain) + sum(
        p.numel() for p in inj.values()
    )
    with pytest.raises(ValueError, match="no score injection"):
        injection_parameters(plain)


def test_score_injection_zero_init_module():
    inj = ScoreInjection(channels=4, num_frequencies=3)
    f = torch.randn(2, 4, 5, 5)
    assert torch.equal(inj(f, torch.tensor([1.0, 9.0])), f)


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_conditions_equals_one_forward_per_condition(arch):
    """The shared-encoder forward gives, for every (input, condition), the plain forward's
    output, and the same gradients."""
    torch.manual_seed(0)
    model = build_model(small_cfg(arch))
    perturb(model)
    x = image(37, 53, n=2)
    scores = torch.tensor([[7.0, 2.0, 4.5], [0.0, 9.0, 6.0]])  # 9 is above the cap: merged into 7
    shared = restore_conditions(model, x, scores)
    assert shared.shape == (2, 3, 3, 37, 53)
    plain = torch.stack([torch.stack([model(x[i:i + 1], scores[i, j:j + 1])[0] for j in range(3)])
                         for i in range(2)])
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert (shared[0, 0] - shared[0, 1]).abs().max() > 1e-4  # the condition matters
    torch.testing.assert_close(shared[1, 1], model(x[1:2], 7.0)[0], rtol=1e-5, atol=1e-5)
    weights = torch.rand_like(shared)
    grad_shared = torch.autograd.grad((shared * weights).sum(), list(model.parameters()))
    grad_plain = torch.autograd.grad((plain * weights).sum(), list(model.parameters()))
    for a, b in zip(grad_shared, grad_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_restore_conditions_on_any_backbone_and_without_injection():
    torch.manual_seed(0)
    toy = Toy()
    injections = attach_score_injection(toy, ["features.2"], num_frequencies=4, max_score=10.0)
    with torch.no_grad():
        nn.init.normal_(injections["features__2"].mlp[-1].weight)
    x = image(16, 16)
    scores = torch.tensor([[3.0, 7.0], [5.0, 5.0]])
    out = restore_conditions(toy, x, scores)
    with score_context(toy, torch.tensor([7.0])):
        expected = toy(x[:1])
    torch.testing.assert_close(out[0, 1], expected[0])
    assert (out[0, 0] - out[0, 1]).abs().max() > 1e-4
    plain = build_model(small_cfg("nafnet", condition=False))
    same = restore_conditions(plain, x, scores)
    assert torch.equal(same[:, 0], same[:, 1]) and torch.allclose(same[:, 0], plain(x))


def test_nafnet_layernorm_normalises_each_pixel_over_channels():
    """The fused LayerNorm2d against its definition (per pixel, over channels, biased
    variance), values and gradients; NCHW-contiguous output for the convolutions after it."""
    from qualiteacher.models.nafnet import LayerNorm2d

    torch.manual_seed(0)
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 6, 5, 7) * 3 + 1).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    mu = x_ref.mean(1, keepdim=True)
    var = (x_ref - mu).pow(2).mean(1, keepdim=True)
    expected = norm.weight.view(1, -1, 1, 1) * (x_ref - mu) / torch.sqrt(var + norm.eps) + norm.bias.view(1, -1, 1, 1)
    out = norm(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_changes_speed_not_results(arch):
    """`model.channels_last` (the default) keeps weights and activations NHWC in memory: same
    state dict, same outputs and gradients as the NCHW network to float rounding, and the
    output comes back in the caller's layout."""
    torch.manual_seed(0)
    nchw = build_model(small_cfg(arch).model_copy(update={"channels_last": False}))
    perturb(nchw)
    nhwc = build_model(small_cfg(arch))
    nhwc.load_state_dict(nchw.state_dict())
    conv_weights = [m.weight for m in nhwc.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    assert any(not w.is_contiguous() for w in conv_weights)  # (1x1 and depthwise kernels are both)
    x, scores = image(), torch.tensor([[7.0, 3.0], [5.0, 7.0]])
    outs, grads = {}, {}
    for name, model in (("nchw", nchw), ("nhwc", nhwc)):
        model.zero_grad()
        y, ys = model(x, 6.0), restore_conditions(model, x, scores)
        (y.square().mean() + ys.abs().mean()).backward()
        assert y.is_contiguous() and ys.is_contiguous()
        outs[name], grads[name] = (y.detach(), ys.detach()), {k: p.grad for k, p in model.named_parameters()}
    for a, b in zip(outs["nhwc"], outs["nchw"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key, grad in grads["nchw"].items():
        torch.testing.assert_close(grads["nhwc"][key], grad, rtol=1e-4, atol=1e-6, msg=key)
    nhwc_in = x.contiguous(memory_format=torch.channels_last)
    assert nhwc(nhwc_in, 6.0).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_gradients_have_their_parameters_strides(arch, channels_last):
    """DDP (Ray Train with several workers) warns about and copies every gradient whose
    strides differ from its parameter's, size-1 dimensions included."""
    model = build_model(small_cfg(arch).model_copy(update={"channels_last": channels_last}))
    model(image(), 5.0).square().mean().backward()
    mismatched = {name: (p.stride(), p.grad.stride()) for name, p in model.named_parameters()
                  if p.stride() != p.grad.stride()}
    assert not mismatched, mismatched


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_reaches_every_layer(arch):
    """With `channels_last`, every module of the network sees NHWC activations, through
    `forward` and through the shared-encoder path (an op that returns NCHW, such as
    `repeat_interleave`, would send the rest of the network down the slow NCHW kernels)."""
    model = build_model(small_cfg(arch))
    names = {module: name for name, module in model.named_modules()}
    nchw = set()

    def check(module, args):
        x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() == 4 and min(x.shape[1:]) > 1:
            if not x.is_contiguous(memory_format=torch.channels_last):
                nchw.add(names[module])

    handles = [m.register_forward_pre_hook(check) for m in model.modules() if m is not model]
    try:
        model(image(), 5.0)
        restore_conditions(model, image(), torch.tensor([[7.0, 3.0], [5.0, 7.0]]))
    finally:
        for handle in handles:
            handle.remove()
    assert not nchw, sorted(nchw)
