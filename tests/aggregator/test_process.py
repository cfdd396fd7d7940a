"""The aggregator as a real process: kill -9 and restart, grpcurl over mTLS, no torch imported."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedclient import Client, code_of, upload_messages

from fedocr import harness

VENV_BIN = Path(sys.executable).parent
LENGTHS = [300_000, 7]
FORBIDDEN = ("torch", "recognizer", "edge_agent")


class Proc:
    """`aggregator serve` in a child process (fedocr.harness); knows its port from its first line."""

    def __init__(self, agg_pki, state_dir: Path, *flags: str) -> None:
        log = state_dir.with_suffix(".log")
        self.service = harness.start_aggregator(
            agg_pki.dir, state_dir, log, flags=("--log-level", "WARNING", *flags)
        )
        self.port = self.service.port
        self.popen = self.service.popen

    def kill9(self) -> None:
        self.service.kill()

    def stop(self) -> None:
        self.service.stop()


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def increment(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=n).astype(np.float32) for n in LENGTHS]


def test_kill_9_loses_nothing_acknowledged(agg_pki, tmp_path: Path, procs) -> None:
    flags = ("--quorum", "4", "--min-edges", "4", "--weighting", "samples", "--log-uploads-from-bytes", "0")
    first = Proc(agg_pki, tmp_path / "state", *flags)
    procs.append(first)
    edges = [Client(first.port, agg_pki.ca, *agg_pki.pair(f"edge-{k}")) for k in range(3)]
    round_id = edges[0].join(LENGTHS).round_id
    for k in (0, 1):
        edges[k].join(LENGTHS)
        assert edges[k].upload(round_id, increment(k), samples=k + 1).committed_edges == k + 1
    logged = set((tmp_path / "state" / "spool").iterdir())
    assert len(logged) == 2  # acknowledged as logged uploads: the restart must replay them
    # edge-2 is mid-stream (header and one chunk sent, no trailer) when the process dies
    edges[2].join(LENGTHS)
    sent, hold = threading.Event(), threading.Event()
    messages = upload_messages(round_id, increment(2), samples=3, chunk_elems=100_000)

    def stalled():
        yield from messages[:2]
        sent.set()
        hold.wait(10)

    outcome: list[grpc.StatusCode] = []
    uploader = threading.Thread(target=lambda: outcome.append(code_of(edges[2].send, stalled())))
    uploader.start()
    assert sent.wait(10)
    spool_dir = tmp_path / "state" / "spool"
    deadline = time.monotonic() + 10
    while len(set(spool_dir.iterdir())) < 3 and time.monotonic() < deadline:  # edge-2's file, begun
        time.sleep(0.05)
    time.sleep(0.3)
    first.kill9()
    hold.set()
    uploader.join(15)
    assert outcome == [grpc.StatusCode.UNAVAILABLE]
    for c in edges:
        c.close()

    assert len(set(spool_dir.iterdir())) == 3  # edge-2's partial file
    second = Proc(agg_pki, tmp_path / "state", *flags)
    procs.append(second)
    assert set((tmp_path / "state" / "spool").iterdir()) == logged  # the partial one went
    clients = [Client(second.port, agg_pki.ca, *agg_pki.pair(f"edge-{k}")) for k in range(4)]
    status = clients[0].get_round()
    assert status.round_id == round_id and [e.edge_id for e in status.edges if e.uploaded] == [
        "edge-0",
        "edge-1",
    ]
    assert code_of(clients[0].upload, round_id, increment(0), samples=1) == grpc.StatusCode.ALREADY_EXISTS
    for k in (2, 3):
        assert clients[k].join(LENGTHS).round_id == round_id
        clients[k].upload(round_id, increment(k), samples=k + 1)
    _, state = clients[0].download()
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    for j in range(len(LENGTHS)):
        expected = sum(w * increment(k)[j].astype(np.float64) for k, w in enumerate(weights)) / weights.sum()
        np.testing.assert_allclose(state[j], expected, rtol=0, atol=1e-6)
    for c in clients:
        c.close()


def grpcurl(agg_pki, port: int, *verb: str, flags: tuple[str, ...] = ()) -> str:
    cert, key = agg_pki.pair("ops")
    cmd = [
        str(VENV_BIN / "grpcurl"),
        "-cacert",
        str(agg_pki.ca),
        "-cert",
        str(cert),
        "-key",
        str(key),
        *flags,
        f"127.0.0.1:{port}",
        *verb,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return done.stdout


def test_grpcurl_over_mtls_without_proto_files(agg_pki, tmp_path: Path, procs) -> None:
    proc = Proc(agg_pki, tmp_path / "state")
    procs.append(proc)
    edge = Client(proc.port, agg_pki.ca, *agg_pki.pair("edge-0"))
    edge.join([3])
    edge.close()

    services = grpcurl(agg_pki, proc.port, "list").split()
    described = grpcurl(agg_pki, proc.port, "describe", "fedocr.v1.Federation")
    status = json.loads(
        grpcurl(agg_pki, proc.port, "fedocr.v1.Federation/GetRound", flags=("-d", '{"round_id": 0}'))
    )
    health = json.loads(grpcurl(agg_pki, proc.port, "grpc.health.v1.Health/Check"))

    assert {
        "fedocr.v1.Federation",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)
    assert "rpc UploadIncrement ( stream .fedocr.v1.UploadMessage )" in described
    assert (
        status["round_id"] == "1"
        and status["state"] == "ROUND_STATE_OPEN"
        and status["edges"][0]["edge_id"] == "edge-0"
    )
    assert health["status"] == "SERVING"


SERVE_AND_CHECK = """
import sys, numpy as np
from pathlib import Path
sys.path.insert(0, {tests!r})
from aggregator.config import AggregatorConfig
from aggregator.server import start
from fedclient import Client
cfg = AggregatorConfig(listen="127.0.0.1:0", state_dir=Path({state!r}), cert=Path({cert!r}),
                       key=Path({key!r}), ca=Path({ca!r}), quorum=1, total_rounds=1)
running = start(cfg)
c = Client(running.port, Path({ca!r}), Path({ecert!r}), Path({ekey!r}))
r = c.join([4]).round_id
c.upload(r, [np.ones(4, np.float32)])
c.download()
c.close()
running.stop(0.5)
print(sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r}))
"""


def test_aggregator_never_imports_torch_or_recognizer(agg_pki, tmp_path: Path) -> None:
    cert, key = agg_pki.pair("aggregator")
    ecert, ekey = agg_pki.pair("edge-0")
    script = SERVE_AND_CHECK.format(
        tests=str(Path(__file__).parent),
        state=str(tmp_path / "s"),
        cert=str(cert),
        key=str(key),
        ca=str(agg_pki.ca),
        ecert=str(ecert),
        ekey=str(ekey),
        forbidden=FORBIDDEN,
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def rss_mib(pid: int) -> float:
    """Current resident set of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_server_rss_flat_with_many_uploads(agg_pki, tmp_path: Path, procs) -> None:
    values = 4_000_000  # a 16 MB model: large against the allocator's noise of a few MB
    model_mib = values * 4 / 2**20
    proc = Proc(agg_pki, tmp_path / "state", "--quorum", "100", "--min-edges", "1")
    procs.append(proc)
    rng = np.random.default_rng(3)
    increment = [rng.normal(size=values).astype(np.float32)]
    seen = []
    for k in range(12):
        client = Client(proc.port, agg_pki.ca, *agg_pki.pair(f"edge-{k}"))
        round_id = client.join([values]).round_id
        client.upload(round_id, increment, samples=1)
        client.close()
        seen.append(rss_mib(proc.popen.pid))
    # After warm-up, eight more uploads (2.5x the edges): a server that kept each upload would grow by
    # eight models; a running sum grows by at most what the allocator keeps of one or two buffers.
    assert seen[-1] - seen[3] < 2 * model_mib, seen
