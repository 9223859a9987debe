"""Redis memory bank of pseudo-labels (protobuf records, atomic Lua gate).

See :mod:`services.bank.keys` for the key layout and :mod:`services.bank.store` for the API.
"""

from services.bank.keys import ID_PATTERN, BankKeys, validate_id
from services.bank.store import (
    BankEntry,
    GateOutcome,
    MemoryBank,
    build_entry,
    decode_image,
    decode_weights,
    encode_image,
    encode_weights,
)

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
