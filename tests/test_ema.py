import pytest
import torch
import torch.distributed as dist
from torch import nn

from qualiteacher.config import EMAConfig, ModelConfig
from qualiteacher.method.ema import EMA
from qualiteacher.models.build import build_model
from qualiteacher.models.injection import injection_parameters


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def set_params(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_update_matches_hand_computation():
    student = net()
    set_params(student, 1.0)
    ema = EMA(student, decay=0.9)
    set_params(student, 3.0)
    student(torch.randn(4, 3))  # BatchNorm running stats and counter move
    ema.update(student)
    # 0.9 * 1 + 0.1 * 3 = 1.2
    for p in ema.teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.2))
    set_params(student, -1.0)
    ema.update(student)
    # 0.9 * 1.2 + 0.1 * -1 = 0.98
    for p in ema.teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.98))
    bn_t, bn_s = ema.teacher[1], student[1]
    assert torch.equal(
        bn_t.running_mean, bn_s.running_mean
    )  # buffers copied, not averaged
    assert int(bn_t.num_batches_tracked) == 1
    assert ema.step == 2
    assert not any(p.requires_grad for p in ema.teacher.parameters())


def test_from_config_and_state_dict_roundtrip():
    student = net()
    ema = EMA.from_config(student, EMAConfig(decay=0.5))
    set_params(student, 2.0)
    ema.update(student)
    other = EMA(net(), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.step == 1 and other.decay == 0.5
    for a, b in zip(
        other.teacher.state_dict().values(), ema.teacher.state_dict().values()
    ):
        assert torch.equal(a, b)


def test_cpu_state_dict_is_a_detached_copy():
    ema = EMA(net())
    state = ema.cpu_state_dict()
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    state["0.weight"].add_(5.0)
    assert not torch.equal(state["0.weight"], ema.teacher[0].weight)


def test_teacher_of_conditioned_model_is_independent():
    student = build_model(ModelConfig(width=8, enc_blocks=[1], dec_blocks=[1]))
    ema = EMA(student, decay=0.9)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        before = ema.teacher(x, 7.0)
        for p in injection_parameters(student).values():
            p.add_(1.0)
        assert torch.equal(ema.teacher(x, 7.0), before)
        ema.update(student)
        assert not torch.equal(ema.teacher(x, 7.0), before)


def test_ddp_wrapped_student(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        student = net()
        set_params(student, 1.0)
        ddp = nn.parallel.DistributedDataParallel(student)
        ema = EMA(ddp, decay=0.75)
        assert "0.weight" in ema.teacher.state_dict()  # no "module." prefix
        set_params(student, 5.0)
        ema.update(ddp)
        for p in ema.teacher.parameters():
            torch.testing.assert_close(
                p, torch.full_like(p, 2.0)
            )  # 0.75 * 1 + 0.25 * 5
    finally:
        dist.destroy_process_group()
