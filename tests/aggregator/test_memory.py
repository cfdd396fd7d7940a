"""Memory of the sum path is O(model): the peak does not grow with the number of edges."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
from fedclient import FINGERPRINT, upload_messages

from aggregator.config import AggregatorConfig
from aggregator.coordinator import RoundCoordinator
from aggregator.store import Manifest, Store

VALUES = 250_000  # 1 MB of float32


def peak_bytes(tmp_path: Path, edges: int) -> int:
    """Peak Python/numpy allocation while `edges` uploads go through stage, verify and commit."""
    config = AggregatorConfig(state_dir=tmp_path / f"s{edges}", quorum=edges + 1, min_edges=1)
    store = Store(config.state_dir)
    fed = RoundCoordinator(config, store)
    manifest = Manifest(((0, VALUES),), FINGERPRINT)
    round_id = fed.join("edge-0", manifest, 0).round.round_id
    streams = [
        upload_messages(round_id, [np.full(VALUES, k, dtype=np.float32)], samples=1, chunk_elems=50_000)
        for k in range(edges)
    ]
    tracemalloc.start()
    try:
        for k, messages in enumerate(streams):
            fed.upload(f"edge-{k}", iter(messages))
            streams[k] = None  # the client side's copy is not the server's memory
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = fed._total  # the running sum: sum of k for k < edges, weight 1 each
    np.testing.assert_array_equal(total[:3], np.full(3, edges * (edges - 1) / 2))
    store.close()
    return peak


def test_peak_memory_is_flat_in_the_number_of_edges(tmp_path: Path) -> None:
    few, many = peak_bytes(tmp_path, 2), peak_bytes(tmp_path, 16)
    model = VALUES * 4
    assert many < few + model // 2, (few, many)
    assert many < 6 * model, many
