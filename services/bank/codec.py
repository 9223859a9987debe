"""What the bank stores, as bytes: ``BankEntry`` protobuf messages from arrays and back.

Images travel as PNG (lossless) or raw uint8, block weights as a float map; nothing is ever
pickled. ``build_entry`` assembles one record as the scorer writes it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping

import numpy as np
from qualiteacher.protos import bank_entry_pb2 as pb
from qualiteacher.services.bank.keys import validate_id

from qualiteacher.method.augment import KNOWN_AUGMENTATIONS

BankEntry = pb.BankEntry

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
