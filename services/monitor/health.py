"""``/healthz``: whether the monitor reaches Redis."""

from __future__ import annotations

import time

from fastapi import APIRouter
from qualiteacher.services.monitor.errors import ERROR_RESPONSES
from qualiteacher.services.monitor.models import Health
from qualiteacher.services.monitor.sources import Sources


def health_router(src: Sources) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", response_model=Health, responses=ERROR_RESPONSES, tags=["monitor"])
    def healthz() -> Health:
        """200 when Redis answers a PING; 503 while it does not."""
        t0 = time.perf_counter()
        src.client.ping()
        return Health(prefix=src.prefix, redis_url=src.safe_url,
                      latency_ms=round((time.perf_counter() - t0) * 1000, 3))

    return router
