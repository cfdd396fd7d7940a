"""A light edge: a separate process that speaks fedocr.v1 with numpy only (no torch, no training).

It joins, downloads the global state when its version changed, and uploads a deterministic
increment per (edge, round id) until the federation finishes, retrying transient failures. An
upload counts as acknowledged when a receipt arrives, or when a refusal (ALREADY_EXISTS, or a
round that closed meanwhile) comes back and GetRound lists this edge as uploaded in that round.

In a secure-aggregation round (the plan says so) it runs the protocol's phases with
edge_agent.secure.protocol and uploads its increment masked; --stall-after-step stops it after one
of those steps (advertised, shared, uploaded) to wait to be killed, and --step-pause waits after
each one, --reveal-delay before revealing shares, --reveal-after until a file exists;
--straddle-upload holds the masked upload's stream after its header until the upload phase ended.

Two JSON-lines files go to --out: ``<name>.receipts.jsonl`` (one line per acknowledged upload)
and ``<name>.events.jsonl`` (what the edge is doing, for tests that time faults on it).

    python tests/faults/light_edge.py --port 50051 --pki DIR --name edge-0 --length 50000 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edge_agent.secure import protocol
from fedocr import encodings, pki, retry, secagg, tensors, tls
from fedocr.client import Endpoint, FederationClient, upload_header
from fedocr.errors import WireFormatError
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

FINGERPRINT = b"\x5a" * 32
RPC_TIMEOUT_S = 15.0
# Small reconnect backoff and windows: the aggregator comes back within a second, and a slow
# reader keeps the server's download stream in flight.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 65536),
)
POLICY = retry.RetryPolicy(base_delay=0.05, max_delay=0.5, max_attempts=None, max_elapsed=180.0)
ROUND_GONE = frozenset(
    {grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
)


def edge_index(name: str) -> int:
    """The number in ``edge-<k>``."""
    return int(name.rsplit("-", 1)[1])


def increment(name: str, round_id: int, length: int) -> np.ndarray:
    """The edge's increment for a round: deterministic in (edge, round id)."""
    rng = np.random.default_rng([edge_index(name), round_id])
    return rng.standard_normal(length).astype(np.float32)


def received(name: str, round_id: int, length: int, encoding: str = "float32") -> np.ndarray:
    """The increment as the aggregator decodes it from this edge's upload in ``encoding``.

    Nearest rounding is deterministic, and chunks hold whole blocks of 256 values (--chunk-elems
    is a multiple of 256), so encoding the whole vector at once gives the same values.
    """
    return encodings.encode(increment(name, round_id, length), encodings.NAMES[encoding], "nearest")[1]


def samples(name: str, round_id: int) -> int:
    """The sample count the edge declares for a round (weights differ between edges and rounds)."""
    return 1 + (7 * edge_index(name) + round_id) % 5


class Journal:
    """Append-only JSON lines, flushed per line (they survive a SIGKILL of this process)."""

    def __init__(self, path: Path) -> None:
        self._fh = path.open("a", buffering=1)

    def write(self, **fields: Any) -> None:
        self._fh.write(json.dumps({"t": time.time(), **fields}) + "\n")
        self._fh.flush()


class LightEdge:
    """One edge's loop over a mutual-TLS channel."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.name, self.length, self.args = args.name, args.length, args
        ca = args.pki / pki.CA_CERT_FILE
        cert, key = pki.cert_path(args.pki, args.name), pki.key_path(args.pki, args.name)
        self.channel = tls.secure_channel(f"127.0.0.1:{args.port}", ca, cert, key, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.events = Journal(args.out / f"{args.name}.events.jsonl")
        self.call = retry.RetryInvoker(POLICY, on_retry=self._retried).call
        self.doing = ""
        self.receipts = Journal(args.out / f"{args.name}.receipts.jsonl")
        self.held_version = 0
        self.uploads = 0

    def _retried(self, ev: retry.RetryEvent) -> None:
        self.events.write(kind="retry", during=self.doing, code=ev.code.name, details=ev.details)

    def manifest(self) -> pb.Manifest:
        return pb.Manifest(tensors=[pb.TensorSpec(id=0, length=self.length)], fingerprint=FINGERPRINT)

    def run(self) -> None:
        """Join, download and upload until the aggregator says the federation finished."""
        while True:
            self.events.write(kind="join")
            self.doing = "join"
            request = pb.JoinRequest(
                manifest=self.manifest(), held_state_version=self.held_version, wait_seconds=2
            )
            reply = self.call(self.stub.Join, request, timeout=RPC_TIMEOUT_S + 2)
            if reply.action == pb.JoinResponse.ACTION_FINISHED:
                self.download()
                self.events.write(kind="finished", version=self.held_version)
                return
            if reply.action != pb.JoinResponse.ACTION_TRAIN:
                continue
            if self.held_version != reply.state_version:
                self.download()
            if self.held_version != reply.state_version:
                continue  # the round closed while we downloaded: join again
            if reply.plan.secure.enabled:
                self.secure_upload(reply)
            else:
                self.upload(reply.round_id, reply.state_version)

    def secure_upload(self, reply: pb.JoinResponse) -> None:
        """Run the round's secure-aggregation phases around a masked upload of the increment."""
        args = self.args
        ca = args.pki / pki.CA_CERT_FILE
        cert, key = pki.cert_path(args.pki, self.name), pki.key_path(args.pki, self.name)
        endpoint = Endpoint(f"127.0.0.1:{args.port}", ca, cert, key)
        client = FederationClient(endpoint, POLICY, on_retry=self._retried)
        if args.reveal_delay:
            reveal = client.reveal

            def late_reveal(*a: Any) -> pb.SecureRoundStatus:
                self.events.write(kind="revealing", round_id=reply.round_id)
                time.sleep(args.reveal_delay)
                return reveal(*a)

            client.reveal = late_reveal  # type: ignore[method-assign]
        if args.reveal_after:
            gated = client.reveal

            def gated_reveal(*a: Any) -> pb.SecureRoundStatus:
                self.events.write(kind="revealing", round_id=reply.round_id)
                while not args.reveal_after.exists():  # the test creates it
                    time.sleep(0.05)
                return gated(*a)

            client.reveal = gated_reveal  # type: ignore[method-assign]
        if args.straddle_upload:
            self.straddle(client, reply.round_id)
        round_id, count = reply.round_id, samples(self.name, reply.round_id)

        def step(name: str) -> None:
            self.events.write(kind=name, round_id=round_id)
            time.sleep(args.step_pause)
            if name == args.stall_after_step:
                self.events.write(kind="stalled", round_id=round_id, step=name)
                time.sleep(3600)  # until the test kills this process

        self.doing = "secure"
        try:
            result = protocol.run(
                client, reply, increment(self.name, round_id, self.length), count, FINGERPRINT,
                reply.state_version, patience_s=120.0, on_step=step,
            )
        except protocol.RoundLeft as exc:
            self.events.write(kind="left", round_id=round_id, details=str(exc))
            return
        except secagg.SecAggError as exc:  # the server told this edge something it must not accept
            self.events.write(kind="distrust", round_id=round_id, details=str(exc))
            return
        except grpc.RpcError as exc:  # the round moved on (a phase or the round ended meanwhile)
            if retry.status_code(exc) not in ROUND_GONE:
                raise
            code = retry.status_code(exc).name
            self.events.write(kind="refused", round_id=round_id, code=code, details=exc.details())
            return
        finally:
            client.close()
        moved = result.upload.moved
        # What the upload stands for (with code bits: its codes times their step), for exact checks.
        np.save(self.args.out / f"{self.name}.r{round_id}.decoded.npy", result.upload.decoded)
        self.receipts.write(
            edge=self.name, round_id=round_id, samples=count, raw_bytes=moved.raw, wire_bytes=moved.wire,
            how="secure", revealed=result.revealed,
        )
        self.events.write(kind="receipt", round_id=round_id)

    def straddle(self, client: FederationClient, round_id: int) -> None:
        """Make the client's upload stream send its header, then wait until the round's upload
        phase ended (polling GetSecureRound), then send its chunks: a slow link whose upload is
        still streaming when the phase clock fixes the survivors."""
        stub = client._stub  # the client builds its own stub; only its upload stream is slowed
        send = stub.UploadIncrement

        def held(messages: Iterator[pb.UploadMessage]) -> Iterator[pb.UploadMessage]:
            stream = iter(messages)
            yield next(stream)  # the header: checked while the upload phase is still on
            self.events.write(kind="straddling", round_id=round_id)
            while client.secure_round(round_id, pb.SECURE_PHASE_UPLOAD, 1).phase == pb.SECURE_PHASE_UPLOAD:
                pass
            self.events.write(kind="straddled", round_id=round_id)
            yield from stream

        stub.UploadIncrement = lambda messages, **kw: send(held(messages), **kw)

    def download(self) -> None:
        """Fetch the global state unless we hold its version; note its digest in the events."""
        self.events.write(kind="download", held=self.held_version)
        self.doing = "download"
        found = self.call(self._download_once)
        if found is not None:
            self.held_version, digest = found
            self.events.write(kind="downloaded", version=self.held_version, sha256=digest)

    def _download_once(self) -> tuple[int, str] | None:
        request = pb.DownloadStateRequest(held_state_version=self.held_version)
        stream = iter(self.stub.DownloadState(request, timeout=RPC_TIMEOUT_S))
        header = next(stream).header
        if header.unchanged:
            return None
        assembler = tensors.ChunkAssembler(list(header.tensors), header.encoding, header.compression)
        for k, message in enumerate(stream):
            if message.WhichOneof("kind") == "trailer":
                (vector,) = assembler.finish(message.trailer)
                return int(header.state_version), hashlib.sha256(vector.tobytes()).hexdigest()
            assembler.add(message.chunk)
            self.events.write(kind="download_chunk", seq=k)
            time.sleep(self.args.chunk_pause)
        raise WireFormatError("the state stream ended without a trailer")

    def upload(self, round_id: int, version: int) -> None:
        """Upload this round's increment; record it once acknowledged (receipt or GetRound)."""
        count = samples(self.name, round_id)
        encoding = encodings.NAMES[self.args.encoding]
        encoder = tensors.ChunkEncoder(
            [increment(self.name, round_id, self.length)],
            encoding,
            pb.COMPRESSION_ZSTD,
            level=1,
            chunk_elems=self.args.chunk_elems,
            rounding="nearest",
        )
        chunks, trailer = list(encoder.chunks()), encoder.trailer()
        header = upload_header(round_id, count, FINGERPRINT, encoding, version)
        stall = self.args.stall_after_chunks if self.uploads == 0 else -1
        self.uploads += 1

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=header)
            for k, chunk in enumerate(chunks):
                if k == stall:
                    self.events.write(kind="stalled", round_id=round_id, chunks=k)
                    time.sleep(3600)  # until the test kills this process
                yield pb.UploadMessage(chunk=chunk)
                self.events.write(kind="upload_chunk", round_id=round_id, seq=k)
                time.sleep(self.args.chunk_pause)
            self.events.write(kind="trailer", round_id=round_id)
            yield pb.UploadMessage(trailer=trailer)

        line = {
            "edge": self.name,
            "round_id": round_id,
            "samples": count,
            "raw_bytes": encoder.raw_bytes,
            "wire_bytes": encoder.wire_bytes,
        }
        for attempt in range(20):
            self.events.write(kind="upload", round_id=round_id, attempt=attempt)
            self.doing = "upload"
            try:
                receipt = self.call(lambda: self.stub.UploadIncrement(messages(), timeout=RPC_TIMEOUT_S))
            except grpc.RpcError as exc:
                code = retry.status_code(exc)
                if code not in ROUND_GONE:
                    raise
                self.events.write(kind="refused", round_id=round_id, code=code.name, details=exc.details())
                if self.listed(round_id):
                    self.receipts.write(**line, how="confirmed")
                    self.events.write(kind="receipt", round_id=round_id)
                    return
                if code != grpc.StatusCode.ALREADY_EXISTS:
                    return  # the round closed without it: not counted, join the next one
                time.sleep(0.2)  # an earlier attempt is still in progress on the server
                continue
            assert receipt.raw_bytes == encoder.raw_bytes and receipt.wire_bytes == encoder.wire_bytes
            self.receipts.write(**line, how="receipt", committed=receipt.committed_edges)
            self.events.write(kind="receipt", round_id=round_id)
            return
        raise RuntimeError(f"round {round_id}: ALREADY_EXISTS never confirmed by GetRound")

    def listed(self, round_id: int) -> bool:
        """Whether GetRound lists this edge as uploaded in ``round_id``."""
        self.doing = "get_round"
        status = self.call(self.stub.GetRound, pb.GetRoundRequest(round_id=round_id), timeout=RPC_TIMEOUT_S)
        return any(e.edge_id == self.name and e.uploaded for e in status.edges)


def main(argv: list[str] | None = None) -> int:
    """Run one light edge; exit 0 when the federation finished."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pki", type=Path, required=True, help="directory with ca.pem and <name>.pem/.key")
    parser.add_argument("--name", required=True, help="edge-<k>")
    parser.add_argument("--length", type=int, default=50_000, help="values in the model")
    parser.add_argument("--out", type=Path, required=True, help="directory of the JSON-lines files")
    parser.add_argument("--chunk-elems", dest="chunk_elems", type=int, default=4096)
    parser.add_argument("--encoding", choices=tuple(encodings.NAMES), default="float32", help="of uploads")
    parser.add_argument("--chunk-pause", dest="chunk_pause", type=float, default=0.0, help="seconds")
    parser.add_argument(
        "--stall-after-chunks",
        dest="stall_after_chunks",
        type=int,
        default=-1,
        help="in the first upload, stop sending after this many chunks (and wait to be killed)",
    )
    parser.add_argument(
        "--step-pause",
        dest="step_pause",
        type=float,
        default=0.0,
        help="in a secure round, seconds to wait after each step (so a test can act between steps)",
    )
    parser.add_argument(
        "--reveal-delay",
        dest="reveal_delay",
        type=float,
        default=0.0,
        help="in a secure round, seconds to wait before revealing shares (the others may close it first)",
    )
    parser.add_argument(
        "--reveal-after",
        dest="reveal_after",
        type=Path,
        default=None,
        help="in a secure round, wait before revealing shares until this file exists",
    )
    parser.add_argument(
        "--straddle-upload",
        dest="straddle_upload",
        action="store_true",
        help="in a secure round, hold the upload stream after its header until the upload phase ended",
    )
    parser.add_argument(
        "--stall-after-step",
        dest="stall_after_step",
        default="",
        help="in a secure round, stop after this step (advertised, shared, uploaded) and wait to be killed",
    )
    edge = LightEdge(parser.parse_args(argv))
    try:
        edge.run()
    finally:
        edge.channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
