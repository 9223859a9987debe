"""The Redis memory bank: per-image top-k pseudo-labels, gated atomically by ``gate.lua``.

Everything stored is protobuf (``protos/bank_entry.proto``): ``BankEntry`` bytes in, the
same bytes out; nothing is ever unpickled. The key layout is documented in
:mod:`services.bank.keys`.

Gating rule: exactly ``qualiteacher.method.gating.gate`` with its ``seen`` set (top-k by
ensemble desc, ties by label id asc, first occurrence of a label id wins, and a label id
that was gated before for the image, even if it was rejected or later evicted, is
ignored). The seen set lives in Redis, so replays after a crash or a retried EVALSHA are
no-ops and an evicted PL never comes back.

Reads (``entries``, ``sample_sets``, ``list_images``, ``max_entries_per_image``) are small
Lua scripts too, so each one sees one consistent state of the bank.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import numpy as np
import redis

from protos import bank_entry_pb2 as pb
from qualiteacher.method.augment import KNOWN_AUGMENTATIONS
from services.bank.keys import HIST_BINS, BankKeys, hist_bin, validate_id

BankEntry = pb.BankEntry
SORTS = ("score", "id", "recent")
DEFAULT_EVENTS_MAXLEN = 10_000
COUNTER_NAMES = ("gate_calls", "candidates", "admitted", "rejected", "evicted", "duplicates")


# ---------------------------------------------------------------------------- payloads
def encode_image(array: np.ndarray, fmt: str = "png", compress_level: int = 1) -> pb.Image:
    """An ``Image`` message from a uint8 array of shape HxW, HxWx1, HxWx3 or HxWx4.

    ``fmt="png"`` (lossless, Pillow, ``compress_level`` 0-9; 1 is fast and already
    small for natural images) or ``"raw"`` (the bytes as they are, C order).
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"PL image must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"PL image must be HxW or HxWxC with C in 1, 3, 4; got shape {arr.shape}")
    h, w, c = (int(s) for s in arr.shape)
    msg = pb.Image(height=h, width=w, channels=c)
    if fmt == "raw":
        msg.raw_uint8 = np.ascontiguousarray(arr).tobytes()
    elif fmt == "png":
        from PIL import Image as PILImage

        mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
        img = PILImage.fromarray(np.ascontiguousarray(arr[:, :, 0] if c == 1 else arr), mode=mode)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=int(compress_level))
        msg.png = buf.getvalue()
    else:
        raise ValueError(f"unknown image format {fmt!r}: use 'png' or 'raw'")
    return msg


def decode_image(msg: pb.Image) -> np.ndarray:
    """The uint8 HxWxC array of an ``Image`` message (shape checked against the header)."""
    h, w, c = int(msg.height), int(msg.width), int(msg.channels)
    kind = msg.WhichOneof("payload")
    if kind == "raw_uint8":
        data = np.frombuffer(msg.raw_uint8, dtype=np.uint8)
        if data.size != h * w * c:
            raise ValueError(f"raw image has {data.size} bytes, header says {h}x{w}x{c}")
        return data.reshape(h, w, c).copy()
    if kind == "png":
        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(msg.png)) as img:
            arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape != (h, w, c):
            raise ValueError(f"PNG decodes to {arr.shape}, header says {(h, w, c)}")
        return np.ascontiguousarray(arr)
    raise ValueError("Image message has no payload")


def encode_weights(weights: np.ndarray) -> pb.WeightMap:
    """A ``WeightMap`` from a 2-D block-weight array (rows x cols)."""
    arr = np.asarray(weights, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"block weight map must be 2-D, got shape {arr.shape}")
    return pb.WeightMap(rows=arr.shape[0], cols=arr.shape[1], values=arr.ravel().tolist())


def decode_weights(msg: pb.WeightMap) -> np.ndarray:
    arr = np.asarray(msg.values, dtype=np.float32)
    if arr.size != msg.rows * msg.cols:
        raise ValueError(f"weight map has {arr.size} values, header says {msg.rows}x{msg.cols}")
    return arr.reshape(int(msg.rows), int(msg.cols))


def build_entry(
    image_id: str,
    label_id: str,
    *,
    ensemble: float,
    image: np.ndarray | pb.Image,
    teacher_version: int = 0,
    augmentation: str = "identity",
    raw_scores: Mapping[str, float] | None = None,
    normalized_scores: Mapping[str, float] | None = None,
    level_cap: float = 7.0,
    weights: np.ndarray | pb.WeightMap | None = None,
    image_format: str = "png",
    created_at_ms: int | None = None,
    teacher_q_min: float = 0.0,
    ladder: Mapping[float, float] | None = None,
) -> pb.BankEntry:
    """Assemble a ``BankEntry``; ``level = min(ensemble, level_cap)``; ``ladder``: blend weight
    -> level of this label's rungs (`qualiteacher.method.ladder`), levels capped too."""
    validate_id(image_id)
    validate_id(label_id, "label id")
    if augmentation not in KNOWN_AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}: one of {KNOWN_AUGMENTATIONS}")
    entry = pb.BankEntry(
        image_id=image_id,
        label_id=label_id,
        teacher_version=int(teacher_version),
        augmentation=augmentation,
        ensemble=float(ensemble),
        level=min(float(ensemble), float(level_cap)),
        created_at_ms=int(time.time() * 1000) if created_at_ms is None else int(created_at_ms),
        teacher_q_min=float(teacher_q_min),
    )
    for alpha, level in (ladder or {}).items():
        entry.ladder_alphas.append(float(alpha))
        entry.ladder_levels.append(min(float(level), float(level_cap)))
    entry.raw_scores.update({k: float(v) for k, v in (raw_scores or {}).items()})
    entry.normalized_scores.update({k: float(v) for k, v in (normalized_scores or {}).items()})
    if weights is not None:
        entry.weights.CopyFrom(weights if isinstance(weights, pb.WeightMap) else encode_weights(weights))
    entry.image.CopyFrom(image if isinstance(image, pb.Image) else encode_image(image, image_format))
    return entry


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


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _load_lua(name: str) -> str:
    return resources.files("services.bank").joinpath(name).read_text(encoding="utf-8")


# Payloads of one image in rank order: {label, payload-or-false, ...}
_ENTRIES_LUA = """
local labels = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i, label in ipairs(labels) do
  out[#out + 1] = label
  out[#out + 1] = redis.call('GET', ARGV[1] .. label)
end
return out
"""

# Uniform over images; each pick returns all of that image's entries, best first (one
# atomic read per image, so a set never mixes two states of the bank).
# ARGV[1] = key prefix, ARGV[2..] = uniforms in [0, 1). KEYS[1] = idx:lex.
_SAMPLE_SETS_LUA = """
local n_img = redis.call('ZCARD', KEYS[1])
local out = {}
if n_img == 0 then return out end
local p = ARGV[1]
for i = 2, #ARGV do
  local a = math.floor(tonumber(ARGV[i]) * n_img)
  if a >= n_img then a = n_img - 1 end
  local img = redis.call('ZRANGE', KEYS[1], a, a)[1]
  local set = {}
  for _, label in ipairs(redis.call('ZRANGE', p .. ':img:' .. img .. ':rank', 0, -1)) do
    local payload = redis.call('GET', p .. ':e:' .. img .. ':' .. label)
    if payload then set[#set + 1] = payload end
  end
  if #set > 0 then out[#out + 1] = set end
end
return out
"""

# A page of images: {image, -best score, count, ...}. KEYS: idx:best, idx:lex, idx:recent.
# ARGV: key prefix, mode, offset, limit.
_LIST_LUA = """
local p, mode, off, lim = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ids
if mode == 'score' then
  ids = redis.call('ZRANGE', KEYS[1], off, off + lim - 1)
elseif mode == 'id' then
  ids = redis.call('ZRANGEBYLEX', KEYS[2], '-', '+', 'LIMIT', off, lim)
else
  ids = redis.call('ZREVRANGE', KEYS[3], off, off + lim - 1)
end
local out = {}
for _, img in ipairs(ids) do
  local rank = p .. ':img:' .. img .. ':rank'
  local best = redis.call('ZRANGE', rank, 0, 0, 'WITHSCORES')
  out[#out + 1] = img
  out[#out + 1] = best[2] or false
  out[#out + 1] = redis.call('ZCARD', rank)
end
return out
"""

# The most entries one image holds (0 when empty). KEYS[1] = idx:lex, ARGV[1] = key prefix.
_MOST_LUA = """
local most = 0
for _, img in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  most = math.max(most, redis.call('ZCARD', ARGV[1] .. ':img:' .. img .. ':rank'))
end
return most
"""


# ---------------------------------------------------------------------------- the bank
class MemoryBank:
    """Per-image top-k pseudo-label bank in Redis under the key prefix ``prefix``.

    ``client`` must return bytes (``decode_responses=False``), e.g.
    ``services.redis_server.redis_client(url)``. All processes sharing a prefix must use
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
        self.prefix = prefix
        self.top_k = int(top_k)
        self.events_maxlen = int(events_maxlen)
        self._gate = client.register_script(_load_lua("gate.lua"))
        self._entries = client.register_script(_ENTRIES_LUA)
        self._sample_sets = client.register_script(_SAMPLE_SETS_LUA)
        self._list = client.register_script(_LIST_LUA)
        self._most = client.register_script(_MOST_LUA)

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
                args=[image_id, self.top_k, f"{k.entry_prefix()}{image_id}:", self.events_maxlen,
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
        flat = self._entries(keys=[k.rank(image_id)], args=[f"{k.entry_prefix()}{image_id}:"])
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

    # ---------------------------------------------------------------- counters and meta
    def record_drop(self, reason: str, n: int = 1) -> int:
        """Count ``n`` candidates dropped for ``reason`` (e.g. ``multi``, ``aug``)."""
        validate_id(reason, "drop reason")
        return int(self.client.hincrby(self.keys.counters, f"drop:{reason}", int(n)))

    def set_teacher_version(self, version: int) -> None:
        self.client.hset(self.keys.meta, "teacher_version", int(version))

    def teacher_version(self) -> int | None:
        v = self.client.hget(self.keys.meta, "teacher_version")
        return None if v is None else int(v)

    def set_scorer_count(self, n: int) -> None:
        self.client.hset(self.keys.meta, "scorer_count", int(n))

    def scorer_count(self) -> int | None:
        v = self.client.hget(self.keys.meta, "scorer_count")
        return None if v is None else int(v)

    def stats(self) -> dict[str, Any]:
        """Counts, gate counters, drops by reason, score histogram (10 bins over 0-10), meta."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.keys.counters)
        pipe.hgetall(self.keys.meta)
        pipe.xlen(self.keys.events)
        raw, meta, n_events = pipe.execute()
        c = {_s(k): int(v) for k, v in raw.items()}
        m = {_s(k): _s(v) for k, v in meta.items()}
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
            "teacher_version": int(m["teacher_version"]) if "teacher_version" in m else None,
            "scorer_count": int(m["scorer_count"]) if "scorer_count" in m else None,
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
        k = self.keys
        problems: list[str] = []
        cli = self.client
        images: dict[str, list[tuple[str, float]]] = {}
        for key in self._scan(k.rank_pattern()):
            image_id = k.parse_rank(key)
            members = [(_s(m), float(s)) for m, s in cli.zrange(key, 0, -1, withscores=True)]
            if members:
                images[image_id] = members
            else:  # pragma: no cover - Redis deletes empty zsets
                problems.append(f"{image_id}: empty rank set")
        payload_keys = set(self._scan(k.entry_pattern()))

        hist = [0] * HIST_BINS
        n_entries = 0
        for image_id, members in images.items():
            if len(members) > self.top_k:
                problems.append(f"{image_id}: {len(members)} entries > top_k {self.top_k}")
            labels = [m for m, _ in members]
            if len(set(labels)) != len(labels):
                problems.append(f"{image_id}: label id twice in rank set")
            seen = {_s(x) for x in cli.smembers(k.seen(image_id))}
            decoded: list[tuple[str, float]] = []
            for label, neg in members:
                n_entries += 1
                hist[hist_bin(-neg)] += 1
                if label not in seen:
                    problems.append(f"{image_id}/{label}: in bank but not in seen set")
                key = k.entry(image_id, label)
                raw = cli.get(key)
                if raw is None:
                    problems.append(f"{image_id}/{label}: payload missing")
                    continue
                payload_keys.discard(key)
                try:
                    e = pb.BankEntry.FromString(raw)
                except Exception as exc:  # noqa: BLE001 - report, do not crash
                    problems.append(f"{image_id}/{label}: payload does not parse ({exc})")
                    continue
                if e.image_id != image_id or e.label_id != label:
                    problems.append(f"{image_id}/{label}: payload is for {e.image_id}/{e.label_id}")
                if e.ensemble != -neg:
                    problems.append(f"{image_id}/{label}: rank score {-neg!r} != payload ensemble {e.ensemble!r}")
                decoded.append((e.label_id, e.ensemble))
            order = sorted(decoded, key=lambda t: (-t[1], t[0]))
            if decoded != order:
                problems.append(f"{image_id}: entries not ordered by (score desc, label id asc)")
            best = cli.zscore(k.idx_best, image_id)
            if best is None or float(best) != members[0][1]:
                problems.append(f"{image_id}: idx:best score {best!r} != best entry {members[0][1]!r}")
            if cli.zscore(k.idx_lex, image_id) is None:
                problems.append(f"{image_id}: missing from idx:lex")
            if cli.zscore(k.idx_recent, image_id) is None:
                problems.append(f"{image_id}: missing from idx:recent")

        for key in sorted(payload_keys):
            problems.append(f"orphan payload {key}")
        for idx in (k.idx_best, k.idx_lex, k.idx_recent):
            for m in cli.zrange(idx, 0, -1):
                if _s(m) not in images:
                    problems.append(f"{idx} lists {_s(m)!r}, which has no entries")

        c = {_s(a): int(b) for a, b in cli.hgetall(k.counters).items()}
        if c.get("images", 0) != len(images):
            problems.append(f"counter images={c.get('images', 0)} but {len(images)} images stored")
        if c.get("entries", 0) != n_entries:
            problems.append(f"counter entries={c.get('entries', 0)} but {n_entries} entries stored")
        if c.get("admitted", 0) - c.get("evicted", 0) != n_entries:
            problems.append(f"admitted - evicted = {c.get('admitted', 0) - c.get('evicted', 0)} != {n_entries} entries")
        if c.get("candidates", 0) != c.get("admitted", 0) + c.get("rejected", 0) + c.get("duplicates", 0):
            problems.append("candidates != admitted + rejected + duplicates")
        counted = [c.get(f"hist:{i}", 0) for i in range(HIST_BINS)]
        if counted != hist:
            problems.append(f"histogram counters {counted} != contents {hist}")
        return problems
