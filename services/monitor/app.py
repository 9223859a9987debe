"""The bank monitor: a read-only FastAPI app over the Redis memory bank; this module builds
it from its parts and serves it.

Endpoints (all GET; JSON ones have pydantic models in :mod:`qualiteacher.services.monitor.models`, the
schema is at ``/openapi.json``):

==============================================  ================================================
``/``                                           the web page (``static/``; no external asset)
``/healthz``                                    200 when Redis answers a PING, else 503
``/bank/stats``                                 counts, score histogram, drops, rates, versions
``/bank/images?offset=&limit=&sort=``           a page of images (limit 1-200; sort score|id|recent)
``/bank/images/{image_id}``                     one image's entries with per-metric scores
``/bank/images/{image_id}/entries/{rank}.png``  an entry's pseudo-label (rank 0 is the best);
                                                ``?size=N`` (16-512) for a thumbnail
``/bank/images/{image_id}/input.png``           the degraded input (``?size=`` too)
``/api/training?limit=``                        the student's training log: points (step, time,
                                                scalars by tag) and the latest probe images
``/api/training/probe/{name}.png``              a probe strip: ``input`` or a score (``3``, ``5``...)
``/metrics``                                    Prometheus text format (0.0.4)
==============================================  ================================================

Behaviour:

* **Read-only.** Only GET/HEAD routes exist; the app issues Redis reads only.
* **Redis down.** The client retries once, with short timeouts; a connection error or
  timeout becomes ``503 {"error": "redis_unavailable", ...}`` with ``Retry-After``, never
  a traceback. ``/metrics`` still answers 200 then, with ``qualiteacher_redis_up 0``, as
  Prometheus expects of an exporter whose target is down.
* **Ids.** Image ids must pass :func:`qualiteacher.services.bank.keys.validate_id` (else 422), so they
  can name no other key; probe names must match ``PROBE_NAME``; ranks and sizes are bounded
  integers; PNGs come from Redis, never from a file path.
* **Training.** The student's rank 0 writes the training log to Redis
  (:mod:`qualiteacher.services.training_stream`); the monitor only reads it, so the panel shows the same
  after a monitor restart, and after the job has ended.
* **Token.** With ``token`` set, every request (the page, its assets and ``/openapi.json``
  included) needs ``Authorization: Bearer <token>`` or ``?token=<token>`` (compared with
  :func:`hmac.compare_digest`), else 401. The page forwards a ``?token=`` it was opened
  with to its assets and API calls.
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI
from qualiteacher.services.bank.keys import validate_prefix
from qualiteacher.services.monitor.bank_routes import bank_router
from qualiteacher.services.monitor.errors import add_error_handlers
from qualiteacher.services.monitor.health import health_router
from qualiteacher.services.monitor.metrics import metrics_router
from qualiteacher.services.monitor.page import add_page
from qualiteacher.services.monitor.security import (
    TOKEN_ENV,
    GuardMiddleware,
    RedactTokens,
    check_bind,
    is_loopback,
)
from qualiteacher.services.monitor.sources import open_sources
from qualiteacher.services.monitor.training_routes import training_router
from qualiteacher.services.redis_server import redact_url

__all__ = ["TOKEN_ENV", "create_app", "is_loopback", "serve"]


def create_app(
    redis_url: str,
    prefix: str = "qt",
    token: str | None = None,
    *,
    client: redis.Redis | None = None,
) -> FastAPI:
    """The monitor app for the bank under ``prefix`` in the Redis at ``redis_url``.

    ``token``: when set (non-empty), every request must carry it. ``client`` replaces the
    default Redis client (one retry, 1 s connect and 2 s read timeouts, so that a Redis
    outage turns into a quick 503).
    """
    validate_prefix(prefix)
    if token is not None and not token.strip():
        token = None
    src = open_sources(redis_url, prefix, client)
    app = FastAPI(
        title="QualiTeacher bank monitor",
        version="1",
        description="Read-only view of the QualiTeacher memory bank in Redis. "
                    "Redis unavailable: 503 with a JSON error.",
        docs_url=None,  # Swagger UI would load its assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.bank = src.bank
    app.state.redis_url = src.safe_url
    app.add_middleware(GuardMiddleware, token=token)
    add_error_handlers(app, src.safe_url)
    add_page(app, token)
    for router in (health_router(src), bank_router(src), training_router(src), metrics_router(src)):
        app.include_router(router)
    return app


def serve(redis_url: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          prefix: str = "qt", log=print) -> None:
    """Run the monitor under uvicorn. Refuses (``ValueError``) a non-loopback ``host`` without a token.

    Neither the token nor the Redis password is ever printed or logged.
    """
    import uvicorn

    token = token or None
    check_bind(host, token)
    app = create_app(redis_url, prefix=prefix, token=token)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())
    shown = f"[{host}]" if ":" in host else host
    log(f"monitor: http://{shown}:{port}/ (bank {prefix!r} in {redact_url(redis_url)}"
        f"{'; token required: open /?token=<token>' if token else ''})")
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
