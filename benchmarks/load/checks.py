"""The load benchmark's check: the closed round and the global state read back from the aggregator
equal the FedAvg of what the edges uploaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load.workload import RPC_TIMEOUT_S, edge_name, expected_state
from fedocr import pki, tensors, tls
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc


def check_state(
    port: int, pki_dir: Path, round_id: int, edges: int, floats: int, distinct: int
) -> dict[str, Any]:
    """Read the closed round and the global state back; compare with the expected FedAvg."""
    channel = tls.secure_channel(
        f"127.0.0.1:{port}",
        pki_dir / pki.CA_CERT_FILE,
        pki.cert_path(pki_dir, edge_name(0)),
        pki.key_path(pki_dir, edge_name(0)),
    )
    try:
        stub = pb_grpc.FederationStub(channel)
        status = stub.GetRound(pb.GetRoundRequest(round_id=round_id), timeout=RPC_TIMEOUT_S)
        stream = iter(stub.DownloadState(pb.DownloadStateRequest(), timeout=RPC_TIMEOUT_S))
        header = next(stream).header
        assembler = tensors.ChunkAssembler(list(header.tensors), header.encoding, header.compression)
        state = None
        for message in stream:
            if message.WhichOneof("kind") == "chunk":
                assembler.add(message.chunk)
            else:
                state = assembler.finish(message.trailer)[0]
    finally:
        channel.close()
    uploaded = sum(e.uploaded for e in status.edges)
    result: dict[str, Any] = {
        "round_state": pb.RoundState.Name(status.state),
        "uploaded_edges": uploaded,
        "state_version": header.state_version,
        "server_wire_up_bytes": status.bytes.wire_up,
    }
    if state is None:
        return {**result, "ok": False, "why": "no state downloaded"}
    want = expected_state(edges, floats, distinct)
    diff = float(np.abs(state.astype(np.float64) - want).max()) if want.size else 0.0
    ok = (
        status.state == pb.ROUND_STATE_CLOSED
        and uploaded == edges
        and header.state_version == 2
        and bool(np.allclose(state, want, rtol=1e-6, atol=1e-12))
    )
    return {**result, "max_abs_error": diff, "ok": ok}
