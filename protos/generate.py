"""Regenerate the Python code for the protobuf records in this folder.

    python -m qualiteacher.protos.generate            # rewrite protos/*_pb2.py(i) in place
    python -m qualiteacher.protos.generate OUT_DIR    # write them into OUT_DIR instead

Needs ``grpcio-tools`` (a test extra). ``tests/test_protos_in_sync.py`` regenerates into a
temporary folder and compares byte for byte with the committed files, so edit the
``.proto`` and rerun this script, never the generated code.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("bank_entry.proto",)


def generated_names(proto_file: str) -> list[str]:
    stem = Path(proto_file).stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]


def generate(out_dir: str | Path = PROTO_DIR) -> list[Path]:
    """Run protoc (from grpcio-tools) on every proto here; return the files written."""
    from grpc_tools import protoc  # imported lazily: only needed to regenerate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            str(PROTO_DIR / proto),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {proto}")
        written += [out / name for name in generated_names(proto)]
    return written


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
