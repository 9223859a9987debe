"""The committed protobuf code is what protoc generates from the committed .proto."""

from __future__ import annotations

import pytest
from qualiteacher.protos.generate import PROTO_DIR, PROTO_FILES, generate, generated_names


def test_generated_code_in_sync(tmp_path):
    pytest.importorskip("grpc_tools")
    generate(tmp_path)
    for proto in PROTO_FILES:
        for name in generated_names(proto):
            committed = (PROTO_DIR / name).read_bytes()
            fresh = (tmp_path / name).read_bytes()
            assert fresh == committed, f"protos/{name} is stale: run `python -m qualiteacher.protos.generate`"


def test_import_and_roundtrip():
    from qualiteacher.protos import bank_entry_pb2 as pb

    e = pb.BankEntry(image_id="i", label_id="l", ensemble=0.1 + 0.2, teacher_version=2**40)
    e.raw_scores["musiq"] = 55.5
    e.image.png = b"\x89PNG"
    back = pb.BankEntry.FromString(e.SerializeToString())
    assert back == e and back.ensemble == 0.1 + 0.2  # double, not float32
    assert back.image.WhichOneof("payload") == "png"
