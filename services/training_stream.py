"""The training log in Redis: the student's scalars as a capped stream, its latest probe images.

The student's rank 0 writes (`services/training_log.py`) and the monitor reads, so data moves
one way: student -> Redis -> monitor, and the monitor's training panel outlives both a
monitor restart and the job. Values are text (a float's ``repr``), JSON or PNG bytes, never
pickles. Keys: ``{prefix}:train`` and ``{prefix}:train:probe`` (`qualiteacher.services.bank.keys`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import redis
from qualiteacher.services.bank.keys import BankKeys

from qualiteacher.training_log import PROBE_NAME

DEFAULT_MAXLEN = 10_000  # points kept (approximately: MAXLEN ~ trims whole stream nodes)
STEP = "step"
META = "meta"


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _number(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None  # JSON has no NaN


class TrainingStream:
    """One run's training log under a bank prefix; ``client`` returns bytes (`redis_client`)."""

    def __init__(self, client: redis.Redis, prefix: str = "qt", maxlen: int = DEFAULT_MAXLEN) -> None:
        self.client = client
        self.keys = BankKeys(prefix)
        self.maxlen = int(maxlen)

    # ---------------------------------------------------------------- the student's side
    def reset(self) -> None:
        """A student starting at step 0: the points and probes of an earlier run go."""
        self.client.delete(self.keys.train, self.keys.train_probe)

    def add(self, step: int, scalars: Mapping[str, float]) -> None:
        fields = {STEP: int(step), **{tag: repr(float(v)) for tag, v in scalars.items()}}
        self.client.xadd(self.keys.train, fields, maxlen=self.maxlen, approximate=True)

    def put_probes(self, step: int, teacher_version: int, pngs: Mapping[str, bytes], images: int,
                   width: int, height: int) -> None:
        """Replace the latest probes at once (one transaction): a reader never sees two probes mixed."""
        for name in pngs:
            if not PROBE_NAME.fullmatch(name):
                raise ValueError(f"invalid probe name {name!r}")
        meta = {"step": int(step), "teacher_version": int(teacher_version), "time_ms": int(time.time() * 1000),
                "names": list(pngs), "images": int(images), "width": int(width), "height": int(height)}
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.train_probe)
        pipe.hset(self.keys.train_probe, mapping={META: json.dumps(meta), **{f"png:{n}": b for n, b in pngs.items()}})
        pipe.execute()

    # ---------------------------------------------------------------- the monitor's side
    def points(self, count: int) -> list[dict[str, Any]]:
        """The newest ``count`` points, oldest first: ``{step, time_ms, scalars}`` (see `latest_attempt`)."""
        rows = self.client.xrevrange(self.keys.train, count=int(count))
        points = []
        for entry_id, fields in reversed(rows):
            values = {_s(k): _s(v) for k, v in fields.items()}
            step = values.pop(STEP, None)
            if step is None:
                continue
            points.append({"step": int(step), "time_ms": int(_s(entry_id).split("-")[0]),
                           "scalars": {tag: _number(v) for tag, v in sorted(values.items())}})
        return latest_attempt(points)

    def probe(self, name: str | None = None) -> tuple[bytes | None, bytes | None]:
        """The latest probe's metadata (JSON bytes) and its PNG ``name`` (None: no PNG), in one
        read, so the two belong to the same probe."""
        if name is None:
            return self.client.hget(self.keys.train_probe, META), None
        if not PROBE_NAME.fullmatch(name):
            raise ValueError(f"invalid probe name {name!r}")
        meta, png = self.client.hmget(self.keys.train_probe, [META, f"png:{name}"])
        return meta, png


def latest_attempt(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``points`` (oldest first) without those a resumed student went back over: walking back
    from the newest, a point stays only when its step is below every step kept after it. A
    worker that died at step 30 and resumed from its checkpoint at 20 leaves one curve."""
    kept: list[dict[str, Any]] = []
    for point in reversed(points):
        if not kept or point["step"] < kept[-1]["step"]:
            kept.append(point)
    return kept[::-1]
