"""Weight pushes into a real teacher actor: flat weights through Ray's object store, stale
versions ignored, a push that does not fit the model refused with the key named."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from qualiteacher.services.teacher import TeacherWorker

from qualiteacher.config import load_config
from qualiteacher.flat_weights import flatten
from qualiteacher.models.build import build_model


def _state(model_cfg, seed: int) -> dict:
    torch.manual_seed(seed)
    return build_model(model_cfg).state_dict()


def test_teacher_actor_takes_flat_pushes_and_ignores_stale_ones(ray_cluster):
    model_cfg = load_config("configs/quickstart.yaml").model
    cfg_json = model_cfg.model_dump(mode="json")
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    a, b = _state(model_cfg, 0), _state(model_cfg, 1)
    # What each set of weights labels, from teachers built here (no Ray).
    want_a = TeacherWorker(cfg_json, flatten(a), 0).label(images)[0]
    want_b = TeacherWorker(cfg_json, flatten(b), 0).label(images)[0]
    assert not np.array_equal(want_a, want_b)

    teacher = ray.remote(TeacherWorker).options(num_cpus=0.1).remote(cfg_json, None, -1)
    ref_a, ref_b = ray.put(flatten(a)), ray.put(flatten(b))
    # The premise of the format: Ray hands the buffer back as a read-only view of its
    # shared-memory store (no copy), not a deserialised one.
    assert not ray.get(ref_a).buffer.flags.writeable
    assert ray.get(teacher.set_weights.remote(ref_a, 2)) == 2
    assert ray.get(teacher.set_weights.remote(ref_b, 1)) == 2  # older: ignored
    assert ray.get(teacher.set_weights.remote(ref_b, 2)) == 2  # the same version again: ignored
    pls, _, version = ray.get(teacher.label.remote(images))
    assert version == 2 and np.array_equal(pls, want_a)

    assert ray.get(teacher.set_weights.remote(ref_b, 3)) == 3
    pls, _, version = ray.get(teacher.label.remote(images))
    assert version == 3 and np.array_equal(pls, want_b)
    ray.kill(teacher)


def test_teacher_refuses_weights_that_do_not_fit(ray_cluster):
    model_cfg = load_config("configs/quickstart.yaml").model
    teacher = ray.remote(TeacherWorker).options(num_cpus=0.1).remote(model_cfg.model_dump(mode="json"), None, -1)
    ray.get(teacher.set_weights.remote(ray.put(flatten(_state(model_cfg, 0))), 1))
    wider = _state(model_cfg.model_copy(update={"width": 8}), 0)
    with pytest.raises(ray.exceptions.RayTaskError, match=r"weights do not match the model: '\S+' is float32"):
        ray.get(teacher.set_weights.remote(ray.put(flatten(wider)), 2))
    with pytest.raises(ray.exceptions.RayTaskError, match="set_weights takes FlatWeights"):
        ray.get(teacher.set_weights.remote(_state(model_cfg, 0), 3))  # a plain state dict
    assert ray.get(teacher.get_version.remote()) == 1  # still the last weights that fit
    ray.kill(teacher)
