"""Redis stopped and restarted (same port, same AOF folder) in the middle of a labelling run.

A Labeller actor (teacher + scorer actors, as in ``tests/test_faults.py``) labels 16 images
against its own ``EmbeddedRedis``. After the first batches are gated,
Redis is shut down for longer than the Redis client's own retries last (about 6 s), so the
labeller's retry-with-backoff must carry the run; meanwhile the monitor answers 503. Redis
then comes back on the same port from its AOF: the run completes with nothing failed, and
the bank is intact (invariants hold, every image present, ``qualiteacher bank check`` OK).
"""

from __future__ import annotations

import time

import numpy as np
import ray
from fastapi.testclient import TestClient
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.labeller import Labeller
from qualiteacher.services.monitor import create_app
from qualiteacher.services.redis_server import EmbeddedRedis, free_port, redis_client

from qualiteacher.config import load_config
from qualiteacher.flat_weights import flatten
from qualiteacher.models.build import build_model
from tests.waiting import wait_until as _wait_until

N_IMAGES = 16  # one pass (one teacher version), long enough to be mid-run at the outage
OUTAGE_S = 14.0


def _start_labeller(namespace: str, redis_url: str):
    cfg = load_config("configs/smoke.yaml", [f"ray.namespace={namespace}", "redis.prefix=qt", "drop.enabled=false",
                                              "labelling.teachers=1", "labelling.scorers=1",
                                              "labelling.batch_size=2"])
    model = build_model(cfg.model)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8) for _ in range(N_IMAGES)]
    return ray.remote(Labeller).options(num_cpus=0, max_concurrency=8, namespace=namespace, name="labeller").remote(
        cfg.model_dump(mode="json"), redis_url, [f"r{i}" for i in range(N_IMAGES)], images,
        [ray.put(flatten(model.state_dict()))], 0, 0.0)




def test_redis_restart_mid_run_loses_nothing(ray_cluster, weights_dir, tmp_path, capsys):
    from qualiteacher.pipelines.cli import main

    server = EmbeddedRedis(tmp_path / "redis", port=free_port())
    server.start()
    labeller = None
    try:
        labeller = _start_labeller("redis-restart", server.url)
        done = labeller.run.remote(max_rounds=1)
        _wait_until(lambda: ray.get(labeller.stats.remote())["scored"] >= 4)
        before = ray.get(labeller.stats.remote())
        assert before["rounds"] == 1 and not ray.wait([done], timeout=0)[0]  # still running

        server.stop()  # SHUTDOWN: the AOF is flushed; nothing listens on the port now
        outage_started = time.monotonic()
        with TestClient(create_app(server.url)) as monitor:
            for path in ("/healthz", "/bank/stats", "/bank/images"):
                r = monitor.get(path)
                assert r.status_code == 503 and r.json()["error"] == "redis_unavailable", (path, r.text)
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
            assert not ray.wait([done], timeout=0)[0]  # the run waits, it does not end
            server.start()  # same port, same folder: the AOF brings the bank back
            assert monitor.get("/healthz").status_code == 200

        stats = ray.get(done, timeout=300)
        print(f"redis restart: outage {OUTAGE_S:.0f} s; stats {stats}")
        assert stats["failed"] == 0, stats
        assert stats["labelled"] == stats["scored"] == N_IMAGES, stats  # each image once: one version
        assert stats["retries"] >= 1, stats  # the outage outlasted the client's retries: the labeller retried

        bank = MemoryBank(redis_client(server.url), "qt", 3)
        assert bank.check_invariants() == []
        assert sorted(i for i, _, _ in bank.list_images(0, 100, sort="id")) == sorted(f"r{i}" for i in range(N_IMAGES))
        assert all(len(bank.labels(f"r{i}")) == 3 for i in range(N_IMAGES))
        assert main(["bank", "check", "--redis", server.url]) == 0
        assert f"{N_IMAGES} images, OK" in capsys.readouterr().out
        bank.client.close()
    finally:
        if labeller is not None:
            ray.kill(labeller)
        server.stop()
