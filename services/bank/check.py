"""The bank's consistency check: what ``gate.lua`` promises, read back from Redis.

Every rank set within ``top_k``, ordered by (score desc, label id asc), each label in the
seen set, each payload present, parsing and agreeing with its rank score, the three indexes
and the counters (histogram included) matching the contents, no orphan payloads. Used by the
tests and the fault drills through ``MemoryBank.check_invariants``.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
from qualiteacher.protos import bank_entry_pb2 as pb
from qualiteacher.services.bank.keys import HIST_BINS, BankKeys, hist_bin
from qualiteacher.services.bank.keys import as_str as _s


def _scan(client: redis.Redis, pattern: str) -> Iterable[str]:
    for key in client.scan_iter(match=pattern, count=1000):
        yield _s(key)


def check_invariants(client: redis.Redis, keys: BankKeys, top_k: int) -> list[str]:
    """Problems found in the bank under ``keys`` (empty list when consistent). Scans the prefix: O(bank)."""
    k = keys
    problems: list[str] = []
    cli = client
    images: dict[str, list[tuple[str, float]]] = {}
    for key in _scan(cli, k.rank_pattern()):
        image_id = k.parse_rank(key)
        members = [(_s(m), float(s)) for m, s in cli.zrange(key, 0, -1, withscores=True)]
        if members:
            images[image_id] = members
        else:  # pragma: no cover - Redis deletes empty zsets
            problems.append(f"{image_id}: empty rank set")
    payload_keys = set(_scan(cli, k.entry_pattern()))

    hist = [0] * HIST_BINS
    n_entries = 0
    for image_id, members in images.items():
        if len(members) > top_k:
            problems.append(f"{image_id}: {len(members)} entries > top_k {top_k}")
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
