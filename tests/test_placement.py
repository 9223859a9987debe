"""Config `Resources` -> the options every actor of the job is started with (no cluster needed;
the multi-node placement itself is tests/test_cluster.py, `make test-cluster`)."""

from __future__ import annotations

from qualiteacher.services.placement import actor_options, train_worker_resources, unplaceable_roles

from qualiteacher.config import load_config

PLACED = ["labelling.teacher_resources={num_cpus: 1, num_gpus: 0.5, resources: {qt_teacher: 1}}",
          "labelling.scorer_resources={resources: {qt_scorer: 0.5}}",
          "train.worker_resources={num_cpus: 2, resources: {qt_student: 1, fast_disk: 1}}"]


def test_custom_resources_reach_actor_options():
    cfg = load_config("configs/smoke.yaml", PLACED)
    assert actor_options(cfg.labelling.teacher_resources, gpus_available=True) == {
        "num_cpus": 1.0, "num_gpus": 0.5, "resources": {"qt_teacher": 1.0}}
    # No GPU in the cluster: the GPU request is dropped, the placement is kept.
    assert actor_options(cfg.labelling.teacher_resources, gpus_available=False)["resources"] == {"qt_teacher": 1.0}
    assert actor_options(cfg.labelling.scorer_resources, gpus_available=False) == {
        "num_cpus": 0.5, "num_gpus": 0, "resources": {"qt_scorer": 0.5}}


def test_custom_resources_reach_ray_train_workers():
    res = load_config("configs/smoke.yaml", PLACED).train.worker_resources
    assert train_worker_resources(res, use_gpu=False) == {"CPU": 2.0, "qt_student": 1.0, "fast_disk": 1.0}
    assert train_worker_resources(res, use_gpu=True)["GPU"] == 1.0


def test_default_config_asks_for_no_custom_resource():
    cfg = load_config("configs/smoke.yaml")
    assert actor_options(cfg.labelling.scorer_resources, gpus_available=False)["resources"] == {}
    assert unplaceable_roles(cfg, {"CPU": 4.0}) == {}


def test_roles_whose_resources_no_node_has_are_named():
    cfg = load_config("configs/smoke.yaml", PLACED)
    assert unplaceable_roles(cfg, {"CPU": 4.0, "qt_teacher": 1.0, "fast_disk": 2.0}) == {
        "labelling.scorer_resources": ["qt_scorer"], "train.worker_resources": ["qt_student"]}
