"""The training panel's routes: the student's training log and its probe images, read from
Redis (`qualiteacher.services.training_stream`), never written."""

from __future__ import annotations

import json
import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from qualiteacher.services.monitor.errors import (
    ERROR_RESPONSES,
    ID_RESPONSES,
    PNG_RESPONSES,
    ApiError,
)
from qualiteacher.services.monitor.images import not_modified, png_response
from qualiteacher.services.monitor.models import (
    ErrorResponse,
    ProbeImage,
    ProbeInfo,
    TrainingHistory,
    TrainingPoint,
)
from qualiteacher.services.monitor.sources import Sources

from qualiteacher.training_log import PROBE_NAME, probe_name

log = logging.getLogger(__name__)

MAX_POINTS = 10_000


def probe_info(raw: bytes | None) -> ProbeInfo | None:
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


def checked_probe_name(name: str) -> str:
    """``input`` or a score in the form the student names it (``3.0`` -> ``3``), else 422."""
    if PROBE_NAME.fullmatch(name) and name != "input":
        name = probe_name(float(name))
    if not PROBE_NAME.fullmatch(name):
        raise ApiError(422, "invalid_probe", f"invalid probe name: 'input' or a score matching {PROBE_NAME.pattern}")
    return name


def training_router(src: Sources) -> APIRouter:
    router = APIRouter()
    training = src.training

    @router.get("/api/training", response_model=TrainingHistory,
                responses=ERROR_RESPONSES | {422: ID_RESPONSES[422]}, tags=["training"])
    def training_history(
        limit: Annotated[int, Query(ge=1, le=MAX_POINTS, description=f"newest points, at most {MAX_POINTS}")] = 2000,
    ) -> TrainingHistory:
        """The student's training log: scalars per logged step, and the latest probe images."""
        points = [TrainingPoint(**p) for p in training.points(limit)]
        tags = sorted({tag for p in points for tag in p.scalars})
        return TrainingHistory(points=points, tags=tags, probe=probe_info(training.probe()[0]))

    @router.get("/api/training/probe/{name}.png", response_class=Response, responses=PNG_RESPONSES | {
        404: {"model": ErrorResponse, "description": "no probe image of that name yet"}}, tags=["training"])
    def probe_png(
        request: Request,
        name: Annotated[str, Path(description="'input' or a probe score (3, 5, 7, ...)",
                                  json_schema_extra={"pattern": PROBE_NAME.pattern})],
    ) -> Response:
        """The latest probe images at one score (or their inputs), side by side, as PNG."""
        name = checked_probe_name(name)
        meta, data = training.probe(name)
        info = probe_info(meta)
        if data is None or info is None:
            raise ApiError(404, "not_found", f"no probe image {name!r} yet")
        etag = f'"probe-{info.step}-{name}"'
        if request.headers.get("if-none-match") == etag:
            return not_modified(etag)
        return png_response(data, etag)

    return router
