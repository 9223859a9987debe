"""Faults injected into a real local labelling run: actors die, the run completes, nothing is lost."""

from __future__ import annotations


import numpy as np
import ray

from qualiteacher.config import load_config
from qualiteacher.models.build import build_model
from services.bank.store import MemoryBank
from services.labeller import Labeller
from services.names import scorer_name, teacher_name
from services.redis_server import redis_client
from tests.waiting import wait_until as _wait_until


def _start(namespace: str, prefix: str, redis_url: str, scorers: int, n_images: int = 16):
    cfg = load_config("configs/smoke.yaml", [f"ray.namespace={namespace}", f"redis.prefix={prefix}",
                                              "drop.enabled=false", "labelling.teachers=1",
                                              f"labelling.scorers={scorers}", "labelling.batch_size=2"])
    model = build_model(cfg.model)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8) for _ in range(n_images)]
    labeller = ray.remote(Labeller).options(num_cpus=0, max_concurrency=8, namespace=namespace,
                                           name="labeller").remote(
        cfg.model_dump(mode="json"), redis_url, [f"f{i}" for i in range(n_images)], images,
        [ray.put(model.state_dict())], 0, 0.0)
    return cfg, model, labeller




def test_scorer_killed_mid_run(ray_cluster, weights_dir, redis_url):
    _, _, labeller = _start("fault-scorer", "fscorer", redis_url, scorers=2)
    done = labeller.run.remote(max_rounds=4)
    _wait_until(lambda: ray.get(labeller.stats.remote())["scored"] >= 2)
    ray.kill(ray.get_actor(scorer_name(0), namespace="fault-scorer"), no_restart=True)
    stats = ray.get(done, timeout=180)
    assert stats["scorers"] == 2  # the pool was restored to its size
    # One teacher version: every image labelled once, and scored once (its batch retried on
    # another scorer when its own died); nothing failed.
    assert stats["labelled"] == 16 and stats["scored"] == 16 and stats["failed"] == 0
    bank = MemoryBank(redis_client(redis_url), "fscorer", 3)
    assert bank.num_images() == 16 and bank.check_invariants() == []
    ray.kill(labeller)


def test_teacher_killed_comes_back_with_latest_weights(ray_cluster, weights_dir, redis_url):
    _, model, labeller = _start("fault-teacher", "fteacher", redis_url, scorers=1)
    state = {k: v + 0.0 for k, v in model.state_dict().items()}
    assert ray.get(labeller.push_weights.remote([ray.put(state)], 5)) == 5
    done = labeller.run.remote(max_rounds=4)
    _wait_until(lambda: ray.get(labeller.stats.remote())["scored"] >= 2)
    teacher = ray.get_actor(teacher_name(0), namespace="fault-teacher")
    ray.kill(teacher, no_restart=False)  # Ray restarts it, without weights
    stats = ray.get(done, timeout=180)
    assert stats["retries"] >= 1
    assert ray.get(labeller.teacher_versions.remote()) == [5]
    assert stats["labelled"] == 16 and stats["scored"] == 16  # the failed batch labelled again
    bank = MemoryBank(redis_client(redis_url), "fteacher", 3)
    # Every label that reached the bank came from the newest weights, none from an empty teacher.
    assert {e.teacher_version for i in range(16) for e in bank.entries(f"f{i}")} == {5}
    assert bank.check_invariants() == []
    ray.kill(labeller)


def test_scale_command_reaches_running_job(ray_cluster, weights_dir, redis_url):
    from qualiteacher.cli import main

    _, _, labeller = _start("scale-cli", "scalecli", redis_url, scorers=1)
    assert ray.get(labeller.scorer_count.remote()) == 1
    assert main(["scale", "scorers", "2", "--namespace", "scale-cli"]) == 0
    done = labeller.run.remote(max_rounds=1)
    assert ray.get(done, timeout=120)["scorers"] == 2
    assert main(["scale", "scorers", "1", "--namespace", "no-such-job"]) == 2
    ray.kill(labeller)


def test_labeller_is_placed_on_the_driver_node(ray_cluster):
    """The job's labeller is not restarted: it goes on the driver's node (the head under `ray job submit`),
    never on a worker whose loss the job must survive (deploy/compose_check.sh kills one mid-run)."""
    from pipelines.train import labeller_placement

    strategy = labeller_placement()
    here = ray.get_runtime_context().get_node_id()
    assert strategy.node_id == here and strategy.soft is False

    @ray.remote(num_cpus=0)
    class Where:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    actor = Where.options(scheduling_strategy=strategy).remote()
    try:
        assert ray.get(actor.node.remote(), timeout=60) == here
    finally:
        ray.kill(actor)
