"""The Redis memory bank: per-image top-k pseudo-labels, gated atomically by ``gate.lua``.

Everything stored is protobuf (``protos/bank_entry.proto``): ``BankEntry`` bytes in, the
same bytes out; nothing is ever unpickled. The key layout is documented in
:mod:`qualiteacher.services.bank.keys`.

Gating rule: exactly ``qualiteacher.method.gating.gate`` with its ``seen`` set (top-k by
ensemble desc, ties by label id asc, first occurrence of a label id wins, and a label id
that was gated before for the image, even if it was rejected or later evicted, is
ignored). The seen set lives in Redis, so replays after a crash or a retried EVALSHA are
no-ops and an evicted PL never comes back.

Reads (``entries``, ``sample_sets``, ``list_images``, ``max_entries_per_image``) are small
Lua scripts too (``entries.lua``, ``sample_sets.lua``, ``list.lua``, ``most.lua``), so each
one sees one consistent state of the bank. The records themselves are built and decoded in
:mod:`qualiteacher.services.bank.codec`; the consistency check is :mod:`qualiteacher.services.bank.check`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import redis
from qualiteacher.protos import bank_entry_pb2 as pb
from qualiteacher.services.bank.check import check_invariants
from qualiteacher.services.bank.keys import (
    HIST_BINS,
    BankKeys,
    lua_key_functions,
    validate_id,
)
from qualiteacher.services.bank.keys import as_str as _s
from qualiteacher.services.job_status import JobStatus, JobStatusHash

SORTS = ("score", "id", "recent")
DEFAULT_EVENTS_MAXLEN = 10_000
COUNTER_NAMES = ("gate_calls", "candidates", "admitted", "rejected", "evicted", "duplicates")


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class GateOutcome:
    """What one gate call did (label ids; ``kept`` is the bank after the call, best first)."""

    image_id: str
    admitted: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


class _Uniform(Protocol):
    def random(self) -> float: ...


def _load_lua(name: str) -> str:
    """A bank script, after the key builders of keys.py (the key layout's one home)."""
    script = resources.files("qualiteacher.services.bank").joinpath(name).read_text(encoding="utf-8")
    return lua_key_functions() + script


# ---------------------------------------------------------------------------- the bank
class MemoryBank:
    """Per-image top-k pseudo-label bank in Redis under the key prefix ``prefix``.

    ``client`` must return bytes (``decode_responses=False``), e.g.
    ``qualiteacher.services.redis_server.redis_client(url)``. All processes sharing a prefix must use
    the same ``top_k``; the gate refuses a different one.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "qt",
        top_k: int = 3,
        *,
        events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
    ) -> None:
        if int(top_k) < 1:
            raise ValueError("top_k must be >= 1")
        if client.get_encoder().decode_responses:
            raise ValueError("MemoryBank needs a client with decode_responses=False (payloads are bytes)")
        self.client = client
        self.keys = BankKeys(prefix)
        self.status = JobStatusHash(client, prefix)  # the job's status hash, beside the bank
        self.prefix = prefix
        self.top_k = int(top_k)
        self.events_maxlen = int(events_maxlen)
        self._gate = client.register_script(_load_lua("gate.lua"))
        self._entries = client.register_script(_load_lua("entries.lua"))
        self._sample_sets = client.register_script(_load_lua("sample_sets.lua"))
        self._list = client.register_script(_load_lua("list.lua"))
        self._most = client.register_script(_load_lua("most.lua"))

    # ---------------------------------------------------------------- gate
    def gate(self, image_id: str, entries: Sequence[pb.BankEntry]) -> GateOutcome:
        """Offer ``entries`` (candidates that passed both drops) to ``image_id``'s bank.

        Atomic; safe to retry or replay (label ids already gated are ignored).
        """
        validate_id(image_id)
        if not entries:
            return GateOutcome(image_id, kept=self._kept(image_id))
        args: list[Any] = []
        version = 0
        for e in entries:
            if e.image_id != image_id:
                raise ValueError(f"entry {e.label_id!r} is for image {e.image_id!r}, not {image_id!r}")
            validate_id(e.label_id, "label id")
            score = float(e.ensemble)
            if not math.isfinite(score):
                raise ValueError(f"entry {e.label_id!r} has a non-finite ensemble score {score!r}")
            version = max(version, int(e.teacher_version))
            args += [e.label_id, repr(-score), e.SerializeToString()]
        k = self.keys
        try:
            res = self._gate(
                keys=[k.rank(image_id), k.seen(image_id), k.idx_best, k.idx_lex, k.idx_recent,
                      k.counters, k.events, k.meta],
                args=[image_id, self.top_k, self.prefix, self.events_maxlen,
                      version, len(entries), *args],
            )
        except redis.ResponseError as exc:
            if "qt-gate" in str(exc):
                raise ValueError(str(exc)) from exc
            raise
        admitted, evicted, rejected, duplicates, kept = ([_s(x) for x in part] for part in res)
        return GateOutcome(image_id, admitted, evicted, rejected, duplicates, kept)

    def _kept(self, image_id: str) -> list[str]:
        return [_s(x) for x in self.client.zrange(self.keys.rank(image_id), 0, -1)]

    # ---------------------------------------------------------------- reads
    def entries(self, image_id: str) -> list[pb.BankEntry]:
        """The image's bank, best first (empty if the image has none)."""
        k = self.keys
        flat = self._entries(keys=[k.rank(image_id)], args=[self.prefix, image_id])
        return [pb.BankEntry.FromString(flat[i + 1]) for i in range(0, len(flat), 2) if flat[i + 1]]

    def labels(self, image_id: str) -> list[str]:
        """Label ids in the image's bank, best first."""
        return self._kept(image_id)

    def num_images(self) -> int:
        return int(self.client.zcard(self.keys.idx_lex))

    def list_images(self, offset: int = 0, limit: int = 50, sort: str = "score") -> list[tuple[str, float, int]]:
        """A page of ``(image_id, best_score, count)``.

        ``sort``: ``"score"`` (best score desc, then id), ``"id"`` (id asc) or
        ``"recent"`` (most recently changed first).
        """
        if sort not in SORTS:
            raise ValueError(f"unknown sort {sort!r}: one of {SORTS}")
        offset, limit = int(offset), int(limit)
        if offset < 0 or limit < 0:
            raise ValueError("offset and limit must be >= 0")
        if limit == 0:
            return []
        k = self.keys
        flat = self._list(keys=[k.idx_best, k.idx_lex, k.idx_recent], args=[self.prefix, sort, offset, limit])
        out = []
        for i in range(0, len(flat), 3):
            neg = flat[i + 1]
            out.append((_s(flat[i]), -float(neg) if neg else float("nan"), int(flat[i + 2])))
        return out

    def max_entries_per_image(self) -> int:
        """The most entries any one image holds (0 for an empty bank), in one round trip."""
        return int(self._most(keys=[self.keys.idx_lex], args=[self.prefix]))

    def sample_sets(self, n: int, rng: _Uniform | None = None) -> list[list[pb.BankEntry]]:
        """``n`` images drawn uniformly with replacement, each with all its entries, best
        first (what a student needs to train one input at every label's score at once).
        Returns fewer than ``n`` only when the bank is empty (then ``[]``)."""
        rng = rng if rng is not None else random.Random()
        if n <= 0:
            return []
        args = [self.prefix] + [repr(float(rng.random())) for _ in range(int(n))]
        sets = self._sample_sets(keys=[self.keys.idx_lex], args=args)
        return [[pb.BankEntry.FromString(b) for b in payloads] for payloads in sets]

    # ---------------------------------------------------------------- counters
    def record_drop(self, reason: str, n: int = 1) -> int:
        """Count ``n`` candidates dropped for ``reason`` (e.g. ``multi``, ``aug``)."""
        validate_id(reason, "drop reason")
        return int(self.client.hincrby(self.keys.counters, f"drop:{reason}", int(n)))

    def stats(self) -> dict[str, Any]:
        """Counts, gate counters, drops by reason, score histogram (10 bins over 0-10), and the
        teacher version and scorer count of the job's status."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.keys.counters)
        self.status.queue_read(pipe)
        pipe.xlen(self.keys.events)
        raw, status_raw, n_events = pipe.execute()
        c = {_s(k): int(v) for k, v in raw.items()}
        status = JobStatus.decode(status_raw)
        return {
            "prefix": self.prefix,
            "top_k": self.top_k,
            "images": c.get("images", 0),
            "entries": c.get("entries", 0),
            "counters": {name: c.get(name, 0) for name in COUNTER_NAMES},
            "drops": {k[len("drop:"):]: v for k, v in sorted(c.items()) if k.startswith("drop:")},
            "histogram": {
                "edges": [float(i) for i in range(HIST_BINS + 1)],
                "counts": [c.get(f"hist:{i}", 0) for i in range(HIST_BINS)],
            },
            "teacher_version": status.teacher_version,
            "scorer_count": status.scorer_count,
            "events": int(n_events),
        }

    def events(self, count: int = 100) -> list[dict[str, Any]]:
        """The last ``count`` gate events, oldest first."""
        rows = self.client.xrevrange(self.keys.events, count=int(count))
        out = []
        for event_id, fields in reversed(rows):
            f = {_s(k): _s(v) for k, v in fields.items()}
            eid = _s(event_id)

            def ids(name: str, f: dict[str, str] = f) -> list[str]:
                return [x for x in f.get(name, "").split(",") if x]

            out.append({
                "id": eid,
                "time_ms": int(eid.split("-")[0]),
                "image_id": f.get("image_id", ""),
                "admitted": ids("admitted"),
                "evicted": ids("evicted"),
                "rejected": ids("rejected"),
                "duplicates": ids("duplicates"),
                "teacher_version": int(f.get("teacher_version", 0)),
            })
        return out

    # ---------------------------------------------------------------- maintenance
    def _scan(self, pattern: str) -> Iterable[str]:
        for key in self.client.scan_iter(match=pattern, count=1000):
            yield _s(key)

    def clear(self) -> int:
        """Delete every key of this bank's prefix; return how many."""
        n = 0
        batch: list[str] = []
        for key in self._scan(self.keys.all_pattern()):
            batch.append(key)
            if len(batch) >= 500:
                n += int(self.client.unlink(*batch))
                batch = []
        if batch:
            n += int(self.client.unlink(*batch))
        return n

    def memory_usage(self) -> int:
        """Bytes Redis reports (``MEMORY USAGE``) for all keys of this bank."""
        return sum(int(self.client.memory_usage(key, samples=0) or 0) for key in self._scan(self.keys.all_pattern()))

    def check_invariants(self) -> list[str]:
        """Problems found in the bank (empty list when consistent). Scans the prefix: O(bank)."""
        return check_invariants(self.client, self.keys, self.top_k)
