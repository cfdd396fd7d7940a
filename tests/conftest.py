"""Shared fixtures: a throwaway federation PKI made by fedocr.pki, once per test session."""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedocr import harness, pki

# benchmarks/ is not an installed package: the repository root makes it importable however few
# test files run (importlib mode adds nothing).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM ends a run as Ctrl-C does, so the harness stops every service a test started (atexit)."""
    harness.stop_on_signals()


@dataclass(frozen=True)
class Pki:
    """Paths of a test PKI: ``dir`` holds the federation CA and its certificates; ``foreign_dir``
    holds another CA with one edge certificate (``edge-0`` too, so only the issuer differs)."""

    dir: Path
    foreign_dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / pki.CA_CERT_FILE

    def cert(self, name: str) -> Path:
        return pki.cert_path(self.dir, name)

    def key(self, name: str) -> Path:
        return pki.key_path(self.dir, name)

    def pair(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of ``name`` in the federation PKI."""
        return self.cert(name), self.key(name)

    @property
    def foreign_pair(self) -> tuple[Path, Path]:
        """(cert, key) of an edge certificate from the foreign CA."""
        return pki.cert_path(self.foreign_dir, "edge-0"), pki.key_path(self.foreign_dir, "edge-0")


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA; server ``aggregator`` for 127.0.0.1/localhost; edges ``edge-0``, ``edge-1``, ``edge-2``; observer
    ``ops``; edge ``edge-expired`` (expired yesterday) and ``edge-future`` (valid from tomorrow);
    and a foreign CA with an edge ``edge-0``."""
    root = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    fed, foreign = root / "federation", root / "foreign"
    pki.create_ca(fed)
    pki.issue(fed, pki.ROLE_SERVER, "aggregator", hosts=["127.0.0.1", "localhost"])
    for name in ("edge-0", "edge-1", "edge-2"):
        pki.issue(fed, pki.ROLE_EDGE, name)
    pki.issue(fed, pki.ROLE_OBSERVER, "ops")
    pki.issue(fed, pki.ROLE_EDGE, "edge-expired", not_before=now - 10 * day, not_after=now - day)
    pki.issue(fed, pki.ROLE_EDGE, "edge-future", not_before=now + day, not_after=now + 10 * day)
    pki.create_ca(foreign, common_name="Someone else's CA")
    pki.issue(foreign, pki.ROLE_EDGE, "edge-0")
    return Pki(dir=fed, foreign_dir=foreign)
