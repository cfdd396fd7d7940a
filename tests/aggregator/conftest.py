"""Aggregator fixtures: a PKI with many edges, and real servers on ephemeral 127.0.0.1 ports."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedocr import harness, pki

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fedclient (pytest runs in importlib mode)

from fedclient import Client  # noqa: E402

from aggregator.config import AggregatorConfig  # noqa: E402
from aggregator.server import Running, start  # noqa: E402

EDGES = 12


class AggPki:
    """A federation PKI: CA, server `aggregator`, edges edge-0..edge-11, observer `ops`, leaf `leaf-0`."""

    def __init__(self, root: Path) -> None:
        self.dir = harness.make_pki(root, EDGES)
        pki.issue(self.dir, pki.ROLE_LEAF, "leaf-0")  # a leaf aggregator, to this one its root

    @property
    def ca(self) -> Path:
        return self.dir / pki.CA_CERT_FILE

    def pair(self, name: str) -> tuple[Path, Path]:
        return pki.cert_path(self.dir, name), pki.key_path(self.dir, name)

    def tls_config(self) -> dict:
        cert, key = self.pair("aggregator")
        return {"cert": cert, "key": key, "ca": self.ca}


@pytest.fixture(scope="session")
def agg_pki(tmp_path_factory: pytest.TempPathFactory) -> AggPki:
    """The session's aggregator PKI."""
    return AggPki(tmp_path_factory.mktemp("agg-pki"))


@pytest.fixture
def serve(agg_pki: AggPki, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Factory: start a real aggregator (mTLS, 127.0.0.1:0) with config overrides; stopped after."""
    started: list[Running] = []

    def _start(**overrides) -> Running:
        values = {
            "listen": "127.0.0.1:0",
            "state_dir": tmp_path / "state",
            "deadline_s": 30.0,
            "join_wait_max_s": 5.0,
            "max_workers": 32,
            **agg_pki.tls_config(),
            **overrides,
        }
        running = start(AggregatorConfig(**values))
        started.append(running)
        return running

    yield _start
    for running in started:
        running.stop(grace=0.5)


@pytest.fixture
def connect(agg_pki: AggPki) -> Iterator[Callable[..., Client]]:
    """Factory: a Client for certificate `name` to a running server; closed after."""
    clients: list[Client] = []

    def _connect(running: Running, name: str = "edge-0") -> Client:
        client = Client(running.port, agg_pki.ca, *agg_pki.pair(name))
        clients.append(client)
        return client

    yield _connect
    for client in clients:
        client.close()
