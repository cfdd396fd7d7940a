"""The edge's wire client against a real in-process aggregator: uploads shed as busy are resent."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.server import start
from fedocr import retry, tensors
from fedocr.client import Endpoint, FederationClient
from fedocr.v1 import federation_pb2 as pb

LENGTH = 50_000
FINGERPRINT = b"\x42" * 32


@pytest.fixture
def busy_aggregator(test_pki, tmp_path: Path) -> Iterator:
    """One upload slot, and a queued upload gives up after 0.3 s: RESOURCE_EXHAUSTED comes quickly."""
    config = AggregatorConfig(
        listen="127.0.0.1:0",
        state_dir=tmp_path / "state",
        cert=test_pki.cert("aggregator"),
        key=test_pki.key("aggregator"),
        ca=test_pki.ca,
        total_rounds=1,
        quorum=2,
        min_edges=2,
        deadline_s=60.0,
        max_concurrent_uploads=1,
        upload_wait_s=0.3,
        join_wait_max_s=2.0,
    )
    running = start(config)
    yield running
    running.stop(grace=0.5)


def client(running, test_pki, name: str, events: list) -> FederationClient:
    endpoint = Endpoint(f"127.0.0.1:{running.port}", test_pki.ca, test_pki.cert(name), test_pki.key(name))
    policy = retry.RetryPolicy(base_delay=0.1, max_delay=0.5, max_attempts=None, max_elapsed=30.0)
    return FederationClient(endpoint, policy, on_retry=events.append)


def test_an_upload_shed_as_busy_is_resent_and_counted(busy_aggregator, test_pki) -> None:
    events: list[retry.RetryEvent] = []
    edges = {name: client(busy_aggregator, test_pki, name, events) for name in ("edge-0", "edge-1")}
    joined = {name: c.join(LENGTH, FINGERPRINT, 0, 0) for name, c in edges.items()}
    round_id = joined["edge-0"].round_id

    # edge-1 holds the only upload slot: its stream sends the header and one chunk, then stalls.
    stall = threading.Event()
    encoder = tensors.ChunkEncoder(
        [np.ones(LENGTH, np.float32)], pb.ENCODING_FLOAT32, pb.COMPRESSION_ZSTD, chunk_elems=10_000, ids=[0]
    )
    chunks = list(encoder.chunks())

    def slow_stream() -> Iterator[pb.UploadMessage]:
        yield pb.UploadMessage(
            header=pb.UploadHeader(
                round_id=round_id,
                sample_count=1,
                fingerprint=FINGERPRINT,
                encoding=pb.ENCODING_FLOAT32,
                compression=pb.COMPRESSION_ZSTD,
                base_state_version=1,
            )
        )
        yield pb.UploadMessage(chunk=chunks[0])
        stall.wait(10)
        for chunk in chunks[1:]:
            yield pb.UploadMessage(chunk=chunk)
        yield pb.UploadMessage(trailer=encoder.trailer())

    holder = threading.Thread(target=lambda: edges["edge-1"]._stub.UploadIncrement(slow_stream(), timeout=30))
    holder.start()
    time.sleep(0.5)  # the slow upload has the slot
    threading.Timer(1.5, stall.set).start()  # and frees it after a few refusals of edge-0's upload

    upload = edges["edge-0"].upload(round_id, "edge-0", np.full(LENGTH, 3.0, np.float32), 1, FINGERPRINT, 1)
    holder.join()

    assert upload.receipt is not None and upload.receipt.edge_id == "edge-0"
    busy = [e for e in events if e.code.name == "RESOURCE_EXHAUSTED"]
    assert busy, [e.code for e in events]
    download = edges["edge-0"].download(0)
    np.testing.assert_allclose(download.vector, np.full(LENGTH, 2.0, np.float32))  # mean of 1 and 3
    for c in edges.values():
        c.close()
