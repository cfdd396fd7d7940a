"""The services on 127.0.0.1: a throwaway PKI and federation key, the one `aggregator serve` and
`edge_agent` command lines, starting an aggregator, and ListRounds as the observer."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from fedocr import pki
from fedocr.harness.processes import Service, run_command, start_service

PY = sys.executable
SERVER = "aggregator"  # the aggregator's certificate name
SERVER_HOSTS = ("127.0.0.1", "localhost")
OBSERVER = "ops"  # the certificate ListRounds is asked with
KEY_FILE = "federation.key"  # the federation key's name in a work directory


def make_pki(directory: Path, edges: int | Sequence[str], hosts: Sequence[str] = SERVER_HOSTS) -> Path:
    """A CA, the aggregator's certificate for ``hosts``, edge certificates (``edge-K`` for K below
    ``edges``, or the names given) and the observer's, made by fedocr.pki; files there are kept.

    Returns:
        ``directory``.
    """
    if not (directory / pki.CA_CERT_FILE).exists():
        pki.create_ca(directory)
    names = [f"edge-{k}" for k in range(edges)] if isinstance(edges, int) else list(edges)
    wanted = [(pki.ROLE_SERVER, SERVER, hosts), *((pki.ROLE_EDGE, name, ()) for name in names)]
    for role, name, its_hosts in [*wanted, (pki.ROLE_OBSERVER, OBSERVER, ())]:
        if not pki.cert_path(directory, name).exists():
            pki.issue(directory, role, name, hosts=its_hosts)
    return directory


def make_key(work: Path) -> Path:
    """The federation key that only the edges read, ``work/federation.key``, made by `edge_agent
    keygen` in a child process (fedocr does not import the edge's code); kept if it exists."""
    key = work / KEY_FILE
    if not key.exists():
        run_command([PY, "-m", "edge_agent.cli", "keygen", "--out", str(key)])
    return key


def aggregator_command(
    pki_dir: Path, state_dir: Path, listen: str = "127.0.0.1:0", config: Path | None = None,
    flags: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """The `aggregator serve` command line, over mTLS with ``pki_dir``'s server certificate;
    ``flags`` override ``config`` (a TOML file), which overrides the aggregator's defaults."""
    return [
        PY, "-m", "aggregator.cli", "serve",
        *(["--config", str(config)] if config is not None else []),
        "--listen", listen,
        "--state-dir", str(state_dir),
        "--cert", str(pki.cert_path(pki_dir, SERVER)),
        "--key", str(pki.key_path(pki_dir, SERVER)),
        "--ca", str(pki_dir / pki.CA_CERT_FILE),
        *flags,
    ]  # fmt: skip


def start_aggregator(
    pki_dir: Path, state_dir: Path, log: Path, listen: str = "127.0.0.1:0", config: Path | None = None,
    flags: Sequence[str] = (),
) -> Service:  # fmt: skip
    """`aggregator serve` (see aggregator_command) as a child, once it listens; stderr goes to ``log``.

    Raises:
        HarnessError: it did not start (the message ends with its log).
    """
    return start_service(aggregator_command(pki_dir, state_dir, listen, config, flags), log)


def edge_command(
    pki_dir: Path, name: str, server: str, key: Path, shard: Path, work_dir: Path, flags: Sequence[str] = ()
) -> list[str]:
    """The `edge_agent` command line of edge ``name`` (its certificate in ``pki_dir``), plus ``flags``."""
    return [
        PY, "-m", "edge_agent.cli",
        "--shard", str(shard),
        "--server", server,
        "--key", str(key),
        "--cert", str(pki.cert_path(pki_dir, name)),
        "--cert-key", str(pki.key_path(pki_dir, name)),
        "--ca", str(pki_dir / pki.CA_CERT_FILE),
        "--work-dir", str(work_dir),
        *flags,
    ]  # fmt: skip


def list_rounds(pki_dir: Path, port: int, host: str = "127.0.0.1") -> dict:
    """ListRounds as the observer, as JSON (what `grpcurl ... ListRounds` shows).

    Raises:
        grpc.RpcError: the aggregator did not answer within 30 s.
    """
    from google.protobuf import json_format

    from fedocr import tls
    from fedocr.v1 import federation_pb2 as pb
    from fedocr.v1 import federation_pb2_grpc as pb_grpc

    channel = tls.secure_channel(
        f"{host}:{port}", pki_dir / pki.CA_CERT_FILE, pki.cert_path(pki_dir, OBSERVER),
        pki.key_path(pki_dir, OBSERVER),
    )  # fmt: skip
    try:
        reply = pb_grpc.FederationStub(channel).ListRounds(pb.ListRoundsRequest(), timeout=30)
    finally:
        channel.close()
    return json_format.MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
