"""Regenerates the committed gRPC stubs in fedocr/v1/ from proto/fedocr/v1/*.proto (`make proto`)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"  # the .proto files, and nothing else
STUB_ROOT = REPO_ROOT  # stubs land in fedocr/v1/, inside the library


def generate(out_root: Path = STUB_ROOT) -> list[Path]:
    """Run grpcio-tools' protoc over every .proto file, writing stubs under ``out_root``.

    Returns the generated files. Raises RuntimeError when protoc fails.
    """
    from grpc_tools import protoc  # a build-time tool only: never imported by the services

    protos = sorted((PROTO_ROOT / "fedocr" / "v1").glob("*.proto"))
    include = resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(p.name for p in protos)}")
    return sorted((out_root / "fedocr" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    """Entry point for `python -m fedocr.protogen`."""
    for path in generate():
        print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
