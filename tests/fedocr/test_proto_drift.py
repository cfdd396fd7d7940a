"""The committed gRPC stubs are exactly what the pinned grpcio-tools makes from the .proto files."""

from __future__ import annotations

from pathlib import Path

from fedocr import protogen

COMMITTED = protogen.STUB_ROOT / "fedocr" / "v1"


def test_stubs_match_the_proto(tmp_path: Path):
    generated = protogen.generate(out_root=tmp_path)

    names = sorted(p.name for p in generated)
    assert names == sorted(p.name for p in COMMITTED.glob("*_pb2*.py*"))
    assert names  # something was generated at all
    drifted = [
        n for n in names if (tmp_path / "fedocr" / "v1" / n).read_bytes() != (COMMITTED / n).read_bytes()
    ]
    assert not drifted, f"stale stubs {drifted}: run `make proto` and commit the result"
