"""What the monitor reads: one Redis client and the bank's stores over it (reads only)."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from qualiteacher.services.bank.inputs import InputStore
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.redis_server import redact_url, redis_client
from qualiteacher.services.training_stream import TrainingStream


@dataclass(frozen=True)
class Sources:
    client: redis.Redis
    prefix: str
    safe_url: str  # the Redis URL without its password: what answers and logs may show
    bank: MemoryBank
    inputs: InputStore
    training: TrainingStream


def open_sources(redis_url: str, prefix: str, client: redis.Redis | None = None) -> Sources:
    """The stores for the bank under ``prefix``. The default client retries once, with 1 s
    connect and 2 s read timeouts, so that a Redis outage turns into a quick 503."""
    if client is None:
        client = redis_client(redis_url, retries=1, backoff_base_s=0.05, backoff_cap_s=0.2,
                              socket_timeout_s=2.0, connect_timeout_s=1.0)
    bank = MemoryBank(client, prefix=prefix)  # registering scripts does not touch Redis
    return Sources(client, prefix, redact_url(redis_url), bank, InputStore(client, prefix),
                   TrainingStream(client, prefix))
