"""The monitor under concurrent load while the bank is being gated (a bounded loop on loopback).

uvicorn serves the app from a thread on a free loopback port; 8 client threads (one shared
``httpx.Client``) cycle through every read endpoint for ``DURATION_S`` seconds while a
writer thread gates new pseudo-label sets into the same bank, as scorers do during a job
(entries evicted and replaced under the readers' feet). Every answer must be a 200; the
test prints requests per second and the latency percentiles, and the bank's invariants hold
afterwards. Numbers are for this 2-core machine with everything in one process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from qualiteacher.services.bank.codec import build_entry
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.monitor import create_app
from qualiteacher.services.redis_server import redis_client

from tests.redis_fixtures import unique_prefix
from tests.serving import served_app
from tests.test_monitor import fill_bank

DURATION_S = 8.0
CLIENT_THREADS = 8
METRICS = ("brisque", "niqe", "piqe")


@pytest.fixture
def live_bank(redis_server) -> Iterator[tuple[MemoryBank, list[str]]]:
    bank = MemoryBank(redis_server.client(), prefix=unique_prefix(), top_k=3)
    made = fill_bank(bank, n_images=6)
    yield bank, list(made)
    bank.clear()
    bank.client.close()


@pytest.fixture
def server_url(live_bank, redis_url) -> Iterator[str]:
    bank, _ = live_bank
    with served_app(create_app(redis_url, prefix=bank.prefix), access_log=False) as base:
        yield base


def _gate_forever(bank: MemoryBank, ids: list[str], stop: threading.Event, counts: dict) -> None:
    """New PL sets with rising scores for the images the readers look at (evictions guaranteed),
    through a connection of its own, like a scorer."""
    rng = np.random.default_rng(7)
    client = MemoryBank(redis_client(counts["url"]), prefix=bank.prefix, top_k=3)
    version = 10
    while not stop.is_set():
        version += 1
        for image_id in ids:
            entries = []
            for aug in ("hflip", "vflip", "rot90"):
                norm = {m: float(min(1.0, 0.5 + 0.004 * version + 0.05 * rng.random())) for m in METRICS}
                ensemble = 10 * (0.4 * norm["brisque"] + 0.3 * norm["niqe"] + 0.3 * norm["piqe"])
                entries.append(build_entry(
                    image_id, f"{image_id}.v{version}.{aug}", ensemble=ensemble,
                    image=rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), teacher_version=version,
                    augmentation=aug, raw_scores={m: 10.0 for m in METRICS}, normalized_scores=norm,
                    weights=np.ones((2, 2)), teacher_q_min=0.2, created_at_ms=int(time.time() * 1000)))
            outcome = client.gate(image_id, entries)
            counts["gates"] += 1
            counts["evicted"] += len(outcome.evicted)
        client.status.set_teacher_version(version)
        time.sleep(0.01)
    client.client.close()


def test_monitor_under_concurrent_load_while_gating(live_bank, server_url, redis_url):
    bank, ids = live_bank
    paths = ["/healthz", "/bank/stats", "/bank/images?limit=50", "/bank/images?sort=recent&limit=10", "/metrics"]
    for image_id in ids:
        paths += [f"/bank/images/{image_id}", f"/bank/images/{image_id}/entries/0.png?size=32",
                  f"/bank/images/{image_id}/entries/2.png", f"/bank/images/{image_id}/input.png?size=64"]
    stop = threading.Event()
    counts = {"gates": 0, "evicted": 0, "url": redis_url}
    writer = threading.Thread(target=_gate_forever, args=(bank, ids, stop, counts), daemon=True)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(worker: int, http: httpx.Client, until: float) -> int:
        n, i = 0, worker
        while time.monotonic() < until:
            path = paths[i % len(paths)]
            i += CLIENT_THREADS
            t0 = time.perf_counter()
            try:
                r = http.get(path)
                status = r.status_code
            except httpx.HTTPError as exc:
                status = f"{type(exc).__name__}"
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if status != 200:
                    errors.append(f"{path}: {status}")
            n += 1
        return n

    limits = httpx.Limits(max_connections=CLIENT_THREADS, max_keepalive_connections=CLIENT_THREADS)
    with httpx.Client(base_url=server_url, timeout=10.0, limits=limits) as http:
        assert http.get("/healthz").status_code == 200
        writer.start()
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            totals = list(pool.map(lambda w: client_loop(w, http, started + DURATION_S), range(CLIENT_THREADS)))
        elapsed = time.monotonic() - started
        stop.set()
        writer.join(10)
    total = sum(totals)
    lat = np.array(latencies) * 1000
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    print(f"monitor load: {total} requests in {elapsed:.1f} s = {total / elapsed:.0f} req/s, "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat.max():.1f} ms; "
          f"{counts['gates']} concurrent gate calls ({counts['evicted']} evictions)")
    assert not errors, errors[:10]
    assert total >= 200, total  # a few hundred requests
    assert counts["gates"] > 0 and counts["evicted"] > 0  # the bank really changed under the readers
    assert p99 < 2000, p99
    assert bank.check_invariants() == []
