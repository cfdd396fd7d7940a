"""Fault-corpus fixtures: a PKI with bad certificates, real aggregators, and fedclient on the path."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedocr import harness, pki

# fedclient lives beside the aggregator tests (pytest runs in importlib mode)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "aggregator"))

from fedclient import Client  # noqa: E402

from aggregator.config import AggregatorConfig  # noqa: E402
from aggregator.server import Running, start  # noqa: E402

EDGES = 5


class FaultPki:
    """CA; server `aggregator`; edges edge-0..edge-4; observer `ops`; and bad client certificates:
    `edge-expired`, `edge-future` (our CA), `roleless` (our CA, no role URI) and a foreign CA's
    `edge-1` (same name as ours, another issuer)."""

    def __init__(self, root: Path) -> None:
        self.dir, self.foreign_dir = root / "federation", root / "foreign"
        now, day = dt.datetime.now(dt.UTC), dt.timedelta(days=1)
        harness.make_pki(self.dir, EDGES)
        pki.issue(self.dir, pki.ROLE_EDGE, "edge-expired", not_before=now - 10 * day, not_after=now - day)
        pki.issue(self.dir, pki.ROLE_EDGE, "edge-future", not_before=now + day, not_after=now + 10 * day)
        self._issue_roleless("roleless")
        pki.create_ca(self.foreign_dir, common_name="Another federation's CA")
        pki.issue(self.foreign_dir, pki.ROLE_EDGE, "edge-1")

    def _issue_roleless(self, name: str) -> None:
        """A client certificate signed by our CA that names no role (no fedocr:// URI)."""
        ca_cert = x509.load_pem_x509_certificate((self.dir / pki.CA_CERT_FILE).read_bytes())
        ca_key = serialization.load_pem_private_key((self.dir / pki.CA_KEY_FILE).read_bytes(), None)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        pki.key_path(self.dir, name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        pki.cert_path(self.dir, name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca(self) -> Path:
        return self.dir / pki.CA_CERT_FILE

    def pair(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of `name`; `foreign:NAME` for the foreign CA's certificate."""
        if name.startswith("foreign:"):
            name = name.removeprefix("foreign:")
            return pki.cert_path(self.foreign_dir, name), pki.key_path(self.foreign_dir, name)
        return pki.cert_path(self.dir, name), pki.key_path(self.dir, name)

    def server_config(self, state_dir: Path, **overrides) -> AggregatorConfig:
        """An mTLS config on an ephemeral 127.0.0.1 port."""
        cert, key = self.pair("aggregator")
        values = {
            "listen": "127.0.0.1:0",
            "state_dir": state_dir,
            "deadline_s": 60.0,
            "join_wait_max_s": 1.0,
            "max_workers": 16,
            "cert": cert,
            "key": key,
            "ca": self.ca,
            **overrides,
        }
        return AggregatorConfig(**values)


@pytest.fixture(scope="session")
def fault_pki(tmp_path_factory: pytest.TempPathFactory) -> FaultPki:
    """The session's fault PKI."""
    return FaultPki(tmp_path_factory.mktemp("fault-pki"))


@pytest.fixture
def serve(fault_pki: FaultPki, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Factory: start a real aggregator with config overrides; stopped after the test."""
    started: list[Running] = []

    def _start(**overrides) -> Running:
        running = start(fault_pki.server_config(tmp_path / f"state-{len(started)}", **overrides))
        started.append(running)
        return running

    yield _start
    for running in started:
        running.stop(grace=0.5)


@pytest.fixture
def connect(fault_pki: FaultPki) -> Iterator[Callable[..., Client]]:
    """Factory: a Client with certificate `name` to a running server; closed after the test."""
    clients: list[Client] = []

    def _connect(running: Running, name: str = "edge-0") -> Client:
        client = Client(running.port, fault_pki.ca, *fault_pki.pair(name))
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()
