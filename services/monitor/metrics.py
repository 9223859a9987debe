"""``/metrics``: the bank's gauges and gate counters in Prometheus text format (0.0.4). It
answers 200 while Redis is down too, with ``qualiteacher_redis_up 0``, as Prometheus expects
of an exporter whose target is down."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from qualiteacher.services.bank.store import COUNTER_NAMES
from qualiteacher.services.monitor.errors import REDIS_ERRORS
from qualiteacher.services.monitor.sources import Sources


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Families:
    """Prometheus text lines, one metric family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{{{labels}}} {float(value):.17g}" if isinstance(value, float)
                              else f"{name}{{{labels}}} {value}")


def _bank_families(out: _Families, p: str, s: dict[str, Any], scrape: float) -> None:
    out.add("qualiteacher_bank_images", "gauge", "Images with at least one entry in the bank.", [(p, s["images"])])
    out.add("qualiteacher_bank_entries", "gauge", "Pseudo-label entries in the bank.", [(p, s["entries"])])
    edges = s["histogram"]["edges"]
    out.add("qualiteacher_bank_entries_by_score", "gauge",
            "Bank entries per ensemble-score bin [lower, upper) on the 0-10 scale.",
            [(f'{p},lower="{edges[i]:g}",upper="{edges[i + 1]:g}"', c) for i, c in enumerate(s["histogram"]["counts"])])
    for name in COUNTER_NAMES:
        out.add(f"qualiteacher_gate_{name}_total", "counter", f"Gate counter '{name}' since the bank was created.",
                [(p, s["counters"].get(name, 0))])
    out.add("qualiteacher_dropped_total", "counter", "Image PL sets dropped before gating, by reason.",
            [(f'{p},reason="{_label_value(r)}"', n) for r, n in sorted(s["drops"].items())])
    if s["teacher_version"] is not None:
        out.add("qualiteacher_teacher_version", "gauge", "Newest teacher weights version.", [(p, s["teacher_version"])])
    if s["scorer_count"] is not None:
        out.add("qualiteacher_scorers", "gauge", "Size of the IQA scorer pool.", [(p, s["scorer_count"])])
    out.add("qualiteacher_bank_events", "gauge", "Gate events kept in the event stream.", [(p, s["events"])])
    out.add("qualiteacher_monitor_scrape_seconds", "gauge", "Time the monitor took to read the bank.",
            [(p, round(scrape, 6))])


def metrics_router(src: Sources) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", response_class=PlainTextResponse, tags=["monitor"],
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}})
    def metrics() -> PlainTextResponse:
        """Bank gauges and gate counters in Prometheus text format; ``qualiteacher_redis_up 0`` while
        Redis is down."""
        out, p = _Families(), f'prefix="{_label_value(src.prefix)}"'
        try:
            t0 = time.perf_counter()
            s = src.bank.stats()
            up, scrape = 1, time.perf_counter() - t0
        except REDIS_ERRORS:
            up, s, scrape = 0, None, 0.0
        out.add("qualiteacher_redis_up", "gauge", "1 when the monitor could read the bank from Redis.", [(p, up)])
        if s is not None:
            _bank_families(out, p, s, scrape)
        return PlainTextResponse("\n".join(out.lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8",
                                 headers={"Cache-Control": "no-store"})

    return router
