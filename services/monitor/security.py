"""The monitor's security defaults: the token every request needs when one is set, the headers
on every answer, the bind rule (loopback, or a token), and no token in the access log."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re

from fastapi import Request
from qualiteacher.services.monitor.errors import error_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_ENV = "QUALITEACHER_MONITOR_TOKEN"

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     (b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
      b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")),
]


class GuardMiddleware:
    """Token check (when set) before anything else, and security headers on every answer."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    def _authorised(self, request: Request) -> bool:
        assert self.token is not None
        supplied = ""
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            supplied = value.strip()
        else:
            supplied = request.query_params.get("token", "")
        return bool(supplied) and hmac.compare_digest(supplied.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        if self.token is not None and not self._authorised(Request(scope)):
            response = error_response(
                401, "unauthorized", "this monitor needs a token: 'Authorization: Bearer <token>' or '?token=<token>'",
                headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"})
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuse (``ValueError``) to serve on a non-loopback ``host`` without a token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to serve the monitor on {host!r} without a token: anyone who can reach it could read "
            f"the bank. Pass --token or set ${TOKEN_ENV}, or bind to 127.0.0.1")


_TOKEN_IN_URL = re.compile(r"(token=)[^&\s\"']*")


class RedactTokens(logging.Filter):
    """Hides ``?token=...`` in uvicorn's access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_URL.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True
