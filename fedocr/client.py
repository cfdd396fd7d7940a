"""A participant's side of fedocr.v1.Federation (an edge, or a leaf aggregator toward its root): join,
download the global state, upload an increment.

Every call retries transient failures (aggregator down or restarting) with capped exponential
backoff and full jitter; anything else is raised as a grpc.RpcError for the agent to judge.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedocr import retry, secagg, tensors, tls
from fedocr.errors import WireFormatError
from fedocr.v1 import federation_pb2 as pb
from fedocr.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# The packed vector travels as two tensors: its parameters as id 0 and its running statistics
# (the vector's last values, recognizer.state.pack_state) as id 1, marked exact: they go in float32
# whatever the round's encoding, because a quantized small variance breaks the model.
TENSOR_ID = 0
STATISTICS_ID = 1
# Upload chunks of 256 KiB decoded: well under the aggregator's per-chunk limit.
UPLOAD_CHUNK_ELEMS = 65536
RPC_TIMEOUT_S = 120.0
# How quantized uploads round: stochastically (unbiased) without error feedback; with it, to the
# nearest level at each block's fitted scale, the residual carrying what that drops
# (fedocr.encodings; benchmarks/quantization.py measures them).
UPLOAD_ROUNDING = "stochastic"
FEEDBACK_ROUNDING = "fit"
# How often an ALREADY_EXISTS answer is checked against the round's record before giving up.
DUPLICATE_CHECKS = 6


class UploadUnconfirmed(RuntimeError):
    """The aggregator keeps answering ALREADY_EXISTS but its round record never lists the upload."""


@dataclass(frozen=True)
class Transfer:
    """Payload bytes of one download or upload, before (raw) and after (wire) compression."""

    raw: int = 0
    wire: int = 0


@dataclass(frozen=True)
class Download:
    """A downloaded global state: its version, the flat vector, and the bytes it took."""

    version: int
    vector: np.ndarray
    moved: Transfer


@dataclass(frozen=True)
class Upload:
    """An upload the aggregator acknowledged; ``receipt`` is None when it had already counted it.

    ``decoded`` is the increment as the aggregator decodes it (the sent one, for float32).
    """

    receipt: pb.UploadReceipt | None
    moved: Transfer
    decoded: np.ndarray


@dataclass(frozen=True)
class Endpoint:
    """Where the aggregator is and the edge's mutual-TLS material."""

    server: str
    ca: Path
    cert: Path
    key: Path
    server_name: str | None = None


def manifest_specs(length: int, statistics: int, hidden: int = 0) -> list[pb.TensorSpec]:
    """The TensorSpecs of a packed vector of ``length`` values whose last ``statistics`` are exact;
    with ``hidden``, its last ``hidden`` values are a secure upload's hidden weights, after them."""
    specs = [pb.TensorSpec(id=TENSOR_ID, length=length - statistics - hidden)]
    if statistics:
        specs.append(pb.TensorSpec(id=STATISTICS_ID, length=statistics, exact=True))
    if hidden:
        specs.append(pb.TensorSpec(id=secagg.WEIGHT_TENSOR_ID, length=hidden, exact=True))
    return specs


def encode_upload(
    increment: np.ndarray,
    statistics: int,
    encoding: int,
    zstd_level: int = 3,
    rounding: str = UPLOAD_ROUNDING,
    seed: int = 0,
    hidden: int = 0,
) -> tensors.ChunkEncoder:
    """The ChunkEncoder of an upload: the parameters in ``encoding``, the last ``statistics`` exact
    (and after them ``hidden`` hidden weights of a secure upload)."""
    specs = manifest_specs(increment.size, statistics, hidden)
    return encode_tensors(increment, specs, encoding, zstd_level, rounding=rounding, seed=seed)


def encode_tensors(
    vector: np.ndarray,
    specs: Sequence[pb.TensorSpec | tuple[int, int, bool]],
    encoding: int,
    zstd_level: int = 3,
    chunk_elems: int = UPLOAD_CHUNK_ELEMS,
    rounding: str = UPLOAD_ROUNDING,
    seed: int = 0,
) -> tensors.ChunkEncoder:
    """The ChunkEncoder of a flat ``vector`` cut into the tensors of ``specs`` (TensorSpecs or
    (id, length, exact)), zstd-compressed: an edge's upload, or a leaf's sum for its root."""
    triples = [tensors.spec_tuple(s) for s in specs]
    return tensors.ChunkEncoder(
        np.split(vector, np.cumsum([n for _, n, _ in triples])[:-1]),
        encoding,
        pb.COMPRESSION_ZSTD,
        level=zstd_level,
        chunk_elems=chunk_elems,
        ids=[i for i, _, _ in triples],
        rounding=rounding,
        seed=seed,
        exact=[e for _, _, e in triples],
    )


def upload_header(
    round_id: int, samples: int, fingerprint: bytes, encoding: int, base_version: int
) -> pb.UploadHeader:
    """The first message of an upload: its round, weight, model fingerprint, zstd and base state version."""
    return pb.UploadHeader(
        round_id=round_id,
        sample_count=samples,
        fingerprint=fingerprint,
        encoding=encoding,
        compression=pb.COMPRESSION_ZSTD,
        base_state_version=base_version,
    )


def read_state(
    stream: Iterable[pb.StateChunk], held_version: int, held: np.ndarray | None
) -> Download | None:
    """Apply a DownloadState stream's segments in order to the state held (None when it says
    ``held_version`` is current). Each segment is the full state or the change from the version
    before it; the state after each must match the SHA-256 its header announces (StateMismatch)."""
    version, vector, raw, wire = held_version, held, 0, 0
    header, chunks = None, []
    for message in stream:
        kind = message.WhichOneof("kind")
        if kind == "header" and header is None:
            header, chunks = message.header, []
            if header.unchanged:
                return None
            ids = [s.id for s in header.tensors]
            if ids not in ([TENSOR_ID], [TENSOR_ID, STATISTICS_ID]):
                raise WireFormatError(f"expected the packed parameters and statistics, the state has {ids}")
            base = header.base_state_version
            if base and (vector is None or base != version):
                raise WireFormatError(f"a change from state version {base}; this edge holds {version}")
        elif kind == "chunk" and header is not None:
            chunks.append(message.chunk)
        elif kind == "trailer" and header is not None:
            base = vector if header.base_state_version else None
            vector, decoded = tensors.apply_segment(
                base, list(header.tensors), header.encoding, chunks, message.trailer, header.compression
            )
            if header.state_sha256 and tensors.state_sha256(vector) != header.state_sha256:
                built = "" if base is None else f", built on the held version {version},"
                raise tensors.StateMismatch(
                    f"state version {header.state_version}{built} does not match the SHA-256 sent with it"
                )
            version, header = int(header.state_version), None
            raw, wire = raw + decoded, wire + sum(len(c.payload) for c in chunks)
        else:
            raise WireFormatError(f"a state {kind} out of place in the download stream")
    if header is not None or vector is None or version == held_version:
        raise WireFormatError("the state stream ended inside a segment or without one")
    return Download(version, vector, Transfer(raw=raw, wire=wire))


class FederationClient:
    """One edge's channel to the aggregator, with retries on transient failures."""

    def __init__(
        self,
        endpoint: Endpoint,
        policy: retry.RetryPolicy,
        on_retry: Callable[[retry.RetryEvent], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._channel = tls.secure_channel(
            endpoint.server, endpoint.ca, endpoint.cert, endpoint.key, server_name=endpoint.server_name
        )
        self._stub = pb_grpc.FederationStub(self._channel)
        self._invoker = retry.RetryInvoker(policy, on_retry=on_retry)
        # A busy aggregator sheds uploads with RESOURCE_EXHAUSTED: back off and resend.
        busy_ok = dataclasses.replace(policy, retry_resource_exhausted=True)
        self._upload_invoker = retry.RetryInvoker(busy_ok, on_retry=on_retry)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def join(
        self, length: int, fingerprint: bytes, held_version: int, wait_s: int, statistics: int = 0
    ) -> pb.JoinResponse:
        """Ask for work with the manifest of a packed vector of ``length`` values (manifest_specs)."""
        manifest = pb.Manifest(tensors=manifest_specs(length, statistics), fingerprint=fingerprint)
        return self.join_manifest(manifest, held_version, wait_s)

    def join_manifest(self, manifest: pb.Manifest, held_version: int, wait_s: int) -> pb.JoinResponse:
        """Ask for work with a manifest as it is (a leaf aggregator passes on its edges')."""
        request = pb.JoinRequest(manifest=manifest, held_state_version=held_version, wait_seconds=wait_s)
        return self._invoker.call(self._stub.Join, request, timeout=RPC_TIMEOUT_S + wait_s)

    def download(self, held_version: int = 0, held: np.ndarray | None = None) -> Download | None:
        """The state to train from, or None when the aggregator says ``held_version`` is current.

        ``held`` is the state of ``held_version``: the aggregator may send only the changes since
        it. A state that does not match the SHA-256 its header announces is refused; when it was
        built on ``held``, the full state is downloaded once instead (a held state gone bad).
        """
        try:
            return self._invoker.call(self._download_once, held_version, held)
        except tensors.StateMismatch as exc:
            if held is None:
                raise
            log.warning("%s; downloading the full state", exc)
            return self._invoker.call(self._download_once, 0, None)

    def _download_once(self, held_version: int, held: np.ndarray | None) -> Download | None:
        request = pb.DownloadStateRequest(held_state_version=held_version if held is not None else 0)
        stream = self._stub.DownloadState(request, timeout=RPC_TIMEOUT_S)
        return read_state(stream, held_version if held is not None else 0, held)

    def upload(
        self,
        round_id: int,
        edge_id: str,
        increment: np.ndarray,
        samples: int,
        fingerprint: bytes,
        base_version: int,
        zstd_level: int = 3,
        encoding: int = pb.ENCODING_FLOAT32,
        seed: int = 0,
        statistics: int = 0,
        hidden: int = 0,
        rounding: str = UPLOAD_ROUNDING,
    ) -> Upload:
        """Stream ``increment`` for ``round_id`` in ``encoding`` (fedocr.encodings), zstd-compressed.

        Quantized encodings round as ``rounding`` says (stochastic rounding draws from ``seed``); the
        last ``statistics`` values go as the exact tensor (float32, manifest_specs).

        ALREADY_EXISTS counts as acknowledged, with no receipt, once the round's record lists this
        edge (a retry after the first attempt was counted but its receipt lost). Other refusals are
        raised.
        """
        header = upload_header(round_id, samples, fingerprint, encoding, base_version)
        encoder = encode_upload(
            increment, statistics, encoding, zstd_level, rounding=rounding, seed=seed, hidden=hidden
        )
        return self.send(header, encoder, edge_id)

    def send(self, header: pb.UploadHeader, encoder: tensors.ChunkEncoder, edge_id: str) -> Upload:
        """Stream an encoded upload (``upload`` says how refusals and ALREADY_EXISTS are taken)."""
        round_id = header.round_id
        chunks = list(encoder.chunks())  # encoded once; every retry resends the same bytes
        trailer = encoder.trailer()
        moved = Transfer(raw=encoder.raw_bytes, wire=encoder.wire_bytes)
        decoded = np.concatenate(encoder.decoded())

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=header)
            for chunk in chunks:
                yield pb.UploadMessage(chunk=chunk)
            yield pb.UploadMessage(trailer=trailer)

        for attempt in range(DUPLICATE_CHECKS):
            try:
                receipt = self._upload_invoker.call(
                    lambda: self._stub.UploadIncrement(messages(), timeout=RPC_TIMEOUT_S)
                )
                return Upload(receipt, moved, decoded)
            except grpc.RpcError as exc:
                if retry.status_code(exc) != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                # Either counted already (a retry whose first attempt's receipt was lost) or a
                # first attempt still in progress on the server: only the round's record can tell.
                if self.uploaded(round_id, edge_id):
                    log.info("round %s: the aggregator had already counted this upload", round_id)
                    return Upload(None, moved, decoded)
                time.sleep(min(30.0, 2.0**attempt))
        raise UploadUnconfirmed(
            f"round {round_id}: the aggregator reports an upload in progress that never completes"
        )

    # -- secure aggregation (edge_agent/secure/protocol.py runs them in order) -----------------

    def report_evaluation(self, version: int, generic: Any, personal: Any = None) -> pb.EvaluationReceipt:
        """Federated evaluation: the scores (``recognizer.train.EvalResult``) of global state
        ``version`` on this edge's held-out set, and of its personalized model when it has one."""
        request = pb.EvaluationReport(state_version=version, generic=_evaluation(generic))
        if personal is not None:
            request.personal.CopyFrom(_evaluation(personal))
        return self._invoker.call(self._stub.ReportEvaluation, request, timeout=RPC_TIMEOUT_S)

    @property
    def endpoint(self) -> Endpoint:
        """Where the aggregator is, and this edge's certificate, key and CA."""
        return self._endpoint

    def advertise(
        self, round_id: int, cipher_public: bytes, mask_public: bytes, signature: bytes = b"",
        certificate: bytes = b"",
    ) -> pb.SecureRoundStatus:
        """Advertise this round's two public keys, signed (a retry resends the same ones)."""
        request = pb.AdvertiseKeysRequest(
            round_id=round_id, cipher_public=cipher_public, mask_public=mask_public, signature=signature,
            certificate=certificate,
        )
        return self._invoker.call(self._stub.AdvertiseKeys, request, timeout=RPC_TIMEOUT_S)

    def share(
        self, round_id: int, sealed: dict[str, bytes], commitments: dict[str, tuple[bytes, bytes]]
    ) -> pb.SecureRoundStatus:
        """Hand over the shares this edge dealt, sealed per holder, with their commitments."""
        request = pb.ShareKeysRequest(
            round_id=round_id,
            sealed=[pb.SealedShare(holder=h, ciphertext=ct) for h, ct in sorted(sealed.items())],
            commitments=[
                pb.ShareCommitment(holder=h, self_seed=b, mask_key=s)
                for h, (b, s) in sorted(commitments.items())
            ],
        )
        return self._invoker.call(self._stub.ShareKeys, request, timeout=RPC_TIMEOUT_S)

    def secure_round(
        self, round_id: int, after: int, wait_s: int, confirmations: int = 0
    ) -> pb.SecureRoundStatus:
        """Long-poll until the round's secure phase is past ``after`` (a SecurePhase); in UNMASK,
        waiting after UPLOAD, also until ``confirmations`` survivors confirmed."""
        request = pb.GetSecureRoundRequest(
            round_id=round_id, after=after, wait_seconds=wait_s, confirmations=confirmations
        )
        return self._invoker.call(self._stub.GetSecureRound, request, timeout=RPC_TIMEOUT_S + wait_s)

    def confirm(self, round_id: int, signature: bytes) -> pb.SecureRoundStatus:
        """Send this survivor's signature of the survivors and dropped it was shown."""
        request = pb.ConfirmSurvivorsRequest(round_id=round_id, signature=signature)
        return self._invoker.call(self._stub.ConfirmSurvivors, request, timeout=RPC_TIMEOUT_S)

    def reveal(self, round_id: int, shares: list[tuple[str, str, bytes]]) -> pb.SecureRoundStatus:
        """Reveal (dealer, kind, share) triples; kind is "self_seed" or "mask_key"."""
        kinds = {"self_seed": pb.SHARE_KIND_SELF_SEED, "mask_key": pb.SHARE_KIND_MASK_KEY}
        request = pb.RevealSharesRequest(
            round_id=round_id,
            shares=[pb.RevealedShare(dealer=d, kind=kinds[k], share=s) for d, k, s in shares],
        )
        return self._invoker.call(self._stub.RevealShares, request, timeout=RPC_TIMEOUT_S)

    def uploaded(self, round_id: int, edge_id: str) -> bool:
        """Whether round ``round_id``'s record lists ``edge_id`` as uploaded."""
        return _lists_upload(self._round(round_id), edge_id)

    def counted(self, round_id: int, edge_id: str) -> bool:
        """Whether round ``round_id`` closed with ``edge_id``'s upload in its aggregate."""
        status = self._round(round_id)
        return status.state == pb.ROUND_STATE_CLOSED and _lists_upload(status, edge_id)

    def _round(self, round_id: int) -> pb.RoundStatus:
        return self._invoker.call(
            self._stub.GetRound, pb.GetRoundRequest(round_id=round_id), timeout=RPC_TIMEOUT_S
        )


def _evaluation(result: Any) -> pb.Evaluation:
    """The Evaluation message of an EvalResult."""
    return pb.Evaluation(samples=result.samples, loss=result.loss, word_accuracy=result.accuracy,
                         char_accuracy=result.char_accuracy)


def _lists_upload(status: pb.RoundStatus, edge_id: str) -> bool:
    return any(e.edge_id == edge_id and e.uploaded for e in status.edges)
