"""Aggregator figures (not a test): upload ingest rate against a raw grpcio mTLS stream, and the
aggregator's peak RSS with 10, 50 and 200 edges uploading one increment each in one round.

    .venv/bin/python -m benchmarks.aggregator [--values 3400000] [--edges 10,50,200] [--uploads 6]

Everything runs on 127.0.0.1 with a throwaway PKI (fedocr.harness). The aggregator and the raw
sink each run in their own process (started and stopped by fedocr.harness); this one is the client.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from fedocr import harness, pki, tensors, tls
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

FINGERPRINT = b"\x5a" * 32
SINK_METHOD = "/bench.Sink/Upload"
UPLOAD_METHOD = "/fedocr.v1.Federation/UploadIncrement"
MB = 1e6
# Upload chunk size (values): 256 KiB messages. gRPC keeps, per connection, buffers about the size
# of the largest message it carried, so edges should not send 1 MiB chunks (--chunk-kib).
CHUNK_ELEMS = 1 << 16


def sink_main(pki_dir: Path) -> None:
    """The raw baseline: an mTLS grpcio server that reads a client stream of bytes and drops it."""

    def upload(request_iterator, context):
        n = 0
        for message in request_iterator:
            n += len(message)
        return n.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "bench.Sink", {"Upload": grpc.stream_unary_rpc_method_handler(upload)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", 4 << 20), ("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((handler,))
    creds = tls.server_credentials(
        pki.cert_path(pki_dir, "aggregator"), pki.key_path(pki_dir, "aggregator"), pki_dir / pki.CA_CERT_FILE
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(f"sink listening on port {port}", flush=True)
    server.wait_for_termination()


class Child:
    """A service started by fedocr.harness (its own process group), and its memory figures."""

    def __init__(self, service: harness.Service) -> None:
        self.service, self.port, self.log = service, service.port, service.log

    def memory(self) -> str:
        """RssAnon / RssFile of the child now."""
        text = Path(f"/proc/{self.service.pid}/status").read_text()
        found = dict(
            line.split(":", 1) for line in text.splitlines() if line.startswith(("RssAnon", "RssFile"))
        )
        return ", ".join(f"{k} {int(v.split()[0]) / 1024:.0f} MiB" for k, v in found.items())

    def peak_rss_mb(self) -> float:
        """VmHWM of the child: its peak resident set."""
        for line in Path(f"/proc/{self.service.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        self.service.stop()


def aggregator(pki_dir: Path, state: Path, quorum: int) -> Child:
    """Start `aggregator serve` with a round that stays open until `quorum` uploads."""
    flags = ["--quorum", str(quorum), "--min-edges", "1", "--deadline", "3600", "--log-level", "INFO"]
    return Child(harness.start_aggregator(pki_dir, state, state.with_suffix(".log"), flags=flags))


def start_sink(pki_dir: Path) -> Child:
    """The raw sink (sink_main) in a child process."""
    cmd = [sys.executable, "-m", "benchmarks.aggregator", "--sink", str(pki_dir)]
    return Child(harness.start_service(cmd, None))


def phases(log: Path, last: int) -> str:
    """Median server-side phases of the last `last` uploads, from the aggregator's log lines."""
    found = re.findall(r"([0-9.]+) s receive\+verify, ([0-9.]+) s sum\+fsync", log.read_text())[-last:]
    if not found:
        return "no timings logged"
    receive = statistics.median(float(a) for a, _ in found) * 1e3
    durable = statistics.median(float(b) for _, b in found) * 1e3
    return f"server: {receive:.0f} ms receive+verify, {durable:.0f} ms sum+fsync per upload (median)"


def channel(pki_dir: Path, port: int, name: str) -> grpc.Channel:
    return tls.secure_channel(
        f"127.0.0.1:{port}",
        pki_dir / pki.CA_CERT_FILE,
        pki.cert_path(pki_dir, name),
        pki.key_path(pki_dir, name),
    )


def encode(
    values: np.ndarray, compression: int, encoding: int = pb.ENCODING_FLOAT32
) -> tuple[list[pb.TensorChunk], pb.Trailer, int]:
    """Chunks, trailer and wire bytes of one increment, encoded once and reused by every upload."""
    enc = tensors.ChunkEncoder([values], encoding, compression, level=1, chunk_elems=CHUNK_ELEMS)
    chunks = list(enc.chunks())
    return chunks, enc.trailer(), enc.wire_bytes


def stream(round_id: int, chunks, trailer, compression: int, encoding: int = pb.ENCODING_FLOAT32):
    header = pb.UploadHeader(
        round_id=round_id,
        sample_count=10,
        fingerprint=FINGERPRINT,
        encoding=encoding,
        compression=compression,
    )
    yield pb.UploadMessage(header=header)
    for chunk in chunks:
        yield pb.UploadMessage(chunk=chunk)
    yield pb.UploadMessage(trailer=trailer)


def join(ch: grpc.Channel, values: int) -> int:
    manifest = pb.Manifest(tensors=[pb.TensorSpec(id=0, length=values)], fingerprint=FINGERPRINT)
    reply = pb_grpc.FederationStub(ch).Join(pb.JoinRequest(manifest=manifest), timeout=60)
    if reply.action != pb.JoinResponse.ACTION_TRAIN:
        raise RuntimeError(f"join answered {reply.action}")
    return reply.round_id


def ingest(
    pki_dir: Path,
    work: Path,
    values: np.ndarray,
    uploads: int,
    compression: int,
    streams: int,
    encoding: int = pb.ENCODING_FLOAT32,
) -> None:
    """Ingest rate of UploadIncrement vs the raw sink, same serialized messages, `streams` at once.

    Each round of the comparison sends `streams` uploads concurrently (distinct edges) to the
    aggregator, then the same to the raw sink; the rate is bytes over wall time, median of rounds.
    Both get the same messages, serialized once, so the client's cost is the same for both.
    """
    chunks, trailer, wire = encode(values, compression, encoding)
    name = f"{pb.Encoding.Name(encoding)}-{pb.Compression.Name(compression)}-{streams}"
    agg = aggregator(pki_dir, work / f"ingest-{name}", quorum=(uploads + 2) * streams + 1)
    sink = start_sink(pki_dir)
    pool = futures.ThreadPoolExecutor(streams)
    try:
        sink_chans = [channel(pki_dir, sink.port, f"edge-{k}") for k in range(streams)]
        senders = [ch.stream_unary(SINK_METHOD) for ch in sink_chans]
        chans = [channel(pki_dir, agg.port, f"edge-{k}") for k in range((uploads + 2) * streams)]
        round_id = [join(ch, values.size) for ch in chans][0]
        raw_messages = [
            m.SerializeToString() for m in stream(round_id, chunks, trailer, compression, encoding)
        ]
        nbytes = sum(len(m) for m in raw_messages)
        list(pool.map(lambda send: send(iter(raw_messages), timeout=60), senders))  # warm up

        def to_aggregator(ch: grpc.Channel) -> None:  # the same serialized messages as the sink's
            send = ch.stream_unary(UPLOAD_METHOD, response_deserializer=pb.UploadReceipt.FromString)
            send(iter(raw_messages), timeout=300)

        list(pool.map(to_aggregator, chans[-2 * streams :]))  # warm up: the LMDB file reaches its size
        agg_rates, raw_rates = [], []
        for k in range(uploads):
            t0 = time.perf_counter()
            list(pool.map(to_aggregator, chans[k * streams : (k + 1) * streams]))
            agg_rates.append(streams * nbytes / (time.perf_counter() - t0) / MB)
            t0 = time.perf_counter()
            list(pool.map(lambda send: send(iter(raw_messages), timeout=60), senders))
            raw_rates.append(streams * nbytes / (time.perf_counter() - t0) / MB)
        a, r = statistics.median(agg_rates), statistics.median(raw_rates)
        what = f"{pb.Encoding.Name(encoding)[9:]} {pb.Compression.Name(compression)[12:]}"
        print(
            f"ingest {what:17s} x{streams} streams, {nbytes / MB:.2f} MB/upload "
            f"(payload {wire / MB:.2f} MB): "
            f"UploadIncrement {a:6.1f} MB/s ({a * MB / nbytes:.0f} uploads/s), raw grpcio mTLS stream "
            f"{r:6.1f} MB/s, ratio {a / r:.2f} (median of {uploads}); {phases(agg.log, uploads * streams)}",
            flush=True,
        )
        for ch in [*chans, *sink_chans]:
            ch.close()
    finally:
        pool.shutdown()
        agg.stop()
        sink.stop()


def rss(pki_dir: Path, work: Path, values: np.ndarray, edges: int, threads: int = 8) -> None:
    """Peak RSS of a fresh aggregator while `edges` edges upload one increment each in one round.

    Every edge keeps its channel open (as edges do between rounds). For scale, the raw sink gets
    the same uploads over as many connections, and its peak RSS is printed beside.
    """
    chunks, trailer, _ = encode(values, pb.COMPRESSION_NONE)
    agg = aggregator(pki_dir, work / f"rss-{edges}", quorum=edges)
    sink = start_sink(pki_dir)
    try:
        chans = [channel(pki_dir, agg.port, f"edge-{k}") for k in range(edges)]
        round_id = [join(ch, values.size) for ch in chans][0]
        baseline = agg.peak_rss_mb()

        def upload(ch: grpc.Channel) -> pb.UploadReceipt:
            messages = stream(round_id, chunks, trailer, pb.COMPRESSION_NONE)
            return pb_grpc.FederationStub(ch).UploadIncrement(messages, timeout=600)

        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(threads) as pool:
            receipts = list(pool.map(upload, chans))
        took = time.perf_counter() - t0
        closed = sum(r.round_state == pb.ROUND_STATE_CLOSED for r in receipts)
        peak, now = agg.peak_rss_mb(), agg.memory()
        for ch in chans:
            ch.close()

        sink_chans = [channel(pki_dir, sink.port, f"edge-{k}") for k in range(edges)]
        raw_messages = [m.SerializeToString() for m in stream(round_id, chunks, trailer, pb.COMPRESSION_NONE)]
        sink_base = sink.peak_rss_mb()
        with futures.ThreadPoolExecutor(threads) as pool:
            list(
                pool.map(lambda ch: ch.stream_unary(SINK_METHOD)(iter(raw_messages), timeout=600), sink_chans)
            )
        for ch in sink_chans:
            ch.close()
        model_mb = values.nbytes / 2**20
        print(
            f"rss {edges:4d} edges x{threads} at once: aggregator peak {peak:6.1f} MiB "
            f"(after joins {baseline:.1f}; "
            f"target <= 4 x {model_mb:.1f} + 150 = {4 * model_mb + 150:.0f} MiB; at rest {now}); "
            f"raw sink peak {sink.peak_rss_mb():.1f} MiB (idle {sink_base:.1f}); {took:.1f} s, "
            f"{edges * values.nbytes / took / MB:.0f} MB/s; {closed} receipt(s) say CLOSED",
            flush=True,
        )
    finally:
        agg.stop()
        sink.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=3_400_000, help="floats per increment")
    parser.add_argument("--edges", default="10,50,200")
    parser.add_argument("--uploads", type=int, default=6)
    parser.add_argument("--chunk-kib", type=int, default=256, help="upload chunk size")
    parser.add_argument("--sink", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CHUNK_ELEMS
    CHUNK_ELEMS = args.chunk_kib * 1024 // 4
    if args.sink:
        sink_main(args.sink)
        return 0
    harness.stop_on_signals()  # SIGTERM unwinds too: the aggregator and the sink are stopped
    counts = [int(x) for x in args.edges.split(",")]
    with tempfile.TemporaryDirectory(prefix="fedocr-bench-") as tmp:
        work = Path(tmp)
        pki_dir = work / "pki"
        harness.make_pki(pki_dir, max(counts + [(4 * args.uploads + 2) * 4]))
        values = np.random.default_rng(0).normal(0, 1e-3, args.values).astype(np.float32)
        print(
            f"increment: {args.values} float32 ({values.nbytes / MB:.1f} MB) in {args.chunk_kib} KiB chunks; "
            "127.0.0.1, mTLS",
            flush=True,
        )
        for streams in (1, 4):
            ingest(pki_dir, work, values, args.uploads, pb.COMPRESSION_NONE, streams)
        ingest(pki_dir, work, values, args.uploads, pb.COMPRESSION_ZSTD, 4)
        ingest(pki_dir, work, values, 4 * args.uploads, pb.COMPRESSION_ZSTD, 4, pb.ENCODING_INT3_QUANTIZED)
        for n in counts:
            rss(pki_dir, work, values, n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
