"""The training log's parts: what is logged (core), the Redis stream (real Redis), rank 0's
writer (TensorBoard read back with TensorBoard's own reader), probes and their config.

The whole path in a real Ray Train run is in tests/test_pipeline.py (the smoke run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qualiteacher.services.bank.codec import build_entry
from qualiteacher.services.training_stream import TrainingStream, latest_attempt

from qualiteacher.config import ConfigError, load_config
from qualiteacher.imageio import decode_png, write_png
from qualiteacher.training_log import (
    PROBE_INPUT,
    Rate,
    bank_scalars,
    labelled_sets,
    probe_due,
    probe_name,
    score_histogram,
    step_scalars,
)


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


# ---------------------------------------------------------------------------- what is logged
def test_step_scalars_name_every_term():
    losses = {"total": 1.5, "supervised": 0.5, "pixel": 0.25, "pref_rank": 0.7, "q_high": 0.6, "q_low": 0.4}
    out = step_scalars(losses, lr=2e-4, teacher_version=3)
    assert out == {"loss/total": 1.5, "loss/supervised": 0.5, "loss/pixel": 0.25, "loss/pref_rank": 0.7,
                   "reward/q_high": 0.6, "reward/q_low": 0.4, "train/lr": 2e-4, "train/teacher_version": 3.0}


def test_bank_scalars_and_histogram_from_a_real_bank(bank):
    rng = np.random.default_rng(0)
    for i, scores in enumerate(([2.5, 6.1, 6.9], [8.2], [6.5, 0.3])):
        image = f"img{i}"
        bank.gate(image, [build_entry(image, f"{image}.v1.{aug}", ensemble=s, augmentation=aug,
                                      image=rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
                          for s, aug in zip(scores, ("identity", "hflip", "vflip"))])
    bank.record_drop("stale", 2)
    bank.record_drop("metric_disagreement", 1)
    stats = bank.stats()
    assert labelled_sets(stats) == 3 + 3  # three gate calls, three dropped sets
    scalars = bank_scalars(stats)
    assert scalars["bank/images"] == 3 and scalars["bank/entries"] == 6
    assert scalars["bank/drop_rate/stale"] == pytest.approx(2 / 6)
    assert scalars["bank/drop_rate/metric_disagreement"] == pytest.approx(1 / 6)
    assert scalars["bank/drop_rate/total"] == pytest.approx(3 / 6)
    hist = score_histogram(stats)
    assert hist["num"] == 6 and hist["bucket_counts"] == stats["histogram"]["counts"]
    assert hist["bucket_limits"] == [float(i) for i in range(1, 11)]
    assert (hist["min"], hist["max"]) == (0.0, 9.0)  # the lowest and highest filled bins' edges
    assert hist["sum"] == pytest.approx(2.5 + 6.5 + 6.5 + 8.5 + 6.5 + 0.5)  # bin centres


def test_empty_bank_has_no_histogram_and_no_rates(bank):
    stats = bank.stats()
    assert score_histogram(stats) is None
    assert bank_scalars(stats) == {"bank/images": 0.0, "bank/entries": 0.0, "bank/drop_rate/total": 0.0}


def test_rate():
    rate = Rate()
    assert rate.update(10, 100.0) is None  # nothing to compare with yet
    assert rate.update(30, 104.0) == pytest.approx(5.0)
    assert rate.update(30, 104.0) is None  # no time passed
    assert rate.update(40, 109.0) == pytest.approx(2.0)


@pytest.mark.parametrize(("step", "version", "due"), [(2, 1, False), (4, 2, True), (5, 2, False), (8, 4, True),
                                                      (6, 3, False)])
def test_probe_due_every_n_pushes(step, version, due):
    assert probe_due(step, version, push_every=2, probe_every_pushes=2) is due
    assert probe_due(step, version, push_every=2, probe_every_pushes=0) is False


def test_probe_names():
    assert [probe_name(s) for s in (3, 5.0, 6.5, 0.25)] == ["3", "5", "6.5", "0.25"]


# ---------------------------------------------------------------------------- config
def test_probe_config_defaults_and_overrides():
    cfg = load_config()
    assert cfg.train.probe_every_pushes == 0 and cfg.train.probe_scores == [3.0, 5.0, 7.0]
    cfg = load_config(None, ["train.probe_every_pushes=2", "train.probe_images=2", "train.probe_scores=[2, 6.5]"])
    assert (cfg.train.probe_every_pushes, cfg.train.probe_images, cfg.train.probe_scores) == (2, 2, [2.0, 6.5])


@pytest.mark.parametrize(("override", "fragment"), [
    ("train.probe_every_pushes=-1", "train.probe_every_pushes"),
    ("train.probe_images=0", "train.probe_images"),
    ("train.probe_images=17", "train.probe_images"),
    ("train.probe_scores=[]", "train.probe_scores"),
    ("train.probe_scores=[3, 3.0]", "distinct scores"),
    ("train.probe_scores=[11]", "model.score_max=10"),
    ("train.probe_scores=[-1]", "in [0, model.score_max"),
    ("train.probe_scores=[0.0000001]", "at most 6 decimals"),
    ("train.log_every=0", "train.log_every"),
])
def test_bad_probe_config_names_the_field(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_probe_scores_follow_score_max():
    assert load_config(None, ["model.score_max=12", "model.score_cap=7", "train.probe_scores=[11]"])
    with pytest.raises(ConfigError, match="score_max=5"):
        load_config(None, ["model.score_max=5", "model.score_cap=5"])  # the default 7 is off this scale


# ---------------------------------------------------------------------------- probes
def _tiny_model():
    from qualiteacher.models.build import build_model

    torch.manual_seed(0)
    return build_model(load_config("configs/smoke.yaml").model)


def test_load_probe_set_takes_the_first_readable_images(tmp_path):
    from qualiteacher.probe import load_probe_set

    rng = np.random.default_rng(1)
    images = {name: rng.integers(0, 255, (40, 60, 3), dtype=np.uint8) for name in ("b", "c", "d")}
    for name, img in images.items():
        write_png(tmp_path / f"{name}.png", img)
    (tmp_path / "a.png").write_bytes(b"not a png")  # first by name, unreadable: skipped
    probes = load_probe_set(tmp_path, k=2, size=32)
    assert probes.shape == (2, 32, 32, 3) and probes.dtype == np.uint8
    from qualiteacher.data.samples import square_resize

    np.testing.assert_array_equal(probes[0], square_resize(images["b"], 32))
    np.testing.assert_array_equal(probes[1], square_resize(images["c"], 32))
    with pytest.raises(ValueError, match="no readable probe images"):
        (tmp_path / "empty").mkdir()
        load_probe_set(tmp_path / "empty", k=2, size=32)


def test_restore_probes_is_the_model_at_each_score_and_leaves_it_training():
    from qualiteacher.probe import restore_probes, side_by_side

    model = _tiny_model().train()
    inputs = np.random.default_rng(2).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    out = restore_probes(model, inputs, [3.0, 7.0], torch.device("cpu"))
    assert list(out) == [PROBE_INPUT, "3", "7"] and model.training
    assert all(p.grad is None for p in model.parameters())
    np.testing.assert_array_equal(out[PROBE_INPUT], inputs)
    x = torch.from_numpy(inputs).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = model.eval()(x, 7.0).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out["7"], expected)
    assert side_by_side(out["3"]).shape == (32, 64, 3)


# ---------------------------------------------------------------------------- the stream
def test_stream_points_round_trip(redis_server, bank):
    stream = TrainingStream(redis_server.client(), bank.prefix)
    for step in range(1, 6):
        stream.add(step, {"loss/total": 1 / step, "reward/q_high": float("nan") if step == 2 else 0.5})
    points = stream.points(100)
    assert [p["step"] for p in points] == [1, 2, 3, 4, 5]
    assert points[2]["scalars"] == {"loss/total": pytest.approx(1 / 3), "reward/q_high": 0.5}
    assert points[1]["scalars"]["reward/q_high"] is None  # JSON has no NaN
    assert all(p["time_ms"] > 0 for p in points)
    assert [p["step"] for p in stream.points(2)] == [4, 5]  # the newest
    # Stored as text: what a reader gets back is a number's repr, never a pickle.
    raw = stream.client.xrange(stream.keys.train, count=1)[0][1]
    assert raw == {b"step": b"1", b"loss/total": b"1.0", b"reward/q_high": b"0.5"}


def test_stream_is_capped(redis_server, bank):
    stream = TrainingStream(redis_server.client(), bank.prefix, maxlen=50)
    pipe_steps = range(1, 1001)
    for step in pipe_steps:
        stream.add(step, {"loss/total": 1.0})
    n = stream.client.xlen(stream.keys.train)
    assert 50 <= n <= 50 + 100  # MAXLEN ~ trims whole nodes (100 entries each by default)
    assert stream.points(10_000)[-1]["step"] == 1000


def test_resumed_student_leaves_one_curve():
    def pts(steps):
        return [{"step": s, "time_ms": i, "scalars": {}} for i, s in enumerate(steps)]

    # Died at step 30, resumed from the checkpoint at 20, went on to 25.
    history = pts([*range(1, 31), *range(21, 26)])
    assert [p["step"] for p in latest_attempt(history)] == list(range(1, 26))
    kept = latest_attempt(history)
    assert kept[-1]["time_ms"] == len(history) - 1 and kept[20]["time_ms"] == 30  # the second pass's 21
    assert latest_attempt([]) == []


def test_reset_and_probe_replacement(redis_server, bank):
    from qualiteacher.imageio import encode_png

    stream = TrainingStream(redis_server.client(), bank.prefix)
    img = np.full((4, 8, 3), 7, np.uint8)
    stream.put_probes(4, 2, {"input": encode_png(img), "3": encode_png(img), "7": encode_png(img)}, 2, 4, 4)
    stream.put_probes(6, 3, {"input": encode_png(img), "5": encode_png(img + 1)}, 2, 4, 4)
    meta, png = stream.probe("5")
    assert json.loads(meta)["step"] == 6 and json.loads(meta)["names"] == ["input", "5"]
    np.testing.assert_array_equal(decode_png(png), img + 1)
    assert stream.probe("3") == (meta, None)  # the earlier probe's images went with it
    with pytest.raises(ValueError, match="invalid probe name"):
        stream.probe("3:x")
    with pytest.raises(ValueError, match="invalid probe name"):
        stream.put_probes(1, 1, {"a b": b""}, 1, 1, 1)
    stream.add(1, {"loss/total": 1.0})
    stream.reset()
    assert stream.points(10) == [] and stream.probe() == (None, None)


# ---------------------------------------------------------------------------- rank 0's writer
def test_training_log_writes_tensorboard_and_stream(redis_server, bank, tmp_path):
    """What rank 0 does each step, without Ray: scalars in both sinks, probes after the due push."""
    from qualiteacher.services.training_log import TrainingLog

    unpaired = tmp_path / "unpaired"
    rng = np.random.default_rng(3)
    for i in range(3):
        write_png(unpaired / f"u{i}.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    cfg = load_config("configs/smoke.yaml", [f"redis.prefix={bank.prefix}", "train.probe_every_pushes=2",
                                             "train.probe_images=2", "labelling.image_size=32"])
    model = _tiny_model()
    tlog = TrainingLog.open(cfg, tmp_path / "run", unpaired, bank, torch.device("cpu"), start_step=0)
    for step in range(1, 5):
        losses = {"total": torch.tensor(1.0 / step), "pixel": torch.tensor(0.5), "q_high": torch.tensor(0.25)}
        tlog.record(step, losses, lr=1e-3, teacher_version=step // 2, model=model)
    tlog.close()

    acc = _events(tmp_path / "run" / "tensorboard")
    assert [e.value for e in acc.Scalars("loss/total")] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert [e.step for e in acc.Scalars("train/teacher_version")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("reward/q_high")] == [0.25] * 4
    assert [e.step for e in acc.Scalars("train/steps_per_s")] == [2, 3, 4]
    assert {"bank/images", "bank/drop_rate/total", "bank/labelled_sets_per_s", "train/lr"} <= set(acc.Tags()["scalars"])
    assert set(acc.Tags()["images"]) == {"probe/input", "probe/score_3", "probe/score_5", "probe/score_7"}
    shot = acc.Images("probe/score_7")
    assert [e.step for e in shot] == [4] and (shot[0].width, shot[0].height) >= (32, 32)

    stream = TrainingStream(bank.client, bank.prefix)
    points = stream.points(100)
    assert [p["step"] for p in points] == [1, 2, 3, 4]
    for point, event in zip(points, acc.Scalars("loss/total")):
        assert point["scalars"]["loss/total"] == pytest.approx(event.value)
    meta, png = stream.probe("7")
    assert json.loads(meta)["step"] == 4 and decode_png(png).shape == (32, 64, 3)


def test_training_log_survives_redis_outage(tmp_path, caplog):
    """With Redis away, TensorBoard still gets every step and training is not stopped."""
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.redis_server import free_port, redis_client
    from qualiteacher.services.training_log import TrainingLog

    client = redis_client(f"redis://127.0.0.1:{free_port()}/0", retries=0, connect_timeout_s=0.2)
    dead = MemoryBank(client, "qt")
    cfg = load_config("configs/smoke.yaml")
    tlog = TrainingLog.open(cfg, tmp_path, tmp_path, dead, torch.device("cpu"), start_step=0)
    for step in (1, 2):
        tlog.record(step, {"total": torch.tensor(0.5)}, lr=1e-3, teacher_version=0, model=_tiny_model())
    tlog.close()
    assert [e.step for e in _events(tmp_path / "tensorboard").Scalars("loss/total")] == [1, 2]
    assert sum("Redis unreachable" in r.getMessage() for r in caplog.records) == 1  # once per outage


def test_resumed_worker_replaces_what_it_logs_again(bank, tmp_path):
    """A worker that died after step 4 and resumed from its checkpoint at step 2: TensorBoard
    and the monitor's points show steps 1-5 once each, 3 and 4 from the second attempt."""
    from qualiteacher.services.training_log import TrainingLog

    cfg = load_config("configs/smoke.yaml", [f"redis.prefix={bank.prefix}"])
    model = _tiny_model()
    for start, stop, value in ((0, 4, 1.0), (2, 5, 2.0)):
        tlog = TrainingLog.open(cfg, tmp_path, tmp_path, bank, torch.device("cpu"), start_step=start)
        for step in range(start + 1, stop + 1):
            tlog.record(step, {"total": torch.tensor(value)}, lr=1e-3, teacher_version=0, model=model)
        tlog.close()
    events = _events(tmp_path / "tensorboard").Scalars("loss/total")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)]
    points = TrainingStream(bank.client, bank.prefix).points(100)
    assert [(p["step"], p["scalars"]["loss/total"]) for p in points] == [(e.step, e.value) for e in events]
