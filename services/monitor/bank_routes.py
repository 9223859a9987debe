"""The bank's routes: stats, pages of images, one image's entries, and their PNGs."""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from qualiteacher.protos import bank_entry_pb2 as pb
from qualiteacher.services.bank.keys import ID_PATTERN, validate_id
from qualiteacher.services.job_status import JobStatus
from qualiteacher.services.monitor.errors import (
    ERROR_RESPONSES,
    ID_RESPONSES,
    PNG_RESPONSES,
    ApiError,
)
from qualiteacher.services.monitor.images import entry_as_png, not_modified, png_bytes, png_response
from qualiteacher.services.monitor.models import (
    BankStats,
    EntryInfo,
    Histogram,
    ImageDetail,
    ImagePage,
    ImageSummary,
    WeightMap,
)
from qualiteacher.services.monitor.sources import Sources

MAX_PAGE = 200
MAX_THUMB = 512
MIN_THUMB = 16
MAX_RANK = 63

# The id rule in the OpenAPI schema (so clients and fuzzers know it); enforced by check_id,
# which answers 422 "invalid_id" rather than FastAPI's generic validation error.
ImageId = Annotated[str, Path(description=f"image id, matching {ID_PATTERN}",
                              json_schema_extra={"pattern": ID_PATTERN})]
ThumbSize = Annotated[int | None, Query(ge=MIN_THUMB, le=MAX_THUMB,
                                        description="longer side of a thumbnail, in pixels")]


def check_id(image_id: str) -> str:
    try:
        return validate_id(image_id)
    except ValueError:
        raise ApiError(422, "invalid_id", f"invalid image id: must match {ID_PATTERN}") from None


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _entry_info(image_id: str, rank: int, e: pb.BankEntry, now_ms: float) -> EntryInfo:
    weights = None
    if e.HasField("weights") and e.weights.rows:
        weights = WeightMap(rows=e.weights.rows, cols=e.weights.cols, values=list(e.weights.values))
    return EntryInfo(
        rank=rank, label_id=e.label_id, teacher_version=e.teacher_version,
        augmentation=e.augmentation, ensemble=e.ensemble, level=e.level,
        raw_scores=dict(e.raw_scores), normalized_scores=dict(e.normalized_scores),
        teacher_q_min=e.teacher_q_min, created_at_ms=e.created_at_ms,
        age_s=round(max(0.0, now_ms - e.created_at_ms) / 1000, 3),
        width=e.image.width, height=e.image.height, channels=e.image.channels,
        weights=weights, image_url=f"/bank/images/{image_id}/entries/{rank}.png",
    )


def bank_router(src: Sources) -> APIRouter:
    router = APIRouter()
    bank, client = src.bank, src.client

    @router.get("/bank/stats", response_model=BankStats, responses=ERROR_RESPONSES, tags=["bank"])
    def bank_stats() -> BankStats:
        """Bank size, score histogram, drops by reason, gating and drop rates, teacher version, scorers."""
        s = bank.stats()
        pipe = client.pipeline(transaction=False)
        bank.status.queue_read(pipe)
        pipe.xrevrange(bank.keys.events, count=1)
        status_raw, last = pipe.execute()
        counters = {k: int(v) for k, v in s["counters"].items()}
        drops = {k: int(v) for k, v in s["drops"].items()}
        dropped = sum(drops.values())
        gated = counters.get("gate_calls", 0)
        cand = counters.get("candidates", 0)
        last_ms = int(last[0][0].decode().split("-")[0]) if last else None
        return BankStats(
            prefix=src.prefix, images=s["images"], entries=s["entries"],
            top_k=JobStatus.decode(status_raw).top_k,
            counters=counters, drops=drops, dropped_total=dropped,
            drop_rate=dropped / (dropped + gated) if dropped + gated else None,
            gating_rate=counters.get("admitted", 0) / cand if cand else None,
            histogram=Histogram(**s["histogram"]),
            teacher_version=s["teacher_version"], scorer_count=s["scorer_count"],
            events=s["events"], last_event_ms=last_ms, time_ms=int(time.time() * 1000),
        )

    @router.get("/bank/images", response_model=ImagePage, responses=ERROR_RESPONSES | {422: ID_RESPONSES[422]},
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

    @router.get("/bank/images/{image_id}", response_model=ImageDetail, responses=ID_RESPONSES, tags=["bank"])
    def bank_image(image_id: ImageId) -> ImageDetail:
        """One image's entries, best first, with raw and normalised scores per metric."""
        check_id(image_id)
        entries = bank.entries(image_id)
        has_input = bool(client.exists(src.inputs.key(image_id)))
        if not entries and not has_input:
            raise ApiError(404, "not_found", f"no image {image_id!r} in the bank")
        now_ms = time.time() * 1000
        infos = [_entry_info(image_id, rank, e, now_ms) for rank, e in enumerate(entries)]
        return ImageDetail(image_id=image_id, entries=infos,
                           input_url=f"/bank/images/{image_id}/input.png" if has_input else None)

    @router.get("/bank/images/{image_id}/entries/{rank}.png", response_class=Response,
                responses=PNG_RESPONSES, tags=["bank"])
    def entry_png(
        request: Request,
        image_id: ImageId,
        rank: Annotated[int, Path(ge=0, le=MAX_RANK, description="0 = the best entry")],
        size: ThumbSize = None,
    ) -> Response:
        """The pseudo-label of the image's entry at ``rank`` as PNG (a thumbnail with ``size``)."""
        check_id(image_id)
        for _ in range(3):  # the entry may be evicted between the two reads: look again
            labels = bank.labels(image_id)
            if rank >= len(labels):
                raise ApiError(404, "not_found", f"image {image_id!r} has {len(labels)} entries, no rank {rank}")
            label = labels[rank]
            etag = f'"{label}-{size or 0}"'
            if request.headers.get("if-none-match") == etag:
                return not_modified(etag)
            raw = client.get(bank.keys.entry(image_id, label))
            if raw is not None:
                return png_response(entry_as_png(pb.BankEntry.FromString(raw), size), etag)
        raise ApiError(404, "not_found", f"entry {rank} of {image_id!r} changed while reading it; retry")

    @router.get("/bank/images/{image_id}/input.png", response_class=Response, responses=PNG_RESPONSES,
                tags=["bank"])
    def input_png(image_id: ImageId, size: ThumbSize = None) -> Response:
        """The degraded input the teachers labelled, as PNG."""
        check_id(image_id)
        raw = client.get(src.inputs.key(image_id))
        if raw is None:
            raise ApiError(404, "not_found", f"no input stored for image {image_id!r}")
        return png_response(png_bytes(raw, size), etag=f'"input-{size or 0}"')

    return router
