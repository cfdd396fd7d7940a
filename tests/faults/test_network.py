"""Bad networks with real processes: a link cut between hosts (network namespaces), and a slow,
stalling, resetting path (tests/faults/tcpproxy.py) between an edge agent and the aggregator.

Both run the real `aggregator` and `edge_agent` console entry points (fedocr-tiny, gamma 1/2,
240-word shards) over mutual TLS, and check the edges' journals against the aggregator's
ListRounds.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedocr import harness
from recognizer.keys import generate_key
from recognizer.shard import split_dataset
from recognizer.synth import render_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tcpproxy beside this file

from tcpproxy import DOWN, UP, TcpProxy  # noqa: E402

PY = sys.executable
PRESET, GAMMA = "fedocr-tiny", "1/2"
TRAIN_WORDS = 480
BYTE_KEYS = ("raw_up", "wire_up", "raw_down", "wire_down")


# --- shared helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shards:
    """Two IID shards of 240 clean synthetic words."""

    paths: list[Path]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    """Rendered once per module (about a second)."""
    root = tmp_path_factory.mktemp("net-data")
    render_dataset(root / "train", TRAIN_WORDS, seed=21, styles=["clean"])
    return Shards(split_dataset(root / "train", 2, root / "shards", seed=21))


@pytest.fixture(scope="module")
def fed_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The federation key the edges share."""
    path = tmp_path_factory.mktemp("net-key") / "federation.key"
    generate_key(path)
    return path


def journal(work: Path) -> list[dict[str, Any]]:
    """An edge's rounds.jsonl records."""
    path = work / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def says(log: Path, text: str) -> bool:
    """Whether ``log`` contains ``text``."""
    return log.exists() and text in log.read_text(errors="replace")


def uploaded(round_status: dict) -> set[str]:
    """Edges a ListRounds round lists as uploaded."""
    return {e["edge_id"] for e in round_status.get("edges", []) if e.get("uploaded")}


def edge_bytes(rounds: dict, edge: str) -> dict[int, dict[str, int]]:
    """The aggregator's byte count of ``edge`` per round id, from a ListRounds answer."""
    out: dict[int, dict[str, int]] = {}
    for r in rounds["rounds"]:
        for e in r.get("edges", []):
            if e["edge_id"] == edge:
                out[int(r["round_id"])] = {k: int(e["bytes"][k]) for k in BYTE_KEYS}
    return out


def journal_bytes(records: list[dict[str, Any]]) -> dict[int, dict[str, int]]:
    """The bytes an edge's journal reports per round id: the download it used and the upload it
    sent; the final download (the "finished" record) belongs to the last round, as on the aggregator."""
    out: dict[int, dict[str, int]] = {}
    last = 0
    for r in records:
        last = r.get("round_id", last)
        b = out.setdefault(last, dict.fromkeys(BYTE_KEYS, 0))
        b["raw_up"] += r.get("up", {}).get("raw", 0)
        b["wire_up"] += r.get("up", {}).get("wire", 0)
        b["raw_down"] += r["down"]["raw"]
        b["wire_down"] += r["down"]["wire"]
    return out


def edge_cmd(shard: Path, server: str, key: Path, pki_dir: Path, name: str, work: Path) -> list[str]:
    """The `edge_agent` command line of edge ``name``."""
    flags = ["--preset", PRESET, "--gamma", GAMMA, "--threads", "1", "--patience", "120"]
    return harness.edge_command(pki_dir, name, server, key, shard, work, flags)


def aggregator_cmd(
    listen: str, state: Path, pki_dir: Path, rounds: int, quorum: int, deadline_s: float, epochs: int
) -> list[str]:
    """The `aggregator serve` command line."""
    flags = [
        "--rounds", str(rounds), "--quorum", str(quorum), "--min-edges", "1", "--deadline", str(deadline_s),
        "--local-epochs", str(epochs), "--batch-size", "24",
        "--lr-decay-rounds", "", "--lr-decay-factors", "",
    ]  # fmt: skip
    return harness.aggregator_command(pki_dir, state, listen, flags=flags)


class Processes:
    """Child processes (fedocr.harness: each in its own process group); ``stop()`` ends them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd: Sequence[str], log: Path) -> subprocess.Popen:
        """Start ``cmd``; its stdout and stderr go to ``log``."""
        proc = harness.spawn(cmd, log)
        self.procs.append(proc)
        return proc

    def serve(self, cmd: Sequence[str], log: Path) -> harness.Service:
        """Start a service ``cmd`` (stderr to ``log``) and wait until it listens."""
        service = harness.start_service(cmd, log)
        self.procs.append(service.popen)
        return service

    def stop(self) -> None:
        """End every process started here (SIGTERM, then SIGKILL)."""
        harness.stop_many(self.procs)


def wait_exit(proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Wait for an edge to finish with status 0."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"still running after {timeout:.0f} s; see {log}") from exc
    assert code == 0, f"exited with {code}:\n{log.read_text()[-3000:]}"


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Processes started by the test, stopped after it whatever happens."""
    procs = Processes()
    yield procs
    procs.stop()


# --- 1. several hosts: network namespaces joined by a bridge -----------------------------------

SUBNET = "10.77.0"
AGG_IP = f"{SUBNET}.1"
AGG_PORT = 50051
HOLD_S = 4.0


class NetnsUnavailable(RuntimeError):
    """A namespace or link could not be made; the message is the command and its error."""


class Hosts:
    """An aggregator host and edge hosts as network namespaces (unique names per run).

    The aggregator's namespace holds a bridge ``br0`` at AGG_IP/24; each edge's namespace holds
    ``eth0`` at SUBNET.(11+k)/24, whose veth peer ``port<k>`` is a port of that bridge. Cutting
    ``port<k>`` partitions edge k: the packets of both sides are dropped, nothing is refused.
    """

    def __init__(self, edges: int) -> None:
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.agg = f"fo{tag}-agg"
        self.edges = [f"fo{tag}-e{k}" for k in range(edges)]
        self.made: list[str] = []

    @staticmethod
    def ip(*args: str) -> None:
        """Run `ip ARGS`; raise NetnsUnavailable with the command and its error if it fails."""
        cmd = ["ip", *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetnsUnavailable(f"`{' '.join(cmd)}`: {exc}") from exc
        if proc.returncode != 0:
            raise NetnsUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")

    def edge_ip(self, k: int) -> str:
        return f"{SUBNET}.{11 + k}"

    def build(self) -> None:
        """Make the namespaces, the bridge and the links."""
        for ns in (self.agg, *self.edges):
            self.ip("netns", "add", ns)
            self.made.append(ns)
            self.ip("-n", ns, "link", "set", "lo", "up")
        self.ip("-n", self.agg, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.agg, "addr", "add", f"{AGG_IP}/24", "dev", "br0")
        self.ip("-n", self.agg, "link", "set", "br0", "up")
        for k, ns in enumerate(self.edges):
            port = f"port{k}"
            self.ip("link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                    "netns", self.agg)  # fmt: skip
            self.ip("-n", self.agg, "link", "set", port, "master", "br0")
            self.ip("-n", self.agg, "link", "set", port, "up")
            self.ip("-n", ns, "addr", "add", f"{self.edge_ip(k)}/24", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")

    def link(self, k: int, up: bool) -> None:
        """Bring edge k's bridge port up or down."""
        self.ip("-n", self.agg, "link", "set", f"port{k}", "up" if up else "down")

    def exec(self, ns: str) -> list[str]:
        """The command prefix that runs a program inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def destroy(self) -> None:
        """Delete every namespace made (their veth links and the bridge go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()


@pytest.fixture
def hosts(processes: Processes) -> Iterator[Hosts]:
    """Three hosts (aggregator, edge 0, edge 1); skipped where namespaces cannot be made.

    Depends on ``processes`` so that its processes are stopped before the namespaces go.
    """
    h = Hosts(edges=2)
    try:
        h.build()
    except NetnsUnavailable as exc:
        h.destroy()
        pytest.skip(f"network namespaces unavailable: {exc}")
    try:
        yield h
    finally:
        processes.stop()
        h.destroy()


@pytest.fixture
def host_pki(tmp_path: Path) -> Path:
    """A fresh PKI whose aggregator certificate names AGG_IP (edges) and 127.0.0.1 (the observer)."""
    d = tmp_path / "pki"
    return harness.make_pki(d, 2, hosts=[AGG_IP, "127.0.0.1"])


def list_rounds_in(ns_prefix: list[str], pki_dir: Path, port: int) -> dict:
    """harness.list_rounds (ListRounds as the observer over 127.0.0.1), run inside the aggregator's host."""
    code = (
        "import json; from pathlib import Path; from fedocr import harness; "
        f"print(json.dumps(harness.list_rounds(Path({str(pki_dir)!r}), {port})))"
    )
    out = subprocess.run([*ns_prefix, PY, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def cut_during_upload(hosts: Hosts, log: Path, position: str, drop_sockets: bool) -> float:
    """Cut edge 1's link as it starts training round ``position`` ("2/3"), keep it down until its
    upload has been under way for a second, and then HOLD_S more; return how long it was down.

    With ``drop_sockets`` the edge host also destroys its TCP sockets to the aggregator (`ss -K`)
    while cut off, as an address change or a NAT or firewall that forgets the flow would.
    """
    wait_for(lambda: says(log, f"({position}): training"), 120, f"edge-1 to train round {position}")
    t0 = time.monotonic()
    hosts.link(1, up=False)
    try:
        wait_for(lambda: says(log, f"({position}) epoch 2/2:"), 60, f"the end of round {position}'s training")
        time.sleep(1.0)  # the upload's first bytes are queued behind the cut
        if drop_sockets:
            kill = ["ss", "-K", "-t", "dst", AGG_IP]
            subprocess.run([*hosts.exec(hosts.edges[1]), *kill], check=True, capture_output=True)
        time.sleep(HOLD_S)
    finally:
        hosts.link(1, up=True)
    return time.monotonic() - t0


@pytest.mark.timeout(240)
def test_link_cut_to_one_edge_mid_round(
    hosts: Hosts, processes: Processes, shards: Shards, fed_key: Path, host_pki: Path, tmp_path: Path
) -> None:
    """Three hosts; edge 1's link goes down in the middle of its round-2 upload and comes back, then
    again in round 3, when its host also drops its TCP sockets while cut off. With no operator action
    every round completes with both edges' uploads and both journals hold their receipts.

    Measured: the plain cut fails no RPC (the upload waits in TCP retransmissions and completes once
    the link is back); with the sockets dropped the upload fails at once and reconnects fail with "No
    route to host" until the link is back, then the retry uploads.
    """
    rounds, works = 3, [tmp_path / f"edge-{k}" for k in range(2)]
    agg_log = tmp_path / "aggregator.log"
    processes.serve(
        [*hosts.exec(hosts.agg),
         *aggregator_cmd(f"0.0.0.0:{AGG_PORT}", tmp_path / "state", host_pki, rounds, 2, 90.0, 2)],
        agg_log,
    )  # fmt: skip
    edges = []
    for k, ns in enumerate(hosts.edges):
        cmd = edge_cmd(shards.paths[k], f"{AGG_IP}:{AGG_PORT}", fed_key, host_pki, f"edge-{k}", works[k])
        edges.append(processes.spawn([*hosts.exec(ns), *cmd], works[k] / "edge.log"))

    log1 = works[1] / "edge.log"
    plain = cut_during_upload(hosts, log1, "2/3", drop_sockets=False)
    failures_plain = log1.read_text().count("aggregator unavailable")
    dropped = cut_during_upload(hosts, log1, "3/3", drop_sockets=True)
    for k, proc in enumerate(edges):
        wait_exit(proc, 150, works[k] / "edge.log")
    history = list_rounds_in(hosts.exec(hosts.agg), host_pki, AGG_PORT)
    failures = log1.read_text().count("aggregator unavailable") - failures_plain
    seconds = [r["seconds"] for r in journal(works[1]) if r["event"] == "round"]
    print(f"cut {plain:.1f} s: {failures_plain} failed RPC(s); cut {dropped:.1f} s with sockets dropped: "
          f"{failures} failed RPC(s); edge-1 round seconds {seconds}")  # fmt: skip

    assert failures >= 1  # the dropped sockets failed the upload; the edge retried by itself
    assert [r["state"] for r in history["rounds"]] == ["ROUND_STATE_CLOSED"] * rounds, history
    assert [uploaded(r) for r in history["rounds"]] == [{"edge-0", "edge-1"}] * rounds
    for k in range(2):
        records = journal(works[k])
        done = [r for r in records if r["event"] == "round"]
        assert [r["status"] for r in done] == ["counted"] * rounds, done
        assert [r["receipt"]["round_id"] for r in done] == [int(r["round_id"]) for r in history["rounds"]]
        assert all(r["receipt"]["edge_id"] == f"edge-{k}" for r in done)
        assert records[-1]["event"] == "finished"
        assert journal_bytes(records) == edge_bytes(history, f"edge-{k}")


# --- 2. a slow, stalling and resetting path: tests/faults/tcpproxy.py ----------------------------

FAULT_AT = 200_000  # bytes into a transfer; the packed state is ~0.8 MB on the wire either way
STALL_S = 4.0


@dataclass
class ProxiedEdge:
    """One aggregator on 127.0.0.1 and one edge agent that reaches it only through a TcpProxy."""

    fed: harness.LocalFederation
    proxy: TcpProxy
    agg_port: int
    edge: subprocess.Popen
    work: Path

    @property
    def log(self) -> Path:
        return self.work / "edge.log"

    def at(self, text: str, timeout: float = 90) -> None:
        """Wait until the edge's log shows ``text``."""
        wait_for(lambda: says(self.log, text) or self.edge.poll() is not None, timeout, repr(text))
        assert self.edge.poll() is None, f"edge exited early:\n{self.log.read_text()[-3000:]}"

    def finish(self, timeout: float = 120) -> tuple[dict, list[dict[str, Any]]]:
        """Wait for the edge to finish; (ListRounds read directly from the aggregator, the journal)."""
        wait_exit(self.edge, timeout, self.log)
        return harness.list_rounds(self.fed.pki, self.agg_port), journal(self.work)


@pytest.fixture
def proxied(test_pki, fed_key: Path, shards: Shards, tmp_path: Path) -> Iterator[Callable[..., ProxiedEdge]]:
    """Factory: ``proxied(rounds)`` starts the aggregator (quorum 1), the proxy and the edge."""
    feds: list[harness.LocalFederation] = []
    proxies: list[TcpProxy] = []

    def _start(rounds: int) -> ProxiedEdge:
        settings = harness.Settings(
            rounds=rounds, local_epochs=1, preset=PRESET, gamma=GAMMA, batch_size=24, quorum=1,
            deadline_s=120.0,
        )  # fmt: skip
        fed = harness.LocalFederation(tmp_path, test_pki.dir, fed_key, settings)
        feds.append(fed)
        agg_port = fed.start_aggregator(n_edges=1)
        proxy = TcpProxy(("127.0.0.1", agg_port))
        proxies.append(proxy)
        fed.settings.extra_edge_args = ("--server", f"127.0.0.1:{proxy.port}", "--patience", "120")
        edge = fed.start_edge("edge-0", shards.paths[0])
        return ProxiedEdge(fed, proxy, agg_port, edge, tmp_path / "edges" / "edge-0")

    yield _start
    for fed in feds:
        fed.stop()
    for proxy in proxies:
        proxy.close()


def check_rounds(history: dict, records: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """Every round closed with the edge's upload, and the journal holds one receipt per round."""
    assert [r["state"] for r in history["rounds"]] == ["ROUND_STATE_CLOSED"] * rounds, history
    assert [uploaded(r) for r in history["rounds"]] == [{"edge-0"}] * rounds
    done = [r for r in records if r["event"] == "round"]
    assert [r["status"] for r in done] == ["counted"] * rounds, done
    assert [r["receipt"]["round_id"] for r in done] == [int(r["round_id"]) for r in history["rounds"]]
    assert records[-1]["event"] == "finished"
    return done


@pytest.mark.timeout(150)
def test_slow_and_stalling_path(proxied) -> None:
    """Round 1 with a delay on every chunk both ways; round 2 with the flow stalled for STALL_S
    seconds in the middle of the download and again in the middle of the upload. Each transfer
    completes, and the journal's bytes equal the aggregator's."""
    run = proxied(rounds=2)
    run.proxy.delay, run.proxy.read_size = 0.05, 16 * 1024  # at most 320 KiB/s
    run.at("(1/2): training")
    run.proxy.arm(DOWN, FAULT_AT, f"stall:{STALL_S}")  # the next large download: round 2's state
    wait_for(lambda: journal(run.work), 60, "round 1's receipt")
    delayed, chunks = dict(run.proxy.forwarded), dict(run.proxy.chunks)
    run.proxy.delay = 0.0
    run.at("(2/2): training")
    run.proxy.arm(UP, FAULT_AT, f"stall:{STALL_S}")
    history, records = run.finish()
    print(f"with delay: {delayed} bytes in {chunks} chunks, round 1 took {records[0]['seconds']} s; "
          f"faults {run.proxy.fired}; round 2 took {records[1]['seconds']} s")  # fmt: skip
    assert delayed[UP] > 700_000 and chunks[UP] >= 40  # round 1's upload went through the delay
    assert len(run.proxy.fired) == 2 and run.proxy.pending() == 0, run.proxy.fired
    done = check_rounds(history, records, 2)
    assert not says(run.log, "aggregator unavailable")  # a stall shorter than the timeouts is no failure
    assert done[1]["seconds"] > 2 * STALL_S
    assert journal_bytes(records) == edge_bytes(history, "edge-0")
    totals = {k: sum(b[k] for b in journal_bytes(records).values()) for k in BYTE_KEYS}
    assert totals == {k: int(v) for k, v in history["total_bytes"].items()}


@pytest.mark.timeout(150)
def test_resets_mid_transfer(proxied) -> None:
    """Every connection reset (RST, both sides) in the middle of round 1's upload, of round 2's
    download, and while the edge trains round 3; then only the edge's side dropped in the middle
    of round 3's upload (the aggregator's side left open, silent). The edge retries by itself and
    completes every round. The half-open upload needs the aggregator's keepalive: without it the
    retries get ALREADY_EXISTS until the edge gives up (UploadUnconfirmed) and exits."""
    run = proxied(rounds=3)
    run.at("(1/3): training")
    run.proxy.arm(UP, FAULT_AT, "reset")
    run.proxy.arm(DOWN, FAULT_AT, "reset")  # round 2's state
    run.at("(2/3): training")
    run.at("(3/3): training")
    run.proxy.reset()  # idle connection: the next RPC finds it gone
    run.proxy.arm(UP, FAULT_AT, "half-open")
    history, records = run.finish()
    print(f"faults {run.proxy.fired}; {run.proxy.connections} connections")
    assert len(run.proxy.fired) == 3 and run.proxy.pending() == 0, run.proxy.fired
    check_rounds(history, records, 3)
    assert says(run.log, "aggregator unavailable")
    # The accounting rule under resets. Uploads: the aggregator counts one when it commits it, the
    # edge when it holds the receipt or has confirmed a duplicate, so both count each upload once.
    # Downloads: the aggregator counts one, at full size, when it hands the last chunk to gRPC,
    # which is before the edge has it; the journal counts only a download the edge verified. A reset
    # between the two is counted by the aggregator only, and the edge downloads again. Neither side
    # can tell otherwise (nothing acknowledges a stream's end), so ListRounds may exceed the journal
    # by whole states: at most one per download cut after the aggregator counted it, here round 2's.
    agg, edge = edge_bytes(history, "edge-0"), journal_bytes(records)
    print(f"aggregator {agg}\nedge       {edge}")
    assert agg.keys() == edge.keys()
    round2 = int(history["rounds"][1]["round_id"])
    for rid in agg:
        extra = {k: agg[rid][k] - edge[rid][k] for k in BYTE_KEYS}
        allowed = [dict.fromkeys(BYTE_KEYS, 0)]
        if rid == round2:  # or one more copy of round 2's state
            down = {k: edge[rid][k] for k in ("raw_down", "wire_down")}
            allowed.append({**allowed[0], **down})
        assert extra in allowed, (rid, extra, edge[rid])
