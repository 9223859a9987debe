"""Degraded input images beside the bank, so students on any node can read them.

One PNG per image id at `BankKeys.input` (`{prefix}:input:{image_id}`); written once when an
image is first labelled. Kept apart from the bank's entries: the gate and its invariants never touch them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import redis
from qualiteacher.services.bank.keys import BankKeys, validate_prefix

from qualiteacher.imageio import decode_png, encode_png


class InputStore:
    def __init__(self, client: redis.Redis, prefix: str = "qt"):
        self.client = client
        self.prefix = validate_prefix(prefix)

    def key(self, image_id: str) -> str:
        return BankKeys(self.prefix).input(image_id)

    def put_many(self, images: dict[str, np.ndarray]) -> int:
        """Store inputs not stored yet (SET NX); returns how many were new."""
        pipe = self.client.pipeline(transaction=False)
        for image_id, image in images.items():
            pipe.set(self.key(image_id), encode_png(image, compress_level=1), nx=True)
        return sum(1 for ok in pipe.execute() if ok)

    def get_many(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Decoded inputs by id; ids with no stored input are left out."""
        ids = list(image_ids)
        values = self.client.mget([self.key(i) for i in ids]) if ids else []
        return {i: decode_png(v) for i, v in zip(ids, values) if v is not None}
