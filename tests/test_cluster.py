"""The training job on a three-node Ray cluster on this machine (tests/local_cluster.py):
`ray job submit` places each role by the custom resources its config names, and the job
survives losing a node mid-run: the scorers' and student's node, or the teachers' node,
each replaced by a node that joins after the loss.

Marked `cluster`, so out of the default run: `make test-cluster` runs them in a pytest
session of their own. They start their own Ray nodes (own temp dirs and ports) and never
touch the session cluster of tests/ray_fixtures.py, which they do not request; run them
apart all the same, since both would share two CPU cores. The tests share one cluster and
run in file order (each loss test leaves its replacement node in place). About 5.5 minutes
on 2 busy cores: nodes 15 s, placement 50 s, each loss 130 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.redis_server import redis_client

from qualiteacher.checkpoint import load_training_state
from tests.local_cluster import LocalCluster
from tests.redis_fixtures import unique_prefix

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
# The head runs the driver, the labeller and Ray Train's controller; the roles go where
# their resources are. Losing `workers` loses the scorers and the student together.
TEACHERS = {"qt_teacher": 2}
WORKERS = {"qt_scorer": 2, "qt_student": 1}
PLACED = ["labelling.teacher_resources={num_cpus: 0.5, resources: {qt_teacher: 1}}",
          "labelling.scorer_resources={num_cpus: 0.5, resources: {qt_scorer: 1}}",
          "train.worker_resources={num_cpus: 1, resources: {qt_student: 1}}"]
JOB_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def cluster(weights_dir):
    # Ray Train's controller polls its workers every 2 s by default: a lost student is seen sooner.
    nodes = LocalCluster({"QUALITEACHER_WEIGHTS": str(weights_dir), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"})
    try:
        nodes.start_head(num_cpus=1)
        nodes.add_node("teachers", num_cpus=1, resources=TEACHERS)
        nodes.add_node("workers", num_cpus=2, resources=WORKERS)
        yield nodes
    finally:
        nodes.shutdown()


def submit(cluster: LocalCluster, run_dir: Path, redis_url: str, prefix: str, *overrides: str) -> subprocess.Popen:
    """`ray job submit` of the smoke config with the roles placed; its output in run_dir.log."""
    sets = [f"redis.url={redis_url}", f"redis.prefix={prefix}", f"ray.namespace={prefix}", *PLACED, *overrides]
    cmd = ["ray", "job", "submit", "--address", cluster.dashboard, "--runtime-env", "deploy/runtime_env.yaml",
           "--working-dir", ".", "--", "python", "-m", "qualiteacher.pipelines.train", "--config", "configs/smoke.yaml",
           "--run-dir", str(run_dir), *[arg for s in sets for arg in ("--set", s)]]
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def finish(job: subprocess.Popen, run_dir: Path) -> dict:
    """Wait for the job; its summary.json once it succeeded."""
    try:
        job.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.kill()
    output = Path(f"{run_dir}.log").read_text()
    assert job.returncode == 0 and "succeeded" in output, f"the job failed:\n{output[-6000:]}"
    return json.loads((run_dir / "summary.json").read_text())


def actors_by_class(cluster: LocalCluster, namespace: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for actor in cluster.list_actors():
        if actor["ray_namespace"] == namespace:
            out.setdefault(actor["class_name"], []).append(actor)
    return out


def asked_for(actor, resource: str) -> bool:
    """Ray Train's workers ask through a placement group: `qt_student_group_<id>`."""
    return any(name == resource or name.startswith(f"{resource}_group_") for name in actor["required_resources"])


# ---------------------------------------------------------------------------- placement
def test_each_role_runs_on_the_nodes_its_resources_name(cluster, redis_url, tmp_path):
    ids = {name: cluster.alive_id(name) for name in ("head", "teachers", "workers")}
    prefix = unique_prefix()
    summary = finish(submit(cluster, tmp_path / "run", redis_url, prefix), tmp_path / "run")
    assert summary["steps"] == 8

    actors = actors_by_class(cluster, prefix)
    roles = {"TeacherWorker": ("qt_teacher", "teachers", 2), "ScorerWorker": ("qt_scorer", "workers", 1),
             "RayTrainWorker": ("qt_student", "workers", 1)}
    for cls, (resource, node, count) in roles.items():
        assert len(actors.get(cls, [])) == count, (cls, actors.keys())
        for actor in actors[cls]:
            assert asked_for(actor, resource), (cls, actor["required_resources"])
            assert actor["node_id"] == ids[node], f"{cls} ran on {actor['node_id']}, not on {node} {ids[node]}"
    # The run's state stays with the driver, on the head.
    for cls in ("Labeller", "TrainController"):
        assert [a["node_id"] for a in actors[cls]] == [ids["head"]], cls
    assert summary["faults"] == {"nodes_lost": [], "nodes_joined": [], "teacher_failures": 0,
                                 "scorers_replaced": 0, "student_restarts": 0}


# ---------------------------------------------------------------------------- node loss
def bank_snapshot(bank: MemoryBank) -> dict[str, list[tuple[float, str]]]:
    """image -> its entries as (score, label id), best first."""
    return {image: [(e.ensemble, e.label_id) for e in bank.entries(image)]
            for image, _, _ in bank.list_images(0, 100_000)}


def lost_entries(before: dict, after: dict, top_k: int) -> list[str]:
    """Entries of `before` missing from `after` that the gate could not have evicted: an entry
    leaves only when top_k better ones (score desc, label id asc) are in its place."""
    lost = []
    for image, entries in before.items():
        kept = after.get(image, [])
        for score, label in entries:
            if (score, label) in kept:
                continue
            better = [e for e in kept if (-e[0], e[1]) < (-score, label)]
            if len(better) < top_k:
                lost.append(f"{image}/{label}")
    return lost


def checkpoints(run_dir: Path) -> dict[str, int]:
    """Complete checkpoints, oldest first: folder name -> step."""
    root = run_dir / "ray_train" / "student"
    found = sorted((p for p in root.glob("checkpoint_*") if (p / "state.pt").exists()), key=lambda p: p.stat().st_mtime)
    return {p.name: int(load_training_state(p)["step"]) for p in found}


def wait_for(predicate, what: str, job: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert job.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s"
        time.sleep(0.1)


def assert_bank_kept(bank: MemoryBank, redis_url: str, before: dict, stats_before: dict) -> None:
    """`qualiteacher bank check` passes, every entry there at the loss is still there or was
    evicted by better ones, and the counters only grew."""
    check = subprocess.run([sys.executable, "-m", "qualiteacher.pipelines.cli", "bank", "check", "--redis", redis_url,
                            "--prefix", bank.prefix], cwd=REPO, capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr
    assert lost_entries(before, bank_snapshot(bank), top_k=bank.top_k) == []
    stats = bank.stats()
    assert stats["images"] >= stats_before["images"] and stats["entries"] >= stats_before["entries"]
    assert all(stats["counters"][k] >= n for k, n in stats_before["counters"].items())


def test_a_node_lost_mid_run_is_replaced_and_nothing_is_lost(cluster, redis_url, tmp_path):
    run_dir, prefix = tmp_path / "run", unique_prefix()
    bank = MemoryBank(redis_client(redis_url), prefix, 3)
    lost_id = cluster.alive_id("workers")
    job = submit(cluster, run_dir, redis_url, prefix, "train.steps=60", "train.checkpoint_every=4")
    # Mid-run: the bank has entries, and Ray Train registered a checkpoint (only then does a
    # restarted student get one back).
    snapshot_file = run_dir / "ray_train" / "student" / "checkpoint_manager_snapshot.json"
    wait_for(lambda: snapshot_file.exists() and bank.num_images() > 0, "a checkpoint and bank entries", job)
    cluster.kill("workers")  # the scorer and the student with it
    before, ckpts_before, stats_before = bank_snapshot(bank), checkpoints(run_dir), bank.stats()
    assert job.poll() is None and not (run_dir / "summary.json").exists(), "the job ended before the loss"

    # The student waits for a node with `qt_student`, the new scorer for one with `qt_scorer`.
    cluster.wait_dead(lost_id)
    cluster.add_node("workers-2", num_cpus=2, resources=WORKERS)
    new_id = cluster.alive_id("workers-2")
    summary = finish(job, run_dir)

    assert summary["steps"] == 60 and summary["teacher_version"] == 30
    faults = summary["faults"]
    assert [n["node_id"] for n in faults["nodes_lost"]] == [lost_id]
    assert faults["nodes_lost"][0]["resources"] == WORKERS
    assert [n["node_id"] for n in faults["nodes_joined"]] == [new_id]
    assert faults["student_restarts"] == 1 and summary["student_resumes"] == 1  # from its checkpoint
    assert faults["scorers_replaced"] >= 1 and summary["labelling"]["failed"] == 0
    actors = actors_by_class(cluster, prefix)
    for cls in ("ScorerWorker", "RayTrainWorker"):  # each ran on the lost node, then on the new one
        # (a scorer started in the seconds before the GCS knew of the loss went to the dead
        # node and never ran: it has no node id)
        assert {a["node_id"] for a in actors[cls]} - {None} == {lost_id, new_id}, cls

    assert_bank_kept(bank, redis_url, before, stats_before)
    # Labelling went on: only a scorer on the new node can have gated since the loss.
    assert bank.stats()["counters"]["gate_calls"] > stats_before["counters"]["gate_calls"]
    # Checkpoints: none lost, steps never go back, the last is the final step.
    ckpts = checkpoints(run_dir)
    assert ckpts_before and ckpts_before.items() <= ckpts.items()
    steps = list(ckpts.values())
    assert steps == sorted(steps) and steps[-1] == 60
    assert Path(summary["checkpoint"]).name == list(ckpts)[-1]


def test_the_teachers_node_lost_mid_run_comes_back_on_a_new_node(cluster, redis_url, tmp_path):
    """Teachers are restarted by Ray on the node that joins; the student, elsewhere, trains on
    and is not restarted for them (its weight pushes reach the teachers that are there)."""
    run_dir, prefix = tmp_path / "run", unique_prefix()
    bank = MemoryBank(redis_client(redis_url), prefix, 3)
    lost_id = cluster.alive_id("teachers")
    job = submit(cluster, run_dir, redis_url, prefix, "train.steps=200", "train.checkpoint_every=20")
    wait_for(lambda: bank.num_images() > 0, "bank entries", job)
    cluster.kill("teachers")
    before, stats_before = bank_snapshot(bank), bank.stats()
    cluster.wait_dead(lost_id)
    cluster.add_node("teachers-2", num_cpus=1, resources=TEACHERS)
    new_id = cluster.alive_id("teachers-2")

    def teachers_back() -> bool:
        teachers = actors_by_class(cluster, prefix).get("TeacherWorker", [])
        return len(teachers) == 2 and all(a["state"] == "ALIVE" and a["node_id"] == new_id for a in teachers)

    wait_for(teachers_back, "both teachers restarted on the new node", job)
    summary = finish(job, run_dir)

    assert summary["steps"] == 200 and summary["teacher_version"] == 100
    faults = summary["faults"]
    assert [n["node_id"] for n in faults["nodes_lost"]] == [lost_id]
    assert [n["node_id"] for n in faults["nodes_joined"]] == [new_id]
    # faults["teacher_failures"] counts label calls that died with a teacher: 0 when the node
    # went down while no call was in flight (the labeller waits for the next push), so the
    # teachers' restarts are read from Ray's actor table below instead.
    assert faults["scorers_replaced"] == 0
    assert faults["student_restarts"] == 0 and summary["labelling"]["failed"] == 0
    # Every teacher came back with the newest weights the student pushed.
    assert summary["teacher_versions"] == [100, 100]
    assert all(a["num_restarts"] >= 1 for a in actors_by_class(cluster, prefix)["TeacherWorker"])
    assert_bank_kept(bank, redis_url, before, stats_before)
