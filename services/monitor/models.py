"""Pydantic response models of the monitor's JSON endpoints (they make the OpenAPI docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every error the monitor returns: a short message, never a traceback."""

    error: str = Field(description="machine-readable kind: redis_unavailable, invalid_id, not_found, unauthorized, ...")
    detail: str = Field(description="what went wrong, for a person")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    redis: Literal["up"] = "up"
    prefix: str
    redis_url: str = Field(description="the Redis URL with any password replaced by ***")
    latency_ms: float = Field(description="round trip of one PING")


class Histogram(BaseModel):
    edges: list[float] = Field(description="bin edges on the 0-10 score scale (len(counts) + 1)")
    counts: list[int] = Field(description="bank entries per bin (entries now in the bank, not ever admitted)")


class BankStats(BaseModel):
    prefix: str
    images: int = Field(description="images with at least one entry")
    entries: int = Field(description="entries (pseudo-labels) in the bank")
    top_k: int | None = Field(description="entries kept per image (from the bank's meta; null before the first gate)")
    counters: dict[str, int] = Field(description="gate counters since the bank was created: gate_calls, candidates, "
                                                 "admitted, rejected, evicted, duplicates")
    drops: dict[str, int] = Field(description="image sets dropped before gating, by reason (metric_disagreement, augmentation_instability, non_finite, stale)")
    dropped_total: int
    drop_rate: float | None = Field(description="dropped sets / (dropped sets + gated sets); null before any")
    gating_rate: float | None = Field(description="admitted / candidates offered to the gate; null before any")
    histogram: Histogram
    teacher_version: int | None = Field(description="newest teacher weights version the labeller announced")
    scorer_count: int | None = Field(description="size of the IQA scorer pool the labeller announced")
    events: int = Field(description="gate events kept in the bank's event stream")
    last_event_ms: int | None = Field(description="time of the newest gate event (ms since the epoch)")
    time_ms: int = Field(description="server time of this answer (ms since the epoch)")


class ImageSummary(BaseModel):
    image_id: str
    best_score: float | None = Field(description="ensemble score (0-10) of the best entry")
    entries: int = Field(description="entries kept for this image")
    best_label_id: str | None = Field(description="label id of the best entry (changes when it is replaced)")
    thumbnail_url: str = Field(description="URL of the best entry's thumbnail")


class ImagePage(BaseModel):
    total: int = Field(description="images in the bank")
    offset: int
    limit: int
    sort: Literal["score", "id", "recent"]
    items: list[ImageSummary]


class WeightMap(BaseModel):
    rows: int
    cols: int
    values: list[float] = Field(description="block weights, row-major")


class EntryInfo(BaseModel):
    rank: int = Field(description="0 = best; the rank in .../entries/{rank}.png")
    label_id: str
    teacher_version: int
    augmentation: str
    ensemble: float = Field(description="ensemble score on the 0-10 scale")
    level: float = Field(description="the condition the student trains this label with (ensemble capped)")
    raw_scores: dict[str, float] = Field(description="each metric's raw score")
    normalized_scores: dict[str, float] = Field(description="each metric's score normalised to [0, 1], higher is better")
    teacher_q_min: float = Field(description="quality of the teacher's poorest PL for this image (preference anchor)")
    created_at_ms: int
    age_s: float = Field(description="seconds since the entry was made")
    width: int
    height: int
    channels: int
    weights: WeightMap | None = Field(description="block weight map, if the entry has one")
    image_url: str


class ImageDetail(BaseModel):
    image_id: str
    entries: list[EntryInfo]
    input_url: str | None = Field(description="URL of the degraded input, when one is stored")


class TrainingPoint(BaseModel):
    step: int = Field(description="the student's step (1-based)")
    time_ms: int = Field(description="when rank 0 logged it (ms since the epoch)")
    scalars: dict[str, float | None] = Field(
        description="tag -> value (loss/..., reward/..., train/..., bank/...; see qualiteacher/training_log.py); "
                    "null where the value was not finite")


class ProbeImage(BaseModel):
    name: str = Field(description="'input' or the score the probe inputs were restored at")
    score: float | None = Field(description="the score; null for the inputs")
    url: str = Field(description="the PNG: the probe images side by side")


class ProbeInfo(BaseModel):
    step: int = Field(description="the step the probe was made after")
    teacher_version: int
    time_ms: int
    images: int = Field(description="probe images in each strip")
    width: int = Field(description="width of one probe image (a strip is images x width wide)")
    height: int
    items: list[ProbeImage]


class TrainingHistory(BaseModel):
    points: list[TrainingPoint] = Field(description="the newest points, oldest first; where a resumed student "
                                                    "went back over steps, only its latest pass")
    tags: list[str] = Field(description="every tag in points, sorted")
    probe: ProbeInfo | None = Field(description="the latest probe images; null before the first probe")
