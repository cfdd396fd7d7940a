"""A numpy test client of fedocr.v1.Federation: join, download, upload, status (and raw streams)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc
import numpy as np

from fedocr import tensors, tls
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

FINGERPRINT = b"\x11" * 32
TIMEOUT = 20.0


def manifest(lengths: Sequence[int], fingerprint: bytes = FINGERPRINT) -> pb.Manifest:
    """A manifest of tensors 0..n-1 with the given lengths."""
    return pb.Manifest(
        tensors=[pb.TensorSpec(id=i, length=n) for i, n in enumerate(lengths)], fingerprint=fingerprint
    )


def upload_messages(
    round_id: int,
    arrays: Sequence[np.ndarray],
    samples: int = 1,
    fingerprint: bytes = FINGERPRINT,
    compression: int = pb.COMPRESSION_ZSTD,
    encoding: int = pb.ENCODING_FLOAT32,
    chunk_elems: int = tensors.DEFAULT_CHUNK_ELEMS,
    base_state_version: int = 0,
) -> list[pb.UploadMessage]:
    """A well-formed upload stream (header, chunks, trailer) as a list tests may tamper with."""
    encoder = tensors.ChunkEncoder(arrays, encoding, compression, chunk_elems=chunk_elems, level=1)
    header = pb.UploadHeader(
        round_id=round_id,
        sample_count=samples,
        fingerprint=fingerprint,
        encoding=encoding,
        compression=compression,
        base_state_version=base_state_version,
    )
    out = [pb.UploadMessage(header=header)]
    out += [pb.UploadMessage(chunk=c) for c in encoder.chunks()]
    out.append(pb.UploadMessage(trailer=encoder.trailer()))
    return out


class Client:
    """One peer (edge or observer) over mutual TLS."""

    def __init__(self, port: int, ca: Path, cert: Path, key: Path) -> None:
        self.channel = tls.secure_channel(f"127.0.0.1:{port}", ca, cert, key)
        self.stub = pb_grpc.FederationStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def join(
        self, lengths: Sequence[int], wait: int = 0, fingerprint: bytes = FINGERPRINT
    ) -> pb.JoinResponse:
        """Join with a manifest of `lengths`."""
        request = pb.JoinRequest(manifest=manifest(lengths, fingerprint), wait_seconds=wait)
        return self.stub.Join(request, timeout=TIMEOUT + wait)

    def download(self, held: int = 0) -> tuple[pb.StateHeader, list[np.ndarray] | None]:
        """Download and decode the global state; arrays are None when the header says unchanged."""
        stream = iter(
            self.stub.DownloadState(pb.DownloadStateRequest(held_state_version=held), timeout=TIMEOUT)
        )
        header = next(stream).header
        if header.unchanged:
            return header, None
        assembler = tensors.ChunkAssembler(list(header.tensors), header.encoding, header.compression)
        for message in stream:
            if message.WhichOneof("kind") == "chunk":
                assembler.add(message.chunk)
            else:
                return header, assembler.finish(message.trailer)
        raise AssertionError("download ended without a trailer")

    def upload(self, round_id: int, arrays: Sequence[np.ndarray], samples: int = 1, **kw) -> pb.UploadReceipt:
        """Upload an increment (float32 arrays in manifest order)."""
        return self.send(upload_messages(round_id, arrays, samples, **kw))

    def send(self, messages: Iterable[pb.UploadMessage]) -> pb.UploadReceipt:
        """Send a raw upload stream."""
        return self.stub.UploadIncrement(iter(messages), timeout=TIMEOUT)

    def get_round(self, round_id: int = 0) -> pb.RoundStatus:
        """GetRound."""
        return self.stub.GetRound(pb.GetRoundRequest(round_id=round_id), timeout=TIMEOUT)

    def list_rounds(self) -> pb.ListRoundsResponse:
        """ListRounds."""
        return self.stub.ListRounds(pb.ListRoundsRequest(), timeout=TIMEOUT)


def code_of(call, *args, **kw) -> grpc.StatusCode:
    """Run a client call expected to fail; return its status code."""
    try:
        call(*args, **kw)
    except grpc.RpcError as exc:
        return exc.code()
    raise AssertionError(f"{getattr(call, '__name__', call)} succeeded; an error status was expected")
