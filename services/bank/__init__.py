"""Redis memory bank of pseudo-labels (protobuf records, atomic Lua gate).

See :mod:`services.bank.keys` for the key layout, :mod:`services.bank.store` for the API,
:mod:`services.bank.codec` for the records and :mod:`services.bank.check` for the consistency check.
"""

from services.bank.codec import (
    BankEntry,
    build_entry,
    decode_image,
    decode_weights,
    encode_image,
    encode_weights,
)
from services.bank.keys import ID_PATTERN, BankKeys, validate_id
from services.bank.store import GateOutcome, MemoryBank

__all__ = [
    "ID_PATTERN",
    "BankEntry",
    "BankKeys",
    "GateOutcome",
    "MemoryBank",
    "build_entry",
    "decode_image",
    "decode_weights",
    "encode_image",
    "encode_weights",
    "validate_id",
]
