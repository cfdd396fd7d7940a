"""The load benchmark's workload: edge names and sample counts, the seeded increments every process
can rebuild, the manifest every edge sends, and the FedAvg those uploads must produce."""

from __future__ import annotations

import numpy as np

from fedocr.v1 import federation_pb2 as pb

FINGERPRINT = b"\x6c" * 32
CHUNK_ELEMS = 65536  # what edge_agent sends: 256 KiB of float32 per chunk
RPC_TIMEOUT_S = 120.0  # edge_agent's per-call deadline
SEED = 20260
MB, MIB = 1e6, float(1 << 20)
COMPRESSIONS = {"zstd": pb.COMPRESSION_ZSTD, "none": pb.COMPRESSION_NONE}


def samples_of(edge: int) -> int:
    """The sample count edge number `edge` reports (varied, so FedAvg weights differ)."""
    return 100 + 150 * (edge % 5)


def increment(kind: int, floats: int) -> np.ndarray:
    """Distinct increment number `kind` (the same in every process: seeded)."""
    return np.random.default_rng(SEED + kind).normal(0.0, 1e-3, floats).astype(np.float32)


def edge_name(edge: int) -> str:
    """Certificate name of edge number `edge`."""
    return f"edge-{edge:04d}"


def expected_state(edges: int, floats: int, distinct: int) -> np.ndarray:
    """FedAvg of round 1 from G_0 = 0: sum_j s_j * dW_j / sum_j s_j, as float32."""
    weights = [0.0] * distinct
    for j in range(edges):
        weights[j % distinct] += samples_of(j)
    total = np.zeros(floats, dtype=np.float64)
    for kind, w in enumerate(weights):
        if w:
            total += w * increment(kind, floats).astype(np.float64)
    return (total / sum(weights)).astype(np.float32)


def manifest(floats: int) -> pb.Manifest:
    """The one-tensor manifest every edge sends (DESIGN 2: one flat shuffled vector)."""
    return pb.Manifest(tensors=[pb.TensorSpec(id=0, length=floats)], fingerprint=FINGERPRINT)
