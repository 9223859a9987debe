"""Key layout of the Redis memory bank, and validation of everything that goes into a key.

All keys start with ``{prefix}:`` (default ``qt``). Image ids, label ids and drop reasons
must match :data:`ID_PATTERN` (no ``:``, ``*``, spaces or braces), so an id can never name
or glob into another key.

=====================================  =======  ============================================
key                                    type     contents
=====================================  =======  ============================================
``P:img:{image}:rank``                 zset     member = label id, score = -ensemble; read in
                                                ascending order it is (ensemble desc, label
                                                id asc), the order of ``gating.rank_key``
``P:img:{image}:seen``                 set      every label id ever gated for the image
                                                (admitted, rejected or evicted): replays are
                                                no-ops
``P:e:{image}:{label}``                string   ``BankEntry.SerializeToString()``
``P:input:{image}``                    string   the image's input, PNG (``inputs.InputStore``)
``P:idx:best``                         zset     image id -> -(best ensemble) (sort="score")
``P:idx:lex``                          zset     image id -> 0 (sort="id", by lex)
``P:idx:recent``                       zset     image id -> sequence number of last change
``P:counters``                         hash     images, entries, gate_calls, candidates,
                                                admitted, rejected, evicted, duplicates, seq,
                                                ``hist:0`` .. ``hist:9``, ``drop:{reason}``
``P:meta``                             hash     the job's status: top_k (the gate's),
                                                teacher_version, scorer_count, the student's
                                                progress and starts; fields and every read
                                                and write in ``qualiteacher.services.job_status``
``P:events``                           stream   one event per gate call (capped, MAXLEN ~)
``P:train``                            stream   the student's training log, one entry per logged
                                                step: ``step`` and a float per tag of
                                                ``qualiteacher.training_log`` (capped, MAXLEN ~;
                                                written by rank 0, read by the monitor)
``P:train:probe``                      hash     the latest probe images: ``meta`` (JSON: step,
                                                teacher version, scores, sizes) and
                                                ``png:{name}`` (PNG bytes; ``input`` or a score)
=====================================  =======  ============================================
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(ID_PATTERN)
# No ':' in a prefix: "qt" and "qt:x" would otherwise see each other's keys in SCANs.
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

HIST_BINS = 10

# The keys built per image, written once: `BankKeys` fills them in Python and
# `lua_key_functions` turns them into the Lua functions the bank's scripts call.
PER_IMAGE_KEYS = {
    "rank_key": "{prefix}:img:{image}:rank",
    "seen_key": "{prefix}:img:{image}:seen",
    "entry_key": "{prefix}:e:{image}:{label}",
    "input_key": "{prefix}:input:{image}",
}


def validate_id(value: object, what: str = "image id") -> str:
    """Return ``value`` if it is a safe id, else raise ``ValueError`` naming it."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {what} {value!r}: must match {ID_PATTERN}")
    return value


def as_str(value: bytes | str) -> str:
    """A key, id or field name as Redis returned it (bytes with ``decode_responses=False``)."""
    return value.decode() if isinstance(value, bytes) else value


def validate_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
        raise ValueError(f"invalid key prefix {prefix!r}")
    return prefix


def hist_bin(score: float) -> int:
    """Histogram bin of an ensemble score on the 0-10 scale (10 bins; out of range clamps).

    Must equal the Lua computation in ``gate.lua``: ``floor(score)`` clamped to [0, 9].
    """
    return min(max(math.floor(score), 0), HIST_BINS - 1)


@dataclass(frozen=True)
class BankKeys:
    """Key builders for one bank namespace."""

    prefix: str = "qt"

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # per image
    def rank(self, image_id: str) -> str:
        return PER_IMAGE_KEYS["rank_key"].format(prefix=self.prefix, image=validate_id(image_id))

    def seen(self, image_id: str) -> str:
        return PER_IMAGE_KEYS["seen_key"].format(prefix=self.prefix, image=validate_id(image_id))

    def entry(self, image_id: str, label_id: str) -> str:
        return PER_IMAGE_KEYS["entry_key"].format(prefix=self.prefix, image=validate_id(image_id),
                                                  label=validate_id(label_id, "label id"))

    def input(self, image_id: str) -> str:
        return PER_IMAGE_KEYS["input_key"].format(prefix=self.prefix, image=validate_id(image_id))

    # global
    @property
    def idx_best(self) -> str:
        return f"{self.prefix}:idx:best"

    @property
    def idx_lex(self) -> str:
        return f"{self.prefix}:idx:lex"

    @property
    def idx_recent(self) -> str:
        return f"{self.prefix}:idx:recent"

    @property
    def counters(self) -> str:
        return f"{self.prefix}:counters"

    @property
    def meta(self) -> str:
        return f"{self.prefix}:meta"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    # the training log (services/training_stream.py)
    @property
    def train(self) -> str:
        return f"{self.prefix}:train"

    @property
    def train_probe(self) -> str:
        return f"{self.prefix}:train:probe"

    # patterns for SCAN (diagnostics only; ids cannot contain glob characters)
    def rank_pattern(self) -> str:
        return f"{self.prefix}:img:*:rank"

    def seen_pattern(self) -> str:
        return f"{self.prefix}:img:*:seen"

    def entry_pattern(self) -> str:
        return f"{self.prefix}:e:*"

    def all_pattern(self) -> str:
        return f"{self.prefix}:*"

    def parse_rank(self, key: str) -> str:
        """Image id of a ``rank`` key."""
        body = key[len(f"{self.prefix}:img:"):]
        return body[: -len(":rank")]


def lua_key_functions() -> str:
    """`PER_IMAGE_KEYS` as Lua functions (e.g. ``rank_key(prefix, image)``), prepended to every
    bank script so that Lua builds the same keys as `BankKeys` (tests/test_bank.py compares)."""
    lines = []
    for name, template in PER_IMAGE_KEYS.items():
        parts = re.split(r"\{(\w+)\}", template)
        params = parts[1::2]
        pieces = [repr(text) if i % 2 == 0 else text for i, text in enumerate(parts) if text]
        lines.append(f"local function {name}({', '.join(params)}) return {' .. '.join(pieces)} end")
    return "\n".join(lines) + "\n"
