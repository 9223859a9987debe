"""The weight push's wire format: exact round trips, every dtype, clear layout errors."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from qualiteacher.config import load_config
from qualiteacher.flat_weights import ALIGN, FlatWeights, Slot, flatten
from qualiteacher.models.build import build_model


def quickstart_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config("configs/quickstart.yaml").model)


def with_batchnorm() -> nn.Module:
    """A model with int64 (num_batches_tracked) buffers beside its float ones."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.train()(torch.rand(2, 3, 8, 8))  # running stats and the counter move
    return model


def assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("make", [quickstart_model, with_batchnorm])
def test_round_trip_of_a_real_model_is_exact(make):
    state = make().state_dict()
    flat = flatten(state)
    assert flat.buffer.dtype == np.uint8 and flat.buffer.ndim == 1
    assert_same_state(flat.tensors(), state)
    fresh = make()
    for tensor in fresh.state_dict().values():  # views of its parameters and buffers
        tensor.zero_()
    flat.load_into(fresh)
    assert_same_state(fresh.state_dict(), state)


def test_mixed_dtypes_shapes_and_layouts_round_trip():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {
        "f32": torch.randn(5, 7),
        "f64": torch.randn(3, dtype=torch.float64),
        "f16": torch.randn(9, dtype=torch.float16),
        "bf16": torch.randn(2, 3, dtype=torch.bfloat16),  # no numpy dtype: travels as bytes
        "i64": torch.tensor(123456789012, dtype=torch.int64),  # 0-d, like num_batches_tracked
        "i32": torch.tensor([-1, 2, 3], dtype=torch.int32),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),  # not contiguous: packed as its values, in its shape
    }
    flat = flatten(state)
    assert all(slot.offset % ALIGN == 0 for slot in flat.layout)
    assert [slot.dtype for slot in flat.layout][:4] == ["float32", "float64", "float16", "bfloat16"]
    assert_same_state(flat.tensors(), state)


def test_packing_copies_and_pickles_as_numpy():
    state = {"w": torch.ones(4)}
    flat = flatten(state)
    state["w"].add_(1.0)  # the push is a snapshot: later updates of the EMA do not leak in
    assert torch.equal(flat.tensors()["w"], torch.ones(4))
    again = pickle.loads(pickle.dumps(flat, protocol=5))
    assert isinstance(again.buffer, np.ndarray) and again.layout == flat.layout
    assert_same_state(again.tensors(), flat.tensors())


def test_read_only_buffer_loads_without_warnings():
    """What a teacher gets from Ray's object store: a read-only view, loaded by copying."""
    model = with_batchnorm()
    flat = flatten(model.state_dict())
    flat.buffer.flags.writeable = False
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat.load_into(target)
    assert_same_state(target.state_dict(), model.state_dict())


def test_mismatched_layout_names_the_keys_and_leaves_the_model_alone():
    model = with_batchnorm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}

    cases = {
        "missing": ({k: v for k, v in state.items() if k != "1.running_var"}, "'1.running_var' missing"),
        "extra": ({**state, "2.weight": torch.ones(1)}, "'2.weight' is not in the model"),
        "shape": ({**state, "0.bias": torch.ones(5)}, "'0.bias' is float32 [5] in the weights, float32 [4]"),
        "dtype": ({**state, "1.num_batches_tracked": torch.tensor(1.0)},
                  "'1.num_batches_tracked' is float32 [] in the weights, int64 [] in the model"),
    }
    for what, (bad, message) in cases.items():
        with pytest.raises(ValueError, match="weights do not match the model") as err:
            flatten(bad).load_into(model)
        assert message in str(err.value), what
    assert_same_state(model.state_dict(), before)


def test_truncated_buffer_names_the_key():
    flat = flatten({"a": torch.ones(16), "b": torch.ones(16)})
    short = FlatWeights(flat.buffer[:ALIGN + 8], flat.layout)
    with pytest.raises(ValueError, match="'b' ends at byte 128"):
        short.tensors()


def test_unknown_dtype_is_named():
    flat = FlatWeights(np.zeros(64, np.uint8), (Slot("w", "float99", (2,), 0),))
    with pytest.raises(ValueError, match="'w': unknown dtype 'float99'"):
        flat.tensors()
