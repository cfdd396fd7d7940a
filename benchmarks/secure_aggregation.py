"""Secure aggregation's cost (not a test): per-edge bytes and server CPU per round, against plain FedAvg.

    .venv/bin/python -m benchmarks.secure_aggregation [--values 210000] [--edges 10,50,200] [--dropout 0.1]
        [--code-bits 4]

The aggregator's domain object (aggregator.coordinator.RoundCoordinator, with its LMDB store and fsyncs)
runs in this process; n simulated edges (edge_agent.secure.session.EdgeSession) drive it through every
phase of a secure round, then the same n edges upload plain float32 increments (zstd level 3) to
a plain federation. Server CPU is this process's CPU time inside the aggregator's calls only (the
edges' masking and encoding are outside it). Bytes per edge are protobuf sizes of every request
and reply of the edge's secure phases plus its upload's wire bytes, against the plain upload's
wire bytes (downloads are the same in both modes and left out). --dropout makes that fraction of
edges drop after dealing their shares, so the server rebuilds their mask keys and removes the
masks left dangling (the most work it can have). --code-bits b runs each secure round a second
time with compressed masked uploads (``[secure_aggregation] code_bits``): b-bit codes masked modulo
2^8, 2^16 or 2^32, whichever is the narrowest that the roster's size allows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aggregator import messages
from aggregator.config import AggregatorConfig
from aggregator.coordinator import RoundCoordinator
from aggregator.rounds import Bytes
from aggregator.store import Manifest, Store
from edge_agent.secure.protocol import settings_of
from edge_agent.secure.session import EdgeSession
from fedocr import encodings, secagg
from fedocr.client import encode_upload
from fedocr.v1 import federation_pb2 as pb

FINGERPRINT = b"\x5a" * 32


class Meter:
    """CPU and wall seconds spent inside the aggregator's calls."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.cpu += time.process_time() - c0
            self.wall += time.perf_counter() - w0


def stream(round_id: int, encoder, samples: int, encoding: int) -> list[pb.UploadMessage]:
    header = pb.UploadHeader(
        round_id=round_id, sample_count=samples, fingerprint=FINGERPRINT, encoding=encoding,
        compression=pb.COMPRESSION_ZSTD,
    )
    chunks = [pb.UploadMessage(chunk=c) for c in encoder.chunks()]
    return [pb.UploadMessage(header=header), *chunks, pb.UploadMessage(trailer=encoder.trailer())]


def federation(root: Path, name: str, n: int, **settings: Any) -> RoundCoordinator:
    config = AggregatorConfig(
        state_dir=root / name, quorum=n, min_edges=max(2, n // 2), total_rounds=2, deadline_s=1e6, **settings
    )
    return RoundCoordinator(config, Store(config.state_dir), clock=lambda: 0.0)


def plain_round(root: Path, n: int, length: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(server CPU s, server wall s, mean upload wire bytes per edge) of one plain round."""
    fed, meter = federation(root, "plain", n), Meter()
    manifest = Manifest(((0, length, False),), FINGERPRINT)
    wire = 0
    for k in range(n):
        meter(fed.join, f"edge-{k}", manifest, 0)
    for k in range(n):
        x = (rng.standard_normal(length) * 1e-3).astype(np.float32)
        encoder = encode_upload(x, 0, pb.ENCODING_FLOAT32)
        msgs = stream(1, encoder, 100, pb.ENCODING_FLOAT32)
        meter(fed.upload, f"edge-{k}", iter(msgs))
        wire += encoder.wire_bytes
    if fed.round_status(1).state != "CLOSED":
        raise RuntimeError("the plain round did not close")
    return meter.cpu, meter.wall, wire / n


def secure_round(
    root: Path, n: int, length: int, dropout: float, rng: np.random.Generator, code_bits: int = 0
) -> dict[str, float]:
    """Server CPU, wall and per-edge bytes of one secure round with ``dropout`` dropped before upload."""
    name = f"secure-{code_bits}"
    fed = federation(root, name, n, secure_aggregation=True, secagg_code_bits=code_bits)
    meter = Meter()
    manifest = Manifest(((0, length, False),), FINGERPRINT)
    ids = [f"edge-{k}" for k in range(n)]
    dropped = set(ids[: int(round(dropout * n))])
    sent = dict.fromkeys(ids, 0)
    sessions: dict[str, EdgeSession] = {}

    def tick() -> None:
        with fed._cond:
            meter(fed._tick)

    def status(e: str, after: str) -> Any:
        view = meter(fed.secure.secure_round, e, 1, after, 0)
        sent[e] += messages.secure_status(view).ByteSize()
        return view

    for e in ids:
        reply = meter(fed.join, e, manifest, 0)
        sec = reply.round.secure
        sessions[e] = EdgeSession(e, 1, settings_of(messages.plan_message(reply.round.plan, sec)))
        c, s = sessions[e].advertisement()
        sent[e] += pb.AdvertiseKeysRequest(round_id=1, cipher_public=c, mask_public=s).ByteSize()
        sent[e] += messages.secure_status(meter(fed.secure.advertise, e, 1, c, s, Bytes())).ByteSize()
    tick()
    for e in ids:
        view = status(e, "ADVERTISE")
        roster = [k[:4] for k in view.roster]  # id, x, cipher and mask keys (signatures unchecked here)
        sealed, commits = sessions[e].deal(roster, view.neighbours, view.threshold)
        cipher_keys = {x: c for x, _, c, _ in roster}
        request = pb.ShareKeysRequest(
            round_id=1,
            sealed=[pb.SealedShare(holder=h, ciphertext=ct) for h, ct in sealed.items()],
            commitments=[
                pb.ShareCommitment(holder=h, self_seed=b, mask_key=m) for h, (b, m) in commits.items()
            ],
        )
        sent[e] += request.ByteSize()
        sent[e] += messages.secure_status(meter(fed.secure.share, e, 1, sealed, commits, Bytes())).ByteSize()
    tick()
    k, t = fed.round_status().secure.neighbours, fed.round_status().secure.threshold
    upload_wire = []
    for e in ids:
        if e in dropped:
            continue
        view = status(e, "SHARE")
        sessions[e].receive(view.dealers, view.sealed, cipher_keys)
        x = (rng.standard_normal(length) * 1e-3).astype(np.float32)
        encoding = encodings.MASKED_BY_WIDTH[sessions[e].width()]
        encoder = encode_upload(sessions[e].masked(x, 100), 0, encoding)
        msgs = stream(1, encoder, 100, encoding)
        meter(fed.upload, e, iter(msgs))
        sent[e] += encoder.wire_bytes
        upload_wire.append(encoder.wire_bytes)
    if dropped:
        with fed._cond:
            fed._clock = lambda: 1e5  # past the upload phase's deadline: the dropped are dropped
            tick()
    for e in ids:
        if e in dropped:
            continue
        view = status(e, "UPLOAD")
        if view.phase == "DONE":
            break
        shares = sessions[e].reveal(view.survivors, view.dropped)
        kinds = {"self_seed": pb.SHARE_KIND_SELF_SEED, "mask_key": pb.SHARE_KIND_MASK_KEY}
        request = pb.RevealSharesRequest(
            round_id=1, shares=[pb.RevealedShare(dealer=d, kind=kinds[q], share=v) for d, q, v in shares]
        )
        sent[e] += request.ByteSize()
        sent[e] += messages.secure_status(meter(fed.secure.reveal, e, 1, shares, Bytes())).ByteSize()
    tick()
    closed = fed.round_status(1)
    if closed.state != "CLOSED":
        raise RuntimeError(f"the secure round did not close: {closed.message}")
    alive = [sent[e] for e in ids if e not in dropped]
    return {
        "cpu": meter.cpu,
        "wall": meter.wall,
        "bytes": float(np.mean(alive)),
        "upload": float(np.mean(upload_wire)),
        "k": k,
        "t": t,
        "dropped": len(dropped),
        "width": sessions[ids[-1]].width(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--values", type=int, default=210_000, help="model values (the demo's fedocr-tiny at γ = 1/2)"
    )
    parser.add_argument("--edges", default="10,50,200")
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction dropped after dealing")
    parser.add_argument("--code-bits", type=int, default=4, help="compressed uploads' code bits (0: off)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"model: {args.values:,} values; dropped before upload: {args.dropout:.0%}")
    rows = []
    for n in (int(x) for x in args.edges.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            plain_cpu, plain_wall, plain_bytes = plain_round(Path(tmp), n, args.values, rng)
            runs = [secure_round(Path(tmp), n, args.values, args.dropout, rng)]
            if args.code_bits:
                runs.append(secure_round(Path(tmp), n, args.values, args.dropout, rng, args.code_bits))
        for s, what in zip(runs, ("32-bit fixed point", f"{args.code_bits}-bit codes"), strict=False):
            assert s["k"] == min(secagg.neighbour_count(n), n - 1)
            rows.append(
                f"| {n} | {what} ({s['width']}-bit masked values) | {s['k']} | {s['t']} | "
                f"{plain_bytes / 1e3:,.1f} | {s['upload'] / 1e3:,.1f} | {s['upload'] / args.values:.2f} | "
                f"{(s['bytes'] - s['upload']) / 1e3:,.1f} | {s['bytes'] / plain_bytes:.3f} | "
                f"{plain_cpu:.2f} / {s['cpu']:.2f} | {s['cpu'] / plain_cpu:.2f} | "
                f"{plain_wall:.2f} / {s['wall']:.2f} |"
            )
            print(rows[-1], flush=True)
    print()
    print(
        "| edges | secure uploads | k (SecAgg+ neighbour_count) | threshold | plain float32 upload KB/edge "
        "(zstd) | masked upload KB/edge | masked upload bytes a value | protocol KB/edge | bytes ratio, "
        "secure / plain | server CPU s, plain / secure | CPU ratio | server wall s, plain / secure |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
