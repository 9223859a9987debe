"""Faults injected into a real local labelling run: actors die, the run completes, nothing is lost."""

from __future__ import annotations

import numpy as np
import ray
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.labeller import Labeller
from qualiteacher.services.names import scorer_name, teacher_name
from qualiteacher.services.redis_server import redis_client

from qualiteacher.config import load_config
from qualiteacher.flat_weights import flatten
from qualiteacher.models.build import build_model
from tests.waiting import wait_until as _wait_until


def _start(namespace: str, prefix: str, redis_url: str, scorers: int, n_images: int = 16, teachers: int = 1):
    cfg = load_config("configs/smoke.yaml", [f"ray.namespace={namespace}", f"redis.prefix={prefix}",
                                              "drop.enabled=false", f"labelling.teachers={teachers}",
                                              f"labelling.scorers={scorers}", "labelling.batch_size=2"])
    model = build_model(cfg.model)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8) for _ in range(n_images)]
    labeller = ray.remote(Labeller).options(num_cpus=0, max_concurrency=8, namespace=namespace,
                                           name="labeller").remote(
        cfg.model_dump(mode="json"), redis_url, [f"f{i}" for i in range(n_images)], images,
        [ray.put(flatten(model.state_dict()))], 0, 0.0)
    return cfg, model, labeller




def test_scorer_killed_mid_run(ray_cluster, weights_dir, redis_url):
    _, _, labeller = _start("fault-scorer", "fscorer", redis_url, scorers=2)
    done = labeller.run.remote(max_rounds=4)
    _wait_until(lambda: ray.get(labeller.stats.remote())["scored"] >= 2)
    ray.kill(ray.get_actor(scorer_name(0), namespace="fault-scorer"), no_restart=True)
    stats = ray.get(done, timeout=180)
    assert stats["scorers"] == 2  # the pool was restored to its size
    assert stats["scorers_replaced"] == 1 and stats["teacher_failures"] == 0
    # One teacher version: every image labelled once, and scored once (its batch retried on
    # another scorer when its own died); nothing failed.
    assert stats["labelled"] == 16 and stats["scored"] == 16 and stats["failed"] == 0
    bank = MemoryBank(redis_client(redis_url), "fscorer", 3)
    assert bank.num_images() == 16 and bank.check_invariants() == []
    ray.kill(labeller)


def test_teacher_killed_comes_back_with_latest_weights(ray_cluster, weights_dir, redis_url):
    _, model, labeller = _start("fault-teacher", "fteacher", redis_url, scorers=1)
    state = {k: v + 0.0 for k, v in model.state_dict().items()}
    assert ray.get(labeller.push_weights.remote([ray.put(flatten(state))], 5)) == 5
    done = labeller.run.remote(max_rounds=4)
    _wait_until(lambda: ray.get(labeller.stats.remote())["scored"] >= 2)
    teacher = ray.get_actor(teacher_name(0), namespace="fault-teacher")
    ray.kill(teacher, no_restart=False)  # Ray restarts it, without weights
    stats = ray.get(done, timeout=180)
    assert stats["retries"] >= 1 and stats["teacher_failures"] >= 1 and stats["scorers_replaced"] == 0
    assert ray.get(labeller.teacher_versions.remote()) == [5]
    assert stats["labelled"] == 16 and stats["scored"] == 16  # the failed batch labelled again
    bank = MemoryBank(redis_client(redis_url), "fteacher", 3)
    # Every label that reached the bank came from the newest weights, none from an empty teacher.
    assert {e.teacher_version for i in range(16) for e in bank.entries(f"f{i}")} == {5}
    assert bank.check_invariants() == []
    ray.kill(labeller)


def test_a_push_is_not_failed_by_a_dead_teacher(ray_cluster, weights_dir, redis_url):
    """The student waits for its push: a teacher lost with its node must not fail it (Ray
    Train would restart the student); the living teachers take the new version."""
    _, model, labeller = _start("fault-push", "fpush", redis_url, scorers=1, teachers=2)
    ray.get(labeller.stats.remote())  # constructed: its teachers exist
    ray.kill(ray.get_actor(teacher_name(0), namespace="fault-push"), no_restart=True)
    state = {k: v + 0.0 for k, v in model.state_dict().items()}
    assert ray.get(labeller.push_weights.remote([ray.put(flatten(state))], 3)) == 3
    assert ray.get(ray.get_actor(teacher_name(1), namespace="fault-push").get_version.remote()) == 3
    ray.kill(labeller)


@ray.remote(num_cpus=0)
class _WeightsOwner:
    """Puts the weights as the student's worker does, so that they are lost when it dies."""

    def put(self, weights) -> list:
        return [ray.put(weights)]


def test_teacher_restarted_after_the_newest_weights_were_lost_copies_a_peer(ray_cluster, weights_dir, redis_url):
    """The student's worker owns the newest weights; when it is gone (restarted, its node lost)
    a teacher that restarts gets them from a living teacher, not from the lost object."""
    _, model, labeller = _start("fault-owner", "fowner", redis_url, scorers=1, teachers=2)
    owner = _WeightsOwner.remote()
    pushed = ray.get(owner.put.remote(flatten({k: v + 0.0 for k, v in model.state_dict().items()})))
    assert ray.get(labeller.push_weights.remote(pushed, 5)) == 5
    ray.kill(owner)  # the version-5 weights are lost; both teachers hold them
    done = labeller.run.remote(max_rounds=4)
    _wait_until(lambda: ray.get(labeller.stats.remote())["scored"] >= 2)
    ray.kill(ray.get_actor(teacher_name(0), namespace="fault-owner"), no_restart=False)
    stats = ray.get(done, timeout=180)
    assert stats["teacher_failures"] >= 1 and stats["failed"] == 0
    assert ray.get(labeller.teacher_versions.remote()) == [5, 5]
    bank = MemoryBank(redis_client(redis_url), "fowner", 3)
    assert {e.teacher_version for i in range(16) for e in bank.entries(f"f{i}")} == {5}
    assert bank.num_images() == 16 and bank.check_invariants() == []
    ray.kill(labeller)


def test_scale_command_reaches_running_job(ray_cluster, weights_dir, redis_url):
    from qualiteacher.pipelines.cli import main

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
    from qualiteacher.services.placement import on_driver_node

    strategy = on_driver_node()
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
