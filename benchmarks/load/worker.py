"""The load benchmark's client processes: each runs its share of the edges as threads, one TLS
channel per edge, and reports every edge's timeline and outcome."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.load.workload import (
    CHUNK_ELEMS,
    FINGERPRINT,
    RPC_TIMEOUT_S,
    edge_name,
    increment,
    manifest,
    samples_of,
)
from fedocr import pki, retry, tensors, tls
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

UPLOAD_METHOD = "/fedocr.v1.Federation/UploadIncrement"


@dataclass(frozen=True)
class WorkerSpec:
    """What one client process needs: the aggregator, its edges and the increments to make."""

    index: int
    port: int
    pki_dir: str
    edges: tuple[int, ...]
    floats: int
    distinct: int
    compression: int
    zstd_level: int
    long_poll_s: int
    stagger_s: float
    edge_count: int


@dataclass
class EdgeRecord:
    """One edge's timeline (time.monotonic, shared by the processes) and outcome."""

    edge: int
    join_start: float = 0.0
    upload_start: float = 0.0
    upload_end: float = 0.0
    uploaded: bool = False  # the aggregator acknowledged the upload
    finished_at: float = 0.0  # a long-poll Join answered FINISHED
    stage: str = "join"  # where it stopped: join, download, upload, long-poll, done
    code: str | None = None  # the failure's status code (or exception type); None when counted
    details: str = ""
    retries: list[str] = field(default_factory=list)  # status code of each retried attempt
    message_bytes: int = 0
    receipt_wire_bytes: int = 0
    receipt_state: str = ""


def encode(kind: int, spec: WorkerSpec) -> tuple[list[bytes], int]:
    """Serialized chunk and trailer messages of increment `kind`, and their protobuf bytes."""
    enc = tensors.ChunkEncoder(
        [increment(kind, spec.floats)],
        pb.ENCODING_FLOAT32,
        spec.compression,
        level=spec.zstd_level,
        chunk_elems=CHUNK_ELEMS,
        ids=[0],
    )
    body = [pb.UploadMessage(chunk=c).SerializeToString() for c in enc.chunks()]
    body.append(pb.UploadMessage(trailer=enc.trailer()).SerializeToString())
    return body, sum(len(m) for m in body)


def run_edge(
    spec: WorkerSpec,
    record: EdgeRecord,
    channel: grpc.Channel,
    bodies: dict[int, tuple[list[bytes], int]],
    ready: threading.Barrier,
    go: threading.Event,
) -> None:
    """Join, download, wait for `go`, upload, long-poll Join until FINISHED; fills `record`, never raises.

    Every call retries UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED with backoff.
    """
    stub = pb_grpc.FederationStub(channel)
    upload = channel.stream_unary(
        UPLOAD_METHOD, request_serializer=None, response_deserializer=pb.UploadReceipt.FromString
    )
    policy = retry.RetryPolicy(
        base_delay=0.5, max_delay=30.0, max_attempts=None, max_elapsed=600.0, retry_resource_exhausted=True
    )
    invoker = retry.RetryInvoker(policy, on_retry=lambda event: record.retries.append(event.code.name))
    at_barrier = False
    try:
        record.join_start = time.monotonic()
        reply = invoker.call(stub.Join, pb.JoinRequest(manifest=manifest(spec.floats)), timeout=RPC_TIMEOUT_S)
        if reply.action != pb.JoinResponse.ACTION_TRAIN:
            raise RuntimeError(f"Join answered {pb.JoinResponse.Action.Name(reply.action)}")
        record.stage = "download"

        def download() -> None:
            for _ in stub.DownloadState(pb.DownloadStateRequest(), timeout=RPC_TIMEOUT_S):
                pass

        invoker.call(download)
        record.stage = "upload"
        at_barrier = True
        ready.wait()
        go.wait()
        if spec.stagger_s > 0:  # edges finish training at different times
            time.sleep(spec.stagger_s * record.edge / spec.edge_count)
        header = pb.UploadHeader(
            round_id=reply.round_id,
            sample_count=samples_of(record.edge),
            fingerprint=FINGERPRINT,
            encoding=pb.ENCODING_FLOAT32,
            compression=spec.compression,
            base_state_version=reply.state_version,
        )
        head = pb.UploadMessage(header=header).SerializeToString()
        body, nbytes = bodies[record.edge % spec.distinct]

        def messages() -> Iterator[bytes]:
            yield head
            yield from body

        record.message_bytes = len(head) + nbytes
        record.upload_start = time.monotonic()
        receipt = invoker.call(lambda: upload(messages(), timeout=RPC_TIMEOUT_S))
        record.upload_end = time.monotonic()
        record.receipt_wire_bytes = receipt.wire_bytes
        record.receipt_state = pb.RoundState.Name(receipt.round_state)
        record.uploaded = True
        if spec.long_poll_s > 0:  # as edge_agent does next: long-poll Join until there is news
            record.stage = "long-poll"
            request = pb.JoinRequest(manifest=manifest(spec.floats), wait_seconds=spec.long_poll_s)
            while True:
                reply = invoker.call(stub.Join, request, timeout=RPC_TIMEOUT_S + spec.long_poll_s)
                if reply.action != pb.JoinResponse.ACTION_WAIT:
                    break
            if reply.action != pb.JoinResponse.ACTION_FINISHED:
                raise RuntimeError(
                    f"Join answered {pb.JoinResponse.Action.Name(reply.action)} after the round"
                )
            record.finished_at = time.monotonic()
        record.stage = "done"
    except grpc.RpcError as exc:
        code = retry.status_code(exc)
        record.code = code.name if code is not None else "UNKNOWN"
        record.details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure, whatever it is
        record.code, record.details = type(exc).__name__, str(exc)
    finally:
        if not at_barrier:
            ready.wait()  # a failed edge still lets the others through


def worker_main(spec: WorkerSpec, start: Any, go: Any, release: Any, out: Any) -> None:
    """A client process of `spec.edges` edges as threads.

    Encodes its increments and reports ("encoded", ...); on `start` the edges join and download,
    then it reports ("ready", ...); on `go` they upload; then ("done", records); waits for `release`.
    """
    bodies = {kind: encode(kind, spec) for kind in sorted({e % spec.distinct for e in spec.edges})}
    pki_dir = Path(spec.pki_dir)
    ca = pki_dir / pki.CA_CERT_FILE
    target = f"127.0.0.1:{spec.port}"
    channels = [
        tls.secure_channel(
            target, ca, pki.cert_path(pki_dir, edge_name(e)), pki.key_path(pki_dir, edge_name(e))
        )
        for e in spec.edges
    ]
    records = [EdgeRecord(e) for e in spec.edges]
    local_go = threading.Event()
    ready = threading.Barrier(len(spec.edges) + 1)
    threads = [
        threading.Thread(target=run_edge, args=(spec, r, ch, bodies, ready, local_go), daemon=True)
        for r, ch in zip(records, channels, strict=True)
    ]
    out.put(("encoded", spec.index, os.getpid()))
    start.wait()
    for t in threads:
        t.start()
    ready.wait()
    out.put(("ready", spec.index, os.getpid()))
    go.wait()
    local_go.set()
    for t in threads:
        t.join()
    out.put(("done", spec.index, records))
    release.wait(timeout=600)
    for ch in channels:
        ch.close()
