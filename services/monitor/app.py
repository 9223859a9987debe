"""The bank monitor: a read-only FastAPI app over the Redis memory bank.

Endpoints (all GET; JSON ones have pydantic models in :mod:`services.monitor.models`, the
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
* **Ids.** Image ids must pass :func:`services.bank.keys.validate_id` (else 422), so they
  can name no other key; probe names must match ``PROBE_NAME``; ranks and sizes are bounded
  integers; PNGs come from Redis, never from a file path.
* **Training.** The student's rank 0 writes the training log to Redis
  (:mod:`services.training_stream`); the monitor only reads it, so the panel shows the same
  after a monitor restart, and after the job has ended.
* **Token.** With ``token`` set, every request (the page, its assets and ``/openapi.json``
  included) needs ``Authorization: Bearer <token>`` or ``?token=<token>`` (compared with
  :func:`hmac.compare_digest`), else 401. The page forwards a ``?token=`` it was opened
  with to its assets and API calls.
"""

from __future__ import annotations

import hmac
import html
import io
import ipaddress
import json
import logging
import math
import re
import time
from importlib import resources
from typing import Annotated, Any, Literal
from urllib.parse import quote

import redis
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protos import bank_entry_pb2 as pb
from qualiteacher.training_log import PROBE_NAME, probe_name
from services.bank.codec import decode_image
from services.bank.inputs import InputStore
from services.bank.keys import ID_PATTERN, validate_id, validate_prefix
from services.bank.store import COUNTER_NAMES, MemoryBank
from services.job_status import JobStatus
from services.monitor.models import (
    BankStats,
    EntryInfo,
    ErrorResponse,
    Health,
    Histogram,
    ImageDetail,
    ImagePage,
    ImageSummary,
    ProbeImage,
    ProbeInfo,
    TrainingHistory,
    TrainingPoint,
    WeightMap,
)
from services.redis_server import redact_url, redis_client
from services.training_stream import TrainingStream

log = logging.getLogger(__name__)

MAX_PAGE = 200
MAX_THUMB = 512
MIN_THUMB = 16
MAX_RANK = 63
MAX_POINTS = 10_000
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
STATIC = resources.files("services.monitor").joinpath("static")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     (b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
      b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")),
]

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
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


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
            response = _error(401, "unauthorized",
                              "this monitor needs a token: 'Authorization: Bearer <token>' or '?token=<token>'",
                              headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"})
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


# The id rule in the OpenAPI schema (so clients and fuzzers know it); enforced by _check_id,
# which answers 422 "invalid_id" rather than FastAPI's generic validation error.
ImageId = Annotated[str, Path(description=f"image id, matching {ID_PATTERN}", json_schema_extra={"pattern": ID_PATTERN})]


def _check_id(image_id: str) -> str:
    try:
        return validate_id(image_id)
    except ValueError:
        raise ApiError(422, "invalid_id", f"invalid image id: must match {ID_PATTERN}") from None


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _png_bytes(data: bytes, size: int | None) -> bytes:
    """``data`` (a PNG) as it is, or shrunk so that its longer side is at most ``size``."""
    if size is None:
        return data
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(data)) as img:
        if max(img.size) <= size:
            return data
        img.load()
        thumb = img.copy()
    thumb.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _entry_png(entry: pb.BankEntry, size: int | None) -> bytes:
    if entry.image.WhichOneof("payload") == "png":
        return _png_bytes(entry.image.png, size)
    from PIL import Image as PILImage

    arr = decode_image(entry.image)
    img = PILImage.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if size is not None:
        img.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _probe_info(raw: bytes | None) -> ProbeInfo | None:
    """The latest probe's metadata (JSON written by the student), or None where there is
    none or it does not parse: a bad record must not turn the panel into a 500."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
        items = []
        for name in meta["names"]:
            if not isinstance(name, str) or not PROBE_NAME.fullmatch(name):
                raise ValueError(f"bad probe name {name!r}")
            items.append(ProbeImage(name=name, score=None if name == "input" else float(name),
                                    url=f"/api/training/probe/{name}.png?v={int(meta['step'])}"))
        return ProbeInfo(step=meta["step"], teacher_version=meta["teacher_version"], time_ms=meta["time_ms"],
                         images=meta["images"], width=meta["width"], height=meta["height"], items=items)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("unreadable probe record: %s", exc)
        return None


def _probe_name(name: str) -> str:
    """``input`` or a score in the form the student names it (``3.0`` -> ``3``), else 422."""
    if PROBE_NAME.fullmatch(name) and name != "input":
        name = probe_name(float(name))
    if not PROBE_NAME.fullmatch(name):
        raise ApiError(422, "invalid_probe", f"invalid probe name: 'input' or a score matching {PROBE_NAME.pattern}")
    return name


def _png_response(data: bytes, etag: str | None = None) -> Response:
    headers = {"Cache-Control": "no-cache"}
    if etag:
        headers["ETag"] = etag
    return Response(content=data, media_type="image/png", headers=headers)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


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
    if client is None:
        client = redis_client(redis_url, retries=1, backoff_base_s=0.05, backoff_cap_s=0.2,
                              socket_timeout_s=2.0, connect_timeout_s=1.0)
    bank = MemoryBank(client, prefix=prefix)  # registering scripts does not touch Redis
    inputs = InputStore(client, prefix)
    training = TrainingStream(client, prefix)
    safe_url = redact_url(redis_url)

    app = FastAPI(
        title="QualiTeacher bank monitor",
        version="1",
        description="Read-only view of the QualiTeacher memory bank in Redis. "
                    "Redis unavailable: 503 with a JSON error.",
        docs_url=None,  # Swagger UI would load its assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.bank = bank
    app.state.redis_url = safe_url
    app.add_middleware(GuardMiddleware, token=token)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.detail)

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_down(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis at %s unavailable: %s", safe_url, type(exc).__name__)
        return _error(503, "redis_unavailable",
                      f"Redis at {safe_url} is not reachable ({type(exc).__name__}); retry shortly",
                      headers={"Retry-After": "2", "Cache-Control": "no-store"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail),
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("monitor error: %s", exc, exc_info=exc)
        return _error(500, "internal", "internal error; see the monitor's log")

    # ------------------------------------------------------------------ page
    index_template = STATIC.joinpath("index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> HTMLResponse:
        qs = ""
        supplied = request.query_params.get("token")
        if token and supplied:  # already checked by the middleware: pass it on to the assets
            qs = "?token=" + quote(supplied, safe="")
        page = index_template.replace("__QS__", html.escape(qs, quote=True))
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # ------------------------------------------------------------------ JSON
    @app.get("/healthz", response_model=Health, responses=ERROR_RESPONSES, tags=["monitor"])
    def healthz() -> Health:
        """200 when Redis answers a PING; 503 while it does not."""
        t0 = time.perf_counter()
        client.ping()
        return Health(prefix=prefix, redis_url=safe_url, latency_ms=round((time.perf_counter() - t0) * 1000, 3))

    @app.get("/bank/stats", response_model=BankStats, responses=ERROR_RESPONSES, tags=["bank"])
    def bank_stats() -> BankStats:
        """Bank size, score histogram, drops by reason, gating and drop rates, teacher version, scorers."""
        s = bank.stats()
        pipe = client.pipeline(transaction=False)
        bank.status.queue_read(pipe)
        pipe.xrevrange(bank.keys.events, count=1)
        status_raw, last = pipe.execute()
        top_k = JobStatus.decode(status_raw).top_k
        counters = {k: int(v) for k, v in s["counters"].items()}
        drops = {k: int(v) for k, v in s["drops"].items()}
        dropped = sum(drops.values())
        gated = counters.get("gate_calls", 0)
        cand = counters.get("candidates", 0)
        last_ms = int(last[0][0].decode().split("-")[0]) if last else None
        return BankStats(
            prefix=prefix, images=s["images"], entries=s["entries"],
            top_k=top_k,
            counters=counters, drops=drops, dropped_total=dropped,
            drop_rate=dropped / (dropped + gated) if dropped + gated else None,
            gating_rate=counters.get("admitted", 0) / cand if cand else None,
            histogram=Histogram(**s["histogram"]),
            teacher_version=s["teacher_version"], scorer_count=s["scorer_count"],
            events=s["events"], last_event_ms=last_ms, time_ms=int(time.time() * 1000),
        )

    @app.get("/bank/images", response_model=ImagePage, responses=ERROR_RESPONSES | {422: ID_RESPONSES[422]},
             tags=["bank"])
    def bank_images(
        offset: Annotated[int, Query(ge=0, le=1_000_000_000, description="images to skip")] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 50,
        sort: Annotated[Literal["score", "id", "recent"],
                        Query(description="score: best first; id: by id; recent: last changed first")] = "score",
    ) -> ImagePage:
        """A page of images, each with its best score and entry count."""
        rows = bank.list_images(offset, limit, sort)
        pipe = client.pipeline(transaction=False)
        pipe.zcard(bank.keys.idx_lex)
        for image_id, _, _ in rows:
            pipe.zrange(bank.keys.rank(image_id), 0, 0)
        total, *best = pipe.execute()
        items = []
        for (image_id, score, count), top in zip(rows, best):
            label = top[0].decode() if top else None
            items.append(ImageSummary(
                image_id=image_id, best_score=_finite_or_none(score), entries=count, best_label_id=label,
                thumbnail_url=f"/bank/images/{image_id}/entries/0.png?size=160",
            ))
        return ImagePage(total=int(total), offset=offset, limit=limit, sort=sort, items=items)

    @app.get("/bank/images/{image_id}", response_model=ImageDetail, responses=ID_RESPONSES, tags=["bank"])
    def bank_image(image_id: ImageId) -> ImageDetail:
        """One image's entries, best first, with raw and normalised scores per metric."""
        _check_id(image_id)
        entries = bank.entries(image_id)
        has_input = bool(client.exists(inputs.key(image_id)))
        if not entries and not has_input:
            raise ApiError(404, "not_found", f"no image {image_id!r} in the bank")
        now_ms = time.time() * 1000
        out = []
        for rank, e in enumerate(entries):
            weights = None
            if e.HasField("weights") and e.weights.rows:
                weights = WeightMap(rows=e.weights.rows, cols=e.weights.cols, values=list(e.weights.values))
            out.append(EntryInfo(
                rank=rank, label_id=e.label_id, teacher_version=e.teacher_version,
                augmentation=e.augmentation, ensemble=e.ensemble, level=e.level,
                raw_scores=dict(e.raw_scores), normalized_scores=dict(e.normalized_scores),
                teacher_q_min=e.teacher_q_min, created_at_ms=e.created_at_ms,
                age_s=round(max(0.0, now_ms - e.created_at_ms) / 1000, 3),
                width=e.image.width, height=e.image.height, channels=e.image.channels,
                weights=weights, image_url=f"/bank/images/{image_id}/entries/{rank}.png",
            ))
        return ImageDetail(image_id=image_id, entries=out,
                           input_url=f"/bank/images/{image_id}/input.png" if has_input else None)

    @app.get("/bank/images/{image_id}/entries/{rank}.png", response_class=Response,
             responses=PNG_RESPONSES, tags=["bank"])
    def entry_png(
        request: Request,
        image_id: ImageId,
        rank: Annotated[int, Path(ge=0, le=MAX_RANK, description="0 = the best entry")],
        size: Annotated[int | None, Query(ge=MIN_THUMB, le=MAX_THUMB,
                                          description="longer side of a thumbnail, in pixels")] = None,
    ) -> Response:
        """The pseudo-label of the image's entry at ``rank`` as PNG (a thumbnail with ``size``)."""
        _check_id(image_id)
        for _ in range(3):  # the entry may be evicted between the two reads: look again
            labels = bank.labels(image_id)
            if rank >= len(labels):
                raise ApiError(404, "not_found", f"image {image_id!r} has {len(labels)} entries, no rank {rank}")
            label = labels[rank]
            etag = f'"{label}-{size or 0}"'
            if request.headers.get("if-none-match") == etag:
                return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
            raw = client.get(bank.keys.entry(image_id, label))
            if raw is not None:
                return _png_response(_entry_png(pb.BankEntry.FromString(raw), size), etag)
        raise ApiError(404, "not_found", f"entry {rank} of {image_id!r} changed while reading it; retry")

    @app.get("/bank/images/{image_id}/input.png", response_class=Response, responses=PNG_RESPONSES,
             tags=["bank"])
    def input_png(
        image_id: ImageId,
        size: Annotated[int | None, Query(ge=MIN_THUMB, le=MAX_THUMB,
                                          description="longer side of a thumbnail, in pixels")] = None,
    ) -> Response:
        """The degraded input the teachers labelled, as PNG."""
        _check_id(image_id)
        raw = client.get(inputs.key(image_id))
        if raw is None:
            raise ApiError(404, "not_found", f"no input stored for image {image_id!r}")
        return _png_response(_png_bytes(raw, size), etag=f'"input-{size or 0}"')

    # ------------------------------------------------------------------ training
    @app.get("/api/training", response_model=TrainingHistory, responses=ERROR_RESPONSES | {422: ID_RESPONSES[422]},
             tags=["training"])
    def training_history(
        limit: Annotated[int, Query(ge=1, le=MAX_POINTS, description=f"newest points, at most {MAX_POINTS}")] = 2000,
    ) -> TrainingHistory:
        """The student's training log: scalars per logged step, and the latest probe images."""
        points = [TrainingPoint(**p) for p in training.points(limit)]
        tags = sorted({tag for p in points for tag in p.scalars})
        probe = _probe_info(training.probe()[0])
        return TrainingHistory(points=points, tags=tags, probe=probe)

    @app.get("/api/training/probe/{name}.png", response_class=Response, responses=PNG_RESPONSES | {
        404: {"model": ErrorResponse, "description": "no probe image of that name yet"}}, tags=["training"])
    def probe_png(
        request: Request,
        name: Annotated[str, Path(description="'input' or a probe score (3, 5, 7, ...)",
                                  json_schema_extra={"pattern": PROBE_NAME.pattern})],
    ) -> Response:
        """The latest probe images at one score (or their inputs), side by side, as PNG."""
        name = _probe_name(name)
        meta, data = training.probe(name)
        info = _probe_info(meta)
        if data is None or info is None:
            raise ApiError(404, "not_found", f"no probe image {name!r} yet")
        etag = f'"probe-{info.step}-{name}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
        return _png_response(data, etag)

    # ------------------------------------------------------------------ Prometheus
    @app.get("/metrics", response_class=PlainTextResponse, tags=["monitor"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}})
    def metrics() -> PlainTextResponse:
        """Bank gauges and gate counters in Prometheus text format; ``qualiteacher_redis_up 0`` while
        Redis is down."""
        lines: list[str] = []
        p = f'prefix="{_label_value(prefix)}"'

        def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{{{labels}}} {float(value):.17g}" if isinstance(value, float)
                             else f"{name}{{{labels}}} {value}")

        try:
            t0 = time.perf_counter()
            s = bank.stats()
            up, scrape = 1, time.perf_counter() - t0
        except REDIS_ERRORS:
            up, s, scrape = 0, None, 0.0
        family("qualiteacher_redis_up", "gauge", "1 when the monitor could read the bank from Redis.",
               [(p, up)])
        if s is not None:
            family("qualiteacher_bank_images", "gauge", "Images with at least one entry in the bank.",
                   [(p, s["images"])])
            family("qualiteacher_bank_entries", "gauge", "Pseudo-label entries in the bank.", [(p, s["entries"])])
            edges = s["histogram"]["edges"]
            family("qualiteacher_bank_entries_by_score", "gauge",
                   "Bank entries per ensemble-score bin [lower, upper) on the 0-10 scale.",
                   [(f'{p},lower="{edges[i]:g}",upper="{edges[i + 1]:g}"', c)
                    for i, c in enumerate(s["histogram"]["counts"])])
            for name in COUNTER_NAMES:
                family(f"qualiteacher_gate_{name}_total", "counter", f"Gate counter '{name}' since the bank was created.",
                       [(p, s["counters"].get(name, 0))])
            family("qualiteacher_dropped_total", "counter", "Image PL sets dropped before gating, by reason.",
                   [(f'{p},reason="{_label_value(r)}"', n) for r, n in sorted(s["drops"].items())])
            if s["teacher_version"] is not None:
                family("qualiteacher_teacher_version", "gauge", "Newest teacher weights version.",
                       [(p, s["teacher_version"])])
            if s["scorer_count"] is not None:
                family("qualiteacher_scorers", "gauge", "Size of the IQA scorer pool.", [(p, s["scorer_count"])])
            family("qualiteacher_bank_events", "gauge", "Gate events kept in the event stream.", [(p, s["events"])])
            family("qualiteacher_monitor_scrape_seconds", "gauge", "Time the monitor took to read the bank.",
                   [(p, round(scrape, 6))])
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8",
                                 headers={"Cache-Control": "no-store"})

    return app


# ---------------------------------------------------------------------------- serving
TOKEN_ENV = "QUALITEACHER_MONITOR_TOKEN"
_TOKEN_IN_URL = re.compile(r"(token=)[^&\s\"']*")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class _RedactTokens(logging.Filter):
    """Hides ``?token=...`` in uvicorn's access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_URL.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def serve(redis_url: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          prefix: str = "qt", log=print) -> None:
    """Run the monitor under uvicorn. Refuses (``ValueError``) a non-loopback ``host`` without a token.

    Neither the token nor the Redis password is ever printed or logged.
    """
    import uvicorn

    token = token or None
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to serve the monitor on {host!r} without a token: anyone who can reach it could read "
            f"the bank. Pass --token or set ${TOKEN_ENV}, or bind to 127.0.0.1")
    app = create_app(redis_url, prefix=prefix, token=token)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactTokens) for f in access.filters):
        access.addFilter(_RedactTokens())
    shown = f"[{host}]" if ":" in host else host
    log(f"monitor: http://{shown}:{port}/ (bank {prefix!r} in {redact_url(redis_url)}"
        f"{'; token required: open /?token=<token>' if token else ''})")
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
