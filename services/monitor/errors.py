"""The monitor's error answers: one JSON shape ``{"error", "detail"}`` for every failure, and
a Redis outage as 503 with ``Retry-After``, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from qualiteacher.services.monitor.models import ErrorResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# The error answers each kind of route documents in the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "token missing or wrong"},
    503: {"model": ErrorResponse, "description": "Redis is not reachable"},
}
ID_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    404: {"model": ErrorResponse, "description": "no such image or entry"},
    422: {"model": ErrorResponse, "description": "invalid image id or parameter"},
}
PNG_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ID_RESPONSES, 200: {"content": {"image/png": {}}, "description": "a PNG image"},
}


class ApiError(Exception):
    """Raised by a route: answered as ``status`` with the JSON error body."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI, safe_url: str) -> None:
    """Every exception a route can raise, as the JSON error body. ``safe_url``: Redis's URL
    without its password, named in the 503."""

    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail)

    async def redis_down(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis at %s unavailable: %s", safe_url, type(exc).__name__)
        return error_response(503, "redis_unavailable",
                              f"Redis at {safe_url} is not reachable ({type(exc).__name__}); retry shortly",
                              headers={"Retry-After": "2", "Cache-Control": "no-store"})

    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    async def http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail),
                              headers=getattr(exc, "headers", None))

    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("monitor error: %s", exc, exc_info=exc)
        return error_response(500, "internal", "internal error; see the monitor's log")

    app.add_exception_handler(ApiError, api_error)
    for kind in (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError):
        app.add_exception_handler(kind, redis_down)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, internal)
