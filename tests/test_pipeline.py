"""The distributed pipeline on a real local Ray cluster and real Redis servers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray
from qualiteacher.services.bank.codec import decode_image
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.redis_server import redis_client

from qualiteacher.config import load_config
from qualiteacher.flat_weights import flatten
from tests.waiting import wait_until as _wait_until


def _cfg(namespace: str, *overrides: str):
    return load_config("configs/smoke.yaml", [f"ray.namespace={namespace}", *overrides])


@pytest.fixture(scope="module")
def smoke_run(ray_cluster, weights_dir, tmp_path_factory):
    from qualiteacher.pipelines.train import run

    run_dir = tmp_path_factory.mktemp("smoke")
    summary = run(_cfg("smoke-a", *PROBES), run_dir)
    return run_dir, summary


PROBES = ("train.probe_every_pushes=2", "train.probe_images=2")  # probes after steps 4 and 8


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_smoke_run_fills_bank_and_advances_teachers(smoke_run):
    run_dir, summary = smoke_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for key in ("steps", "teacher_version", "bank_images", "bank_entries", "max_entries_per_image",
                "dropped", "checkpoint", "elapsed_s"):
        assert key in on_disk, key
    assert summary["steps"] == 8
    assert summary["teacher_version"] == 4  # push every 2 steps
    # Every teacher actor holds the newest version.
    assert summary["teacher_versions"] == [4, 4]
    assert summary["bank_images"] > 0 and 0 < summary["max_entries_per_image"] <= 3
    assert summary["bank_entries"] <= 3 * summary["bank_images"]
    assert (run_dir / "pretrain.pt").exists()
    assert (run_dir / "ray_train" / "student").is_dir()
    assert summary["checkpoint"] and (json.loads((run_dir / "summary.json").read_text())["checkpoint"])
    # Nothing went wrong, and the summary says so.
    assert on_disk["faults"] == {"nodes_lost": [], "nodes_joined": [], "teacher_failures": 0,
                                 "scorers_replaced": 0, "student_restarts": 0}


def test_smoke_bank_is_ordered_and_consistent(smoke_run):
    from qualiteacher.services.redis_server import EmbeddedRedis

    run_dir, summary = smoke_run
    with EmbeddedRedis(run_dir / "redis") as server:  # reopen the run's AOF
        bank = MemoryBank(redis_client(server.url), "qt", 3)
        assert bank.check_invariants() == []
        for image_id, _, count in bank.list_images(0, 1000):
            entries = bank.entries(image_id)
            assert len(entries) == count <= 3
            scores = [e.ensemble for e in entries]
            assert scores == sorted(scores, reverse=True)
            assert all(0 <= e.teacher_version <= summary["teacher_version"] for e in entries)
            assert all(e.weights.rows == 2 and e.weights.cols == 2 for e in entries)
        assert bank.num_images() == summary["bank_images"]


def test_smoke_run_offers_few_duplicates(smoke_run):
    """Each image is labelled once per teacher version, so hardly any candidate the gate sees
    is one it has seen before (only a retried batch may be)."""
    _, summary = smoke_run
    counters = summary["bank_stats"]["counters"]
    assert counters["candidates"] > 0
    assert counters["duplicates"] <= 0.05 * counters["candidates"], counters


def test_smoke_run_training_log(smoke_run):
    """TensorBoard's own reader finds every scalar and the probe images of the real run; the
    Redis stream holds the same numbers, and the monitor's training endpoint serves them."""
    from fastapi.testclient import TestClient
    from qualiteacher.services.monitor import create_app
    from qualiteacher.services.redis_server import EmbeddedRedis
    from qualiteacher.services.training_stream import TrainingStream

    from qualiteacher.imageio import decode_png

    run_dir, summary = smoke_run
    acc = _events(run_dir / "tensorboard")
    tags = acc.Tags()
    losses = acc.Scalars("loss/total")
    assert [e.step for e in losses] == list(range(1, 9))
    assert [e.value for e in acc.Scalars("train/teacher_version")] == [s // 2 for s in range(1, 9)]
    assert {"loss/supervised", "loss/pixel", "loss/pref_rank", "loss/consistency", "reward/q_high", "reward/q_low",
            "train/lr", "train/steps_per_s", "bank/images", "bank/entries", "bank/drop_rate/total",
            "bank/labelled_sets_per_s"} <= set(tags["scalars"])
    assert acc.Scalars("train/lr")[0].value == pytest.approx(2e-4)
    assert "bank/score_histogram" in tags["histograms"]
    assert 0 < sum(acc.Histograms("bank/score_histogram")[-1].histogram_value.bucket) <= summary["bank_entries"]
    assert set(tags["images"]) == {"probe/input", "probe/score_3", "probe/score_5", "probe/score_7"}
    assert [e.step for e in acc.Images("probe/score_7")] == [4, 8]
    tb_probe = acc.Images("probe/score_7")[-1]

    with EmbeddedRedis(run_dir / "redis") as server, TestClient(create_app(server.url)) as api:
        stream = TrainingStream(redis_client(server.url), "qt")
        points = stream.points(1000)
        assert [p["step"] for p in points] == list(range(1, 9))
        for point, event in zip(points, losses):
            assert point["scalars"]["loss/total"] == pytest.approx(event.value)
        body = api.get("/api/training").json()
        assert body["points"] == points and set(body["tags"]) == set(points[-1]["scalars"])
        assert body["probe"]["step"] == 8 and body["probe"]["teacher_version"] == 4
        assert [i["name"] for i in body["probe"]["items"]] == ["input", "3", "5", "7"]
        png = api.get(body["probe"]["items"][-1]["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        # The strip the monitor shows is the grid TensorBoard stored, pixel for pixel.
        np.testing.assert_array_equal(decode_png(png.content), decode_png(tb_probe.encoded_image_string))


def test_resume_continues_steps_and_versions(smoke_run):
    from qualiteacher.pipelines.train import run

    run_dir, first = smoke_run
    summary = run(_cfg("smoke-b", "train.steps=12"), run_dir)
    assert summary["steps"] == 12
    assert summary["teacher_version"] == 6  # continued from 4, not restarted
    assert summary["bank_images"] >= first["bank_images"]  # the bank in Redis was reused
    assert summary["checkpoint"] != first["checkpoint"]
    assert summary["student_resumes"] == 1
    assert summary["faults"]["student_restarts"] == 0  # a resumed job, not a restart
    # The training log goes on where it stopped: steps 1-12 once each, in TensorBoard and Redis.
    assert [e.step for e in _events(run_dir / "tensorboard").Scalars("loss/total")] == list(range(1, 13))
    from qualiteacher.services.redis_server import EmbeddedRedis
    from qualiteacher.services.training_stream import TrainingStream

    with EmbeddedRedis(run_dir / "redis") as server:
        assert [p["step"] for p in TrainingStream(redis_client(server.url), "qt").points(1000)] == list(range(1, 13))


def _fake_sets(n_images: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = [f"img{i}" for i in range(n_images)]
    base = rng.integers(0, 256, size=(n_images, 1, 96, 96, 3), dtype=np.uint8)
    smooth = (np.linspace(0, 255, 96)[None, None, :, None, None] * np.ones((1, 1, 1, 96, 3))).astype(np.uint8)
    pls = np.concatenate([(0.5 * base + 0.5 * smooth).astype(np.uint8)] * 3, axis=1)
    return ids, pls


def test_concurrent_scorers_match_serial_gating(ray_cluster, weights_dir, redis_url):
    from qualiteacher.services.scorer import ScorerWorker

    cfg = _cfg("gate-test", "drop.enabled=false").model_dump(mode="json")
    batches = [_fake_sets(4, seed) for seed in range(6)]
    # The same image ids appear in every batch: concurrent scorers gate into the same images.
    serial_cfg = dict(cfg, redis={"url": None, "prefix": "serial"})
    conc_cfg = dict(cfg, redis={"url": None, "prefix": "concurrent"})
    serial = ScorerWorker(serial_cfg, redis_url)
    for version, (ids, pls) in enumerate(batches):
        serial.process(ids, pls, np.ones(len(ids), bool), version)
    actors = [ray.remote(ScorerWorker).options(num_cpus=0.5).remote(conc_cfg, redis_url) for _ in range(3)]
    refs = [actors[v % 3].process.remote(ids, pls, np.ones(len(ids), bool), v)
            for v, (ids, pls) in enumerate(batches)]
    ray.get(refs)
    client = redis_client(redis_url)
    a, b = MemoryBank(client, "serial", 3), MemoryBank(client, "concurrent", 3)
    for image_id in (f"img{i}" for i in range(4)):
        assert a.labels(image_id) == b.labels(image_id) and len(a.labels(image_id)) == 3
    assert a.check_invariants() == [] and b.check_invariants() == []
    for actor in actors:
        ray.kill(actor)


def _ladder_sets(rng):
    """Two images' inputs and label sets of three distinct levels."""
    inputs = rng.integers(0, 256, size=(2, 96, 96, 3), dtype=np.uint8)
    smooth = np.linspace(0, 255, 96)[None, :, None] * np.ones((96, 1, 3))
    pls = np.stack([np.stack([(w * img + (1 - w) * smooth).astype(np.uint8) for w in (0.2, 0.5, 0.8)])
                    for img in inputs])
    return inputs, pls


def test_scorer_gives_the_best_labels_rungs_levels_by_construction(weights_dir, redis_url):
    """The default `labelling.ladder_levels: constructed`: the best label of each kept set
    carries rungs at a x its capped level (the input at 0, every rung below its label), with
    no input needed in Redis; the other labels carry none."""
    from qualiteacher.services.scorer import ScorerWorker

    cfg = _cfg("ladder-built", "drop.enabled=false", "redis.prefix=ladderc", "labelling.ladder=[0.0, 0.5]")
    assert cfg.labelling.ladder_levels == "constructed"
    ids = ["ladc0", "ladc1"]
    _, pls = _ladder_sets(np.random.default_rng(5))
    ScorerWorker(cfg.model_dump(mode="json"), redis_url).process(ids, pls, np.ones(2, bool), 0)
    bank = MemoryBank(redis_client(redis_url), "ladderc", 3)
    for image_id in ids:
        entries = bank.entries(image_id)
        assert [list(e.ladder_alphas) for e in entries] == [[0.0, 0.5], [], []]  # best first
        best = entries[0]
        assert list(best.ladder_levels) == pytest.approx([0.0, 0.5 * min(best.ensemble, 7.0)], abs=1e-6)
        assert max(best.ladder_levels) < min(best.ensemble, 7.0)


def test_scorer_stores_the_condition_ladder_of_each_sets_best_label(weights_dir, redis_url):
    """With `labelling.ladder` and `ladder_levels: scored`, the best label of each kept set
    carries its rungs' levels: the ensemble score of a * label + (1 - a) * input, the input
    read from Redis; a=0 is the input itself. The other labels carry none."""
    import torch
    from qualiteacher.services.bank.inputs import InputStore
    from qualiteacher.services.scorer import ScorerWorker

    from qualiteacher.iqa.ensemble import IQAEnsemble

    cfg = _cfg("ladder-test", "drop.enabled=false", "redis.prefix=ladder", "labelling.ladder=[0.0, 0.5]",
               "labelling.ladder_levels=scored")
    ids = ["lad0", "lad1"]
    inputs, pls = _ladder_sets(np.random.default_rng(5))
    client = redis_client(redis_url)
    InputStore(client, "ladder").put_many(dict(zip(ids, inputs)))
    ScorerWorker(cfg.model_dump(mode="json"), redis_url).process(ids, pls, np.ones(2, bool), 0)
    ensemble = IQAEnsemble.from_config(cfg)
    bank = MemoryBank(client, "ladder", 3)
    for i, image_id in enumerate(ids):
        entries = bank.entries(image_id)
        assert [list(e.ladder_alphas) for e in entries] == [[0.0, 0.5], [], []]  # best first
        best = entries[0]
        x = torch.from_numpy(inputs[i]).permute(2, 0, 1)[None].float() / 255
        label = torch.from_numpy(decode_image(best.image)).permute(2, 0, 1)[None].float() / 255
        expected = ensemble.score(torch.cat([x, 0.5 * label + 0.5 * x])).ensemble10.clamp(max=7.0)
        assert list(best.ladder_levels) == pytest.approx(expected.tolist(), abs=1e-4)


def test_scorer_stores_the_core_judges_verdict(weights_dir, redis_url):
    """The scorer decides nothing itself: the entries it stores carry, field by field, the
    verdict of `qualiteacher.method.judge` on the same decoded labels (level, scores, block
    weights, q_min, the best label's ladder), and the sets the core drops are not stored."""
    import torch
    from qualiteacher.services.bank.inputs import InputStore
    from qualiteacher.services.scorer import ScorerWorker

    from qualiteacher.iqa.ensemble import IQAEnsemble
    from qualiteacher.method.judge import judge, ladder_levels, scored_rungs

    cfg = _cfg("judge-test", "redis.prefix=judge", "labelling.ladder=[0.0, 0.5]", "labelling.ladder_levels=scored",
               "drop.tau_multi=1", "drop.tau_aug=1")
    ids, pls = _fake_sets(3, seed=7)
    pls[:, 1] = np.clip(pls[:, 1].astype(int) + 40, 0, 255)  # three labels of distinct levels
    pls[:, 2] = pls[:, 2] // 2
    finite = np.array([True, False, True])  # the teacher's output for the second image had NaN
    client = redis_client(redis_url)
    inputs = np.random.default_rng(3).integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)
    InputStore(client, "judge").put_many(dict(zip(ids, inputs)))
    report = ScorerWorker(cfg.model_dump(mode="json"), redis_url).process(ids, pls, finite, 4)
    ensemble = IQAEnsemble.from_config(cfg)
    labels = torch.from_numpy(pls).permute(0, 1, 4, 2, 3).float() / 255.0
    verdict = judge(ensemble, labels, cfg, finite)
    assert verdict.kept == [0, 2] and report["dropped"] == {"non_finite": 1}
    x = torch.from_numpy(inputs[verdict.kept]).permute(0, 3, 1, 2).float() / 255.0
    ladders = ladder_levels(ensemble, x, labels[verdict.kept, verdict.best[verdict.kept]], (0.0, 0.5))
    bank = MemoryBank(client, "judge", 3)
    assert bank.entries(ids[1]) == []
    for i, ladder in zip(verdict.kept, ladders):
        entries = {e.augmentation: e for e in bank.entries(ids[i])}
        for j, aug in enumerate(cfg.labelling.augmentations):
            entry = entries[aug]
            assert entry.ensemble == float(verdict.levels[i, j]) and entry.teacher_version == 4
            assert dict(entry.raw_scores) == verdict.raw_scores(i, j)
            assert dict(entry.normalized_scores) == verdict.normalized_scores(i, j)
            assert list(entry.weights.values) == verdict.weights[i][j].flatten().tolist()
            assert entry.teacher_q_min == float(verdict.q_min[i])
            rungs = scored_rungs((0.0, 0.5), ladder) if j == verdict.best[i] else {}
            assert list(entry.ladder_alphas) == list(rungs)
            assert list(entry.ladder_levels) == [min(v, cfg.model.score_cap) for v in rungs.values()]


def test_scaling_scorers_mid_run_loses_nothing(ray_cluster, weights_dir, redis_url):
    from qualiteacher.services.labeller import Labeller

    from qualiteacher.models.build import build_model

    cfg = _cfg("scale-test", "redis.prefix=scale", "drop.enabled=false", "labelling.teachers=1",
               "labelling.batch_size=2")
    model = build_model(cfg.model)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8) for _ in range(8)]
    labeller = ray.remote(Labeller).options(num_cpus=0, max_concurrency=8, namespace="scale-test",
                                           name="labeller").remote(
        cfg.model_dump(mode="json"), redis_url, [f"s{i}" for i in range(8)], images,
        [ray.put(flatten(model.state_dict()))], 0, 0.0)
    done = labeller.run.remote(max_rounds=3)
    assert ray.get(labeller.scorer_count.remote()) == 1
    ray.get(labeller.scale_scorers.remote(2))
    stats = ray.get(done)
    assert stats["scorers"] == 2
    # Every image was labelled and scored exactly once: none lost, none duplicated. One
    # teacher version: the first pass leaves nothing due, so the run ends before 3 passes.
    assert stats["labelled"] == 8 and stats["scored"] == 8 and stats["stale"] == 0 and stats["rounds"] == 1
    bank = MemoryBank(redis_client(redis_url), "scale", 3)
    assert bank.num_images() == 8 and bank.check_invariants() == []
    assert all(len(bank.labels(f"s{i}")) == 3 for i in range(8))
    ray.get(labeller.scale_scorers.remote(1))
    ray.kill(labeller)




def test_labeller_relabels_only_after_a_push(ray_cluster, weights_dir, redis_url):
    """Run as the job runs it (until stop()): an unchanged teacher version is not labelled
    again, the loop waits instead; a push relabels every image once; stop() ends it at once."""
    import time

    from qualiteacher.services.labeller import Labeller
    from qualiteacher.services.scorer import label_id

    from qualiteacher.models.build import build_model

    cfg = _cfg("relabel-test", "redis.prefix=relabel", "drop.enabled=false", "labelling.teachers=1",
               "labelling.batch_size=2")
    ids = [f"r{i}" for i in range(6)]
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8) for _ in ids]
    weights = [ray.put(flatten(build_model(cfg.model).state_dict()))]
    labeller = ray.remote(Labeller).options(num_cpus=0, max_concurrency=8, namespace="relabel-test",
                                           name="labeller").remote(
        cfg.model_dump(mode="json"), redis_url, ids, images, weights, 0, 0.0)

    def stats():
        return ray.get(labeller.stats.remote())

    done = labeller.run.remote()
    _wait_until(lambda: stats()["scored"] == 6)
    time.sleep(3 * Labeller.IDLE_WAIT_S)  # the old loop labelled every image again meanwhile
    idle = stats()
    assert idle["labelled"] == 6 and idle["rounds"] == 1 and not ray.wait([done], timeout=0)[0]

    assert ray.get(labeller.push_weights.remote(weights, 1)) == 1
    _wait_until(lambda: stats()["scored"] == 12)
    time.sleep(Labeller.IDLE_WAIT_S)
    assert stats()["labelled"] == 12 and stats()["rounds"] == 2
    bank = MemoryBank(redis_client(redis_url), "relabel", 3)
    augs = cfg.labelling.augmentations
    for image_id in ids:  # both versions' labels reached the gate, each once
        seen = {m.decode() for m in bank.client.smembers(bank.keys.seen(image_id))}
        assert seen == {label_id(image_id, v, aug) for v in (0, 1) for aug in augs}
    counters = bank.stats()["counters"]
    assert counters["candidates"] == 2 * 6 * len(augs) and counters["duplicates"] == 0
    assert bank.check_invariants() == []

    started = time.monotonic()
    ray.get(labeller.stop.remote())
    assert ray.get(done, timeout=30)["labelled"] == 12
    assert time.monotonic() - started < 2 * Labeller.IDLE_WAIT_S  # woken, not left to time out
    ray.kill(labeller)


def test_student_worker_killed_resumes_from_checkpoint(ray_cluster, weights_dir, tmp_path):
    """Kill the Ray Train worker mid-run: training restarts from the latest checkpoint and
    the step count and teacher version continue instead of starting over."""
    import os
    import signal
    import threading
    import time

    import psutil
    from qualiteacher.pipelines.train import run

    killed: list[int] = []
    ckpt_root = tmp_path / "ray_train" / "student"

    def kill_worker_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            # The controller writes its snapshot once it has registered a checkpoint: only then
            # does a restarted worker get it back (killing earlier restarts from scratch).
            if (ckpt_root / "checkpoint_manager_snapshot.json").exists():
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(proc.info["pid"])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_worker_after_first_checkpoint, daemon=True)
    killer.start()
    summary = run(_cfg("student-kill", "train.steps=24", "train.checkpoint_every=4"), tmp_path)
    killer.join(timeout=5)
    assert killed, "the student worker was never killed"
    assert summary["steps"] == 24
    assert summary["teacher_version"] == 12
    assert summary["student_resumes"] == 1  # restarted once, from a checkpoint, not from scratch
    assert summary["faults"]["student_restarts"] == 1
    assert summary["max_entries_per_image"] <= 3
    # The training log shows one pass: what the killed attempt logged after its checkpoint is
    # hidden in TensorBoard and left out by the monitor's reader.
    from qualiteacher.services.redis_server import EmbeddedRedis
    from qualiteacher.services.training_stream import TrainingStream

    assert [e.step for e in _events(tmp_path / "tensorboard").Scalars("loss/total")] == list(range(1, 25))
    with EmbeddedRedis(tmp_path / "redis") as server:
        assert [p["step"] for p in TrainingStream(redis_client(server.url), "qt").points(1000)] == list(range(1, 25))


def test_data_paths_are_absolute_for_a_relative_run_dir(tmp_path, monkeypatch):
    """Paths go to Ray actors and Ray Train workers, whose working directory is not the
    driver's: `qualiteacher demo` with its relative `runs/demo` failed in the student."""
    from pathlib import Path

    from qualiteacher.pipelines.train import prepare_data

    from qualiteacher.run_dir import RunDir

    cfg = _cfg("paths")
    user_cfg = _cfg("paths", "data.paired_input_dir=in", "data.paired_target_dir=gt", "data.unpaired_dir=real")
    monkeypatch.chdir(tmp_path)
    bundled = prepare_data(cfg, RunDir(Path("rel_run")))
    assert all(p.is_absolute() and p.is_dir() for p in bundled.values()), bundled
    assert bundled["paired_input"] == tmp_path / "rel_run" / "data" / "paired" / "input"
    for name in ("in", "gt", "real"):
        (tmp_path / name).mkdir()
    user = prepare_data(user_cfg, RunDir(Path("rel_run")))
    assert user == {"paired_input": tmp_path / "in", "paired_target": tmp_path / "gt", "unpaired": tmp_path / "real"}
