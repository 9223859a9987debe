"""The monitor's PNG answers: stored PNGs as they are or as thumbnails, raw payloads encoded."""

from __future__ import annotations

import io

from fastapi.responses import Response
from qualiteacher.protos import bank_entry_pb2 as pb
from qualiteacher.services.bank.codec import decode_image


def png_bytes(data: bytes, size: int | None) -> bytes:
    """``data`` (a PNG) as it is, or shrunk so that its longer side is at most ``size``."""
    if size is None:
        return data
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(data)) as img:
        if max(img.size) <= size:
            return data
        img.load()
        thumb = img.copy()
    thumb.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def entry_as_png(entry: pb.BankEntry, size: int | None) -> bytes:
    """A bank entry's label as PNG, whichever way the record stores it."""
    if entry.image.WhichOneof("payload") == "png":
        return png_bytes(entry.image.png, size)
    from PIL import Image as PILImage

    arr = decode_image(entry.image)
    img = PILImage.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if size is not None:
        img.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def png_response(data: bytes, etag: str | None = None) -> Response:
    headers = {"Cache-Control": "no-cache"}
    if etag:
        headers["ETag"] = etag
    return Response(content=data, media_type="image/png", headers=headers)


def not_modified(etag: str) -> Response:
    """304 for a client that already holds ``etag``."""
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
