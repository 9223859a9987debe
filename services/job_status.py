"""The job's status hash in Redis (``{prefix}:meta``): its fields, their encoding, and every read
and write of it.

The field names are a contract: the monitor, the driver's progress line and summary, and outside
tools (``redis-cli HGETALL qt:meta``) read them, and the Lua gate writes ``top_k``. Values are
decimal text, as Redis keeps them.

==============================  ==========================================================
field                           written by
==============================  ==========================================================
``top_k``                       the gate (``services/bank/gate.lua``, HSETNX): the bank's k
``teacher_version``             the labeller, at start and after each weight push
``scorer_count``                the labeller: the size of the scorer pool it announced
``student_step``                rank 0 after each step (with ``student_steps``, the total,
``student_steps``               and ``student_loss``, the step's loss to 5 decimals)
``student_loss``
``student_starts``              rank 0, once per worker-group start (HINCRBY): every start
                                after a job's first is a restart by Ray Train
``student_resumes``             rank 0, once per start from a checkpoint (HINCRBY), and the
``student_resumed_at_step``     step it resumed at
==============================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import redis
from qualiteacher.services.bank.keys import BankKeys, as_str

# Fields written as floats; every other field is an int.
_FLOAT_FIELDS = frozenset({"student_loss"})


@dataclass(frozen=True)
class JobStatus:
    """One read of the hash; None (or 0 for counters and progress) where a field is not set yet."""

    top_k: int | None = None
    teacher_version: int | None = None
    scorer_count: int | None = None
    student_step: int = 0
    student_steps: int = 0
    student_loss: float | None = None
    student_starts: int = 0
    student_resumes: int = 0
    student_resumed_at_step: int | None = None

    @classmethod
    def decode(cls, raw: Mapping[Any, Any]) -> JobStatus:
        """From HGETALL's reply (bytes or str); fields this version does not know are ignored."""
        values = {as_str(k): as_str(v) for k, v in raw.items()}
        return cls(**{name: _decode(name, values[name]) for name in FIELD_NAMES if name in values})

    def encode(self) -> dict[str, str]:
        """The fields that are set, as the hash holds them."""
        return {name: _encode(name, value) for name, value in _items(self) if value is not None}


FIELD_NAMES = tuple(f.name for f in fields(JobStatus))


def _items(status: JobStatus) -> list[tuple[str, Any]]:
    return [(name, getattr(status, name)) for name in FIELD_NAMES]


def _encode(name: str, value: float) -> str:
    return f"{float(value):.5f}" if name in _FLOAT_FIELDS else str(int(value))


def _decode(name: str, text: str) -> int | float:
    return float(text) if name in _FLOAT_FIELDS else int(text)


class JobStatusHash:
    """Reads and writes one job's status hash through ``client`` (any ``decode_responses``)."""

    def __init__(self, client: redis.Redis, prefix: str = "qt") -> None:
        self.client = client
        self.key = BankKeys(prefix).meta

    def read(self) -> JobStatus:
        return JobStatus.decode(self.client.hgetall(self.key))

    def queue_read(self, pipe: redis.client.Pipeline) -> None:
        """Queue the read on ``pipe``; decode its reply with `JobStatus.decode`."""
        pipe.hgetall(self.key)

    def update(self, **values: float) -> None:
        """Set the named fields (the others keep their values)."""
        unknown = set(values) - set(FIELD_NAMES)
        if unknown:
            raise ValueError(f"not job status fields: {sorted(unknown)}")
        self.client.hset(self.key, mapping={name: _encode(name, v) for name, v in values.items()})

    def set_teacher_version(self, version: int) -> None:
        self.update(teacher_version=version)

    def set_scorer_count(self, n: int) -> None:
        self.update(scorer_count=n)

    def report_progress(self, step: int, total: int, loss: float) -> None:
        """Rank 0's step and loss, for the driver's progress line and the monitor."""
        self.update(student_step=step, student_steps=total, student_loss=loss)

    def count_start(self) -> None:
        """One more worker-group start of the student."""
        self.client.hincrby(self.key, "student_starts", 1)

    def count_resume(self, step: int) -> None:
        """One more start from a checkpoint, at ``step``."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self.key, "student_resumes", 1)
        pipe.hset(self.key, "student_resumed_at_step", _encode("student_resumed_at_step", step))
        pipe.execute()
