"""Redis memory bank of pseudo-labels (protobuf records, atomic Lua gate).

See :mod:`qualiteacher.services.bank.keys` for the key layout,
:mod:`qualiteacher.services.bank.store` for the API, :mod:`qualiteacher.services.bank.codec` for
the records and :mod:`qualiteacher.services.bank.check` for the consistency check.
"""

from qualiteacher.services.bank.codec import (
    BankEntry,
    build_entry,
    decode_image,
    decode_weights,
    encode_image,
    encode_weights,
)
from qualiteacher.services.bank.keys import ID_PATTERN, BankKeys, validate_id
from qualiteacher.services.bank.store import GateOutcome, MemoryBank

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
