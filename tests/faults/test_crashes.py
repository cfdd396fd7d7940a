"""Crashes with real processes: the aggregator killed with SIGKILL again and again, an edge killed
mid-upload, and a state directory that is unwritable at start or fills up during a round.

Edges here are light_edge.py processes (numpy over the wire, deterministic increments), so the
expected global state can be recomputed exactly from the round history. The number of aggregator
kills is FEDOCR_CRASH_KILLS (20; `make soak` raises it), their timing comes from FEDOCR_CRASH_SEED.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedclient import FINGERPRINT as FP
from fedclient import Client, upload_messages

from aggregator import messages as wire
from aggregator.config import AggregatorConfig
from aggregator.coordinator import RoundCoordinator
from aggregator.store import Store
from fedocr import harness
from fedocr.errors import StorageUnavailable
from fedocr.v1 import federation_pb2 as pb

sys.path.insert(0, str(Path(__file__).resolve().parent))  # light_edge (pytest runs in importlib mode)

import light_edge  # noqa: E402

KILLS = int(os.environ.get("FEDOCR_CRASH_KILLS", "20"))
SEED = int(os.environ.get("FEDOCR_CRASH_SEED", "20261122"))
EDGES = 5
LENGTH = 50_000
LIGHT_EDGE = Path(light_edge.__file__)
PHASES = ("join", "upload", "receipt", "aggregate", "download", "anytime")
# Small download chunks and windows keep a download in flight while a light edge reads it slowly.
CONFIG = """[transfer]
chunk_elements = 4096
stream_window_bytes = 65536
upload_wait_s = 5.0
join_wait_max_s = 2.0
"""
C = grpc.StatusCode


class Aggregator:
    """`aggregator serve` as a child process; restarts on the same port and state directory."""

    def __init__(self, fault_pki, work: Path, *flags: str, state_dir: Path | None = None) -> None:
        self.pki, self.work, self.flags = fault_pki, work, flags
        self.state_dir = state_dir or work / "state"
        work.mkdir(parents=True, exist_ok=True)
        self.config = work / "aggregator.toml"
        self.config.write_text(CONFIG)
        self.port = 0
        self.starts = 0
        self.started_at = 0.0
        self.service: harness.Service | None = None

    def command(self) -> list[str]:
        """The `aggregator serve` command line (fedocr.harness) on this port and state directory."""
        listen = f"127.0.0.1:{self.port}"
        return harness.aggregator_command(self.pki.dir, self.state_dir, listen, self.config, self.flags)

    def start(self) -> None:
        """Start (again); the first start picks the port, later ones reuse it."""
        for _ in range(25):
            log = self.work / f"aggregator-{self.starts}.log"
            log.unlink(missing_ok=True)  # an attempt that found the port busy
            try:
                self.service = harness.start_service(self.command(), log)
            except harness.HarnessError:
                if "cannot listen" not in log.read_text():
                    raise
                time.sleep(0.2)  # the port is not free yet
                continue
            self.port = self.service.port
            self.starts += 1
            self.started_at = time.time()
            return
        raise AssertionError(f"port {self.port} stayed busy")

    def kill9(self) -> None:
        """SIGKILL, and reap."""
        assert self.service is not None and self.service.popen.poll() is None, "the aggregator died by itself"
        self.service.kill()

    def stop(self) -> None:
        """SIGTERM (drain), and reap."""
        if self.service is not None:
            self.service.stop()

    def logs(self) -> str:
        return "".join(p.read_text() for p in sorted(self.work.glob("aggregator-*.log")))


@dataclass
class Processes:
    """Every child a test started, ended by pid at teardown."""

    started: list[subprocess.Popen] = field(default_factory=list)
    aggregators: list[Aggregator] = field(default_factory=list)

    def edge(self, fault_pki, port: int, name: str, out: Path, *flags: str) -> subprocess.Popen:
        """A light edge process; its output goes to out/<name>.log."""
        cmd = [sys.executable, str(LIGHT_EDGE), "--port", str(port), "--pki", str(fault_pki.dir)]
        cmd += ["--name", name, "--length", str(LENGTH), "--out", str(out), *flags]
        popen = harness.spawn(cmd, out / f"{name}.log")
        self.started.append(popen)
        return popen


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Children of the test; killed (by process group) if still running at the end."""
    p = Processes()
    yield p
    for popen in p.started:
        harness.kill(popen)
    for agg in p.aggregators:
        agg.stop()


class Events:
    """Complete new lines of the edges' event files."""

    def __init__(self, out: Path, names: list[str]) -> None:
        self.paths = {n: out / f"{n}.events.jsonl" for n in names}
        self.offsets = dict.fromkeys(names, 0)

    def poll(self) -> list[dict]:
        new: list[dict] = []
        for name, path in self.paths.items():
            if not path.exists():
                continue
            with path.open("rb") as fh:
                fh.seek(self.offsets[name])
                data = fh.read()
            end = data.rfind(b"\n") + 1
            self.offsets[name] += end
            new += [{**json.loads(line), "edge": name} for line in data[:end].splitlines()]
        return sorted(new, key=lambda e: e["t"])


class KillClock:
    """Decides when to kill the aggregator: on an event of the phase asked for, after a delay."""

    def __init__(self, events: Events, rng: random.Random) -> None:
        self.events, self.rng = events, rng
        self.receipts: Counter[int] = Counter()  # receipt events per round id
        self.last: dict[str, dict] = {}  # each edge's previous event

    def _matches(self, phase: str, ev: dict) -> bool:
        kind, before = ev["kind"], self.last.get(ev["edge"], {})
        if phase == "join":  # a long-poll: the edge uploaded, the round still waits for others
            return (
                kind == "join"
                and before.get("kind") == "receipt"
                and (self.receipts[before["round_id"]] < EDGES)
            )
        if phase == "upload":
            return kind == "upload_chunk" and ev["seq"] >= 1
        if phase == "receipt":
            return kind == "receipt"
        if phase == "aggregate":  # the trailer of the upload that completes the quorum
            return kind == "trailer" and self.receipts[ev["round_id"]] == EDGES - 1
        if phase == "download":
            return kind == "download_chunk"
        return False

    def delay(self, phase: str) -> float:
        low, high = {"join": (0.05, 0.5), "upload": (0, 0.02), "receipt": (0, 0), "aggregate": (0, 0.02)}.get(
            phase, (0, 0.01)
        )
        return self.rng.uniform(low, high)

    def wait(self, phase: str, since: float, alive: Callable[[], bool], timeout: float = 15.0) -> bool:
        """Return True once an event of `phase` (after `since`) was seen and its delay slept;
        False on timeout or when no edge is left (the caller kills anyway or stops)."""
        if phase == "anytime":
            time.sleep(self.rng.uniform(0.05, 1.0))
            return True
        end = time.monotonic() + timeout
        while time.monotonic() < end and alive():
            for ev in self.events.poll():
                hit = ev["t"] >= since and self._matches(phase, ev)
                self.last[ev["edge"]] = ev
                if ev["kind"] == "receipt":
                    self.receipts[ev["round_id"]] += 1
                if hit:
                    time.sleep(self.delay(phase))
                    return True
            time.sleep(0.002)
        return False


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fedavg(rounds: list[pb.RoundStatus], encoding_of: dict[str, str] | None = None) -> np.ndarray:
    """The global state the aggregator must hold: W += sum(s_i * dW_i) / sum(s_i) per closed round,
    dW_i as decoded from each edge's encoding (``encoding_of``, default float32)."""
    state = np.zeros(LENGTH, dtype=np.float32)
    for r in sorted(rounds, key=lambda r: r.round_id):
        if r.state != pb.ROUND_STATE_CLOSED:
            continue
        total, weight = np.zeros(LENGTH, dtype=np.float64), 0.0
        for e in r.edges:
            if e.uploaded:
                encoding = (encoding_of or {}).get(e.edge_id, "float32")
                dw = light_edge.received(e.edge_id, r.round_id, LENGTH, encoding)
                total += e.samples * dw.astype(np.float64)
                weight += e.samples
        state = (state.astype(np.float64) + total / weight).astype(np.float32)
    return state


def add(a: pb.ByteCount, b: pb.ByteCount) -> pb.ByteCount:
    fields = ("raw_up", "wire_up", "raw_down", "wire_down")
    return pb.ByteCount(**{f: getattr(a, f) + getattr(b, f) for f in fields})


def check_accounting(listed: pb.ListRoundsResponse, receipts: dict[tuple[str, int], dict]) -> None:
    """Every acknowledged upload is counted once, with its samples and bytes; totals add up."""
    counted = {(e.edge_id, r.round_id): e for r in listed.rounds for e in r.edges if e.uploaded}
    assert sorted(receipts) == sorted(counted), "acknowledged uploads differ from the uploads counted"
    total = pb.ByteCount()
    for r in listed.rounds:
        assert r.state in (pb.ROUND_STATE_CLOSED, pb.ROUND_STATE_FAILED), r
        if r.state == pb.ROUND_STATE_FAILED:
            assert not any(e.uploaded for e in r.edges), f"failed round {r.round_id} dropped uploads"
        per_round = pb.ByteCount()
        for e in r.edges:
            per_round = add(per_round, e.bytes)
            assert e.bytes.raw_down % (4 * LENGTH) == 0, f"partial download counted: {e}"
            if not e.uploaded:
                assert e.bytes.raw_up == e.bytes.wire_up == 0, f"refused bytes counted as uploaded: {e}"
        assert per_round == r.bytes, r.round_id
        total = add(total, r.bytes)
    assert total == listed.total_bytes
    for key, line in receipts.items():
        e = counted[key]
        assert (e.samples, e.bytes.raw_up, e.bytes.wire_up) == (
            line["samples"],
            line["raw_bytes"],
            line["wire_bytes"],
        ), key


def all_receipts(out: Path, names: list[str]) -> dict[tuple[str, int], dict]:
    """The edges' receipts keyed by (edge, round id); an upload acknowledged twice fails."""
    found: dict[tuple[str, int], dict] = {}
    for name in names:
        for line in read_lines(out / f"{name}.receipts.jsonl"):
            key = (line["edge"], line["round_id"])
            assert key not in found, f"{key} acknowledged twice: an acknowledged upload was lost and redone"
            found[key] = line
    return found


def wait_exit(popens: list[subprocess.Popen], out: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    for p in popens:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    logs = "\n".join(f"--- {p.args[p.args.index('--name') + 1]}: rc {p.poll()}" for p in popens)
    assert all(p.poll() == 0 for p in popens), logs + "".join(
        f"\n{f.name}:\n{f.read_text()[-3000:]}" for f in sorted(out.glob("edge-*.log"))
    )


def observer(fault_pki, port: int) -> Client:
    return Client(port, fault_pki.ca, *fault_pki.pair("ops"))


def final_state(fault_pki, port: int) -> tuple[int, np.ndarray]:
    client = Client(port, fault_pki.ca, *fault_pki.pair("edge-0"))
    try:
        header, arrays = client.download()
    finally:
        client.close()
    return header.state_version, arrays[0]


KILL_TIMEOUT = 120 + 6 * KILLS


@pytest.mark.timeout(KILL_TIMEOUT)
def test_aggregator_killed_at_random_points_loses_and_repeats_nothing(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    """SIGKILL the aggregator KILLS times (join long-polls, mid-upload, right after a receipt, at
    the round's close, mid-download, anytime) and restart it on the same port and state: the
    federation finishes and the state is the FedAvg of exactly the acknowledged uploads."""
    t0 = time.monotonic()
    rounds = KILLS // 2 + 5
    out = tmp_path / "edges"
    out.mkdir()
    agg = Aggregator(fault_pki, tmp_path, "--rounds", str(rounds), "--quorum", str(EDGES))
    # every plain upload goes through the upload log (aggregator/spool.py), cut by the kills too
    agg.flags += ("--min-edges", "1", "--deadline", "8", "--weighting", "samples")
    agg.flags += ("--log-uploads-from-bytes", "0")
    procs.aggregators.append(agg)
    agg.start()
    names = [f"edge-{k}" for k in range(EDGES)]
    # One encoding per edge, so every encoding's uploads are cut by the kills.
    encoding_of = dict(zip(names, ("float32", "float16", "int8", "int4", "int2"), strict=True))
    edges = [
        procs.edge(fault_pki, agg.port, n, out, "--chunk-pause", "0.005", "--encoding", encoding_of[n])
        for n in names
    ]

    rng = random.Random(SEED)
    plan = [PHASES[i % len(PHASES)] for i in range(KILLS)]
    rng.shuffle(plan)
    clock = KillClock(Events(out, names), rng)
    kills: list[tuple[str, bool]] = []
    for phase in plan:
        if all(p.poll() is not None for p in edges):
            break
        hit = clock.wait(phase, agg.started_at, lambda: any(p.poll() is None for p in edges))
        if all(p.poll() is not None for p in edges):
            break
        agg.kill9()
        kills.append((phase, hit))
        time.sleep(rng.uniform(0, 0.3))
        agg.start()
    wait_exit(edges, out, timeout=60 + KILLS)

    ops = observer(fault_pki, agg.port)
    listed = ops.list_rounds()
    ops.close()
    version, state = final_state(fault_pki, agg.port)
    agg.stop()
    receipts = all_receipts(out, names)
    closed = [r for r in listed.rounds if r.state == pb.ROUND_STATE_CLOSED]
    hits = Counter(phase for phase, hit in kills if hit)
    retried = Counter(
        ev["during"] for n in names for ev in read_lines(out / f"{n}.events.jsonl") if ev["kind"] == "retry"
    )
    print(
        f"\n{len(kills)} kills ({dict(hits)} on their event, {len(kills) - sum(hits.values())} on timeout), "
        f"{agg.starts} starts, {len(closed)} rounds closed, {len(listed.rounds) - len(closed)} failed, "
        f"{len(receipts)} uploads acknowledged "
        f"({sum(r['how'] == 'confirmed' for r in receipts.values())} confirmed through GetRound), "
        f"edge calls retried: {dict(retried)}, "
        f"{time.monotonic() - t0:.1f} s"
    )

    assert len(kills) == KILLS, f"the federation finished after {len(kills)} of {KILLS} kills"
    if KILLS >= 2 * len(PHASES):
        assert set(hits) == set(PHASES), f"phases never reached: {set(PHASES) - set(hits)}"
    assert [r.round_index for r in closed] == list(range(rounds))
    assert version == listed.state_version == rounds + 1
    check_accounting(listed, receipts)
    np.testing.assert_allclose(state, fedavg(list(listed.rounds), encoding_of), rtol=0, atol=1e-5)
    # every edge that downloaded a version got the same bytes, the final one included
    digests: dict[int, set[str]] = defaultdict(set)
    for name in names:
        for ev in read_lines(out / f"{name}.events.jsonl"):
            if ev["kind"] == "downloaded":
                digests[ev["version"]].add(ev["sha256"])
    assert all(len(d) == 1 for d in digests.values()), digests
    assert digests[version] == {hashlib.sha256(state.tobytes()).hexdigest()}
    logs = agg.logs()
    assert "Traceback" not in logs and "unexpected error" not in logs, logs[-5000:]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def uploaded(r: pb.RoundStatus) -> set[str]:
    return {e.edge_id for e in r.edges if e.uploaded}


@pytest.mark.timeout(180)
def test_edge_killed_mid_upload_is_discarded_and_its_slot_freed(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    """SIGKILL an edge after its header and 3 chunks: nothing of it is counted, the round closes at
    the deadline with the others (FedAvg of those only), and next round the same edge uploads,
    with one upload slot in all (a slot or in-flight mark left behind would block it)."""
    out = tmp_path / "edges"
    out.mkdir()
    deadline = 10.0
    agg = Aggregator(fault_pki, tmp_path, "--rounds", "2", "--quorum", "4", "--min-edges", "3")
    agg.flags += ("--deadline", str(deadline), "--max-concurrent-uploads", "1", "--weighting", "samples")
    procs.aggregators.append(agg)
    agg.start()
    victim = procs.edge(fault_pki, agg.port, "edge-3", out, "--stall-after-chunks", "3")
    events = Events(out, ["edge-3"])
    wait_until(lambda: any(e["kind"] == "stalled" for e in events.poll()), 60, "edge-3 to stall mid-upload")
    time.sleep(0.3)  # header and 3 chunks are with the aggregator
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    # the aggregator sees the stream cancelled, or (a race in the transport) ended without a trailer
    ends = ("UploadIncrement: stream ended by the peer", "without a trailer (truncated)")
    wait_until(lambda: any(end in agg.logs() for end in ends), 10, "the aggregator to drop the upload")
    ops = observer(fault_pki, agg.port)
    first = ops.get_round()
    assert first.state == pb.ROUND_STATE_OPEN and first.round_index == 0 and not uploaded(first)
    assert [(e.edge_id, e.bytes.raw_up, e.bytes.wire_up) for e in first.edges] == [("edge-3", 0, 0)]

    others = [procs.edge(fault_pki, agg.port, f"edge-{k}", out) for k in range(3)]
    closed = wait_until(
        lambda: (r := ops.get_round(first.round_id)).state != pb.ROUND_STATE_OPEN and r,
        60,
        "round 1 to close",
    )
    assert closed.state == pb.ROUND_STATE_CLOSED and uploaded(closed) == {"edge-0", "edge-1", "edge-2"}
    assert closed.duration_seconds >= deadline - 0.5, "round 1 closed before its deadline"
    again = procs.edge(fault_pki, agg.port, "edge-3", out)
    wait_exit([*others, again], out, timeout=90)

    listed = ops.list_rounds()
    ops.close()
    version, state = final_state(fault_pki, agg.port)
    names = [f"edge-{k}" for k in range(4)]
    receipts = all_receipts(out, names)
    second = listed.rounds[1]
    assert [r.state for r in listed.rounds] == [pb.ROUND_STATE_CLOSED] * 2 and version == 3
    assert uploaded(second) == set(names) and second.duration_seconds < deadline / 2, "closed at quorum"
    assert sorted(r for e, r in receipts if e == "edge-3") == [second.round_id]
    check_accounting(listed, receipts)
    np.testing.assert_allclose(state, fedavg(list(listed.rounds)), rtol=0, atol=1e-6)
    assert "Traceback" not in agg.logs()


# -- the state directory: unwritable or full ---------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Factory: mount a tmpfs of `size` at tmp_path/`name` (root only here); unmounted after."""
    mounted: list[Path] = []

    def _mount(name: str, size: str = "4m") -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield _mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


def fill(point: Path) -> Path:
    """Write zeros to a file under `point` until the file system is full; returns the file."""
    filler = point / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 1 << 12):
            try:
                while True:
                    os.write(fd, bytes(size))
            except OSError:
                pass
    finally:
        os.close(fd)
    assert os.statvfs(point).f_bavail == 0
    return filler


def snapshot(state_dir: Path) -> tuple:
    """Everything the aggregator would load from `state_dir`, as comparable values."""
    store = Store(state_dir)
    try:
        s = store.load()
    finally:
        store.close()
    return (
        s.state_version,
        None if s.state is None else s.state.tobytes(),
        None if s.round is None else s.round.to_json(),
        None if s.total is None else s.total.tobytes(),
        [h.to_json() for h in s.history],
    )


def make_state(fault_pki, tmp_path: Path, state_dir: Path) -> tuple:
    """A valid state: round 1 closed with two uploads, round 2 open with one; returns its snapshot."""
    agg = Aggregator(fault_pki, tmp_path / "maker", "--quorum", "2", "--rounds", "3", state_dir=state_dir)
    agg.start()
    try:
        clients = [Client(agg.port, fault_pki.ca, *fault_pki.pair(f"edge-{k}")) for k in range(2)]
        for k, c in enumerate(clients):
            round_id = c.join([LENGTH]).round_id
            c.upload(round_id, [light_edge.increment(f"edge-{k}", round_id, LENGTH)], samples=k + 1)
        round_id = clients[0].join([LENGTH]).round_id
        clients[0].upload(round_id, [light_edge.increment("edge-0", round_id, LENGTH)], samples=1)
        for c in clients:
            c.close()
    finally:
        agg.stop()
    made = snapshot(state_dir)
    assert made[0] == 2 and made[2] is not None and len(made[4]) == 1
    return made


@pytest.mark.parametrize("case", ["under a file", "read-only", "read-only with a state", "full"])
def test_unusable_state_directory_stops_the_start_with_its_name(
    case: str, fault_pki, tmp_path: Path, tmpfs
) -> None:
    """`aggregator serve` exits 1 with a message naming the state directory and the cause; a state
    that was there loads afterwards exactly as it was."""
    before = None
    if case == "under a file":
        (tmp_path / "file").write_text("not a directory")
        state_dir, cause = tmp_path / "file" / "state", "Not a directory"
    elif case.startswith("read-only"):
        mnt = tmpfs("ro")
        state_dir, cause = mnt / "state", "Read-only file system"
        if case.endswith("a state"):
            before = make_state(fault_pki, tmp_path, state_dir)
        remount(mnt, "ro")
    else:
        mnt = tmpfs("full", "1m")
        state_dir, cause = mnt / "state", "No space left on device"
        fill(mnt)
    agg = Aggregator(fault_pki, tmp_path, state_dir=state_dir)
    done = subprocess.run(agg.command(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "listening" not in done.stdout, done
    assert done.stderr.startswith("aggregator: cannot start: ") and "Traceback" not in done.stderr
    assert str(state_dir) in done.stderr and cause in done.stderr, done.stderr
    if before is not None:
        remount(mnt, "rw")
        assert snapshot(state_dir) == before


@pytest.mark.timeout(180)
def test_disk_full_during_a_round_refuses_cleanly_and_recovers(
    fault_pki, tmp_path: Path, tmpfs, procs: Processes
) -> None:
    """The disk fills after one upload of a round: the next gets UNAVAILABLE naming the disk, the
    acknowledged one survives (a SIGKILL and restart on the full disk too), and once space is
    freed the federation finishes with exactly the acknowledged increments."""
    mnt = tmpfs("disk", "4m")
    state_dir = mnt / "state"
    agg = Aggregator(
        fault_pki, tmp_path, "--quorum", "3", "--min-edges", "3", "--rounds", "2", state_dir=state_dir
    )
    agg.flags += ("--weighting", "samples", "--log-uploads-from-bytes", "0")  # uploads logged
    procs.aggregators.append(agg)
    agg.start()
    names = [f"edge-{k}" for k in range(3)]
    receipts: dict[tuple[str, int], dict] = {}

    def upload(client: Client, name: str, round_id: int) -> pb.UploadReceipt:
        count = light_edge.samples(name, round_id)
        got = client.upload(round_id, [light_edge.increment(name, round_id, LENGTH)], samples=count)
        receipts[(name, round_id)] = {
            "samples": count,
            "raw_bytes": got.raw_bytes,
            "wire_bytes": got.wire_bytes,
        }
        return got

    clients = [Client(agg.port, fault_pki.ca, *fault_pki.pair(n)) for n in names]
    first = [c.join([LENGTH]) for c in clients][0].round_id
    upload(clients[0], "edge-0", first)
    filler = fill(mnt)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as refused:
            upload(clients[1], "edge-1", first)
        assert refused.value.code() == C.UNAVAILABLE, refused.value
        assert (
            "No space left on device" in refused.value.details() and str(state_dir) in refused.value.details()
        )
    ops = observer(fault_pki, agg.port)
    status = ops.get_round()
    assert (status.round_id, status.state, uploaded(status)) == (first, pb.ROUND_STATE_OPEN, {"edge-0"})
    for c in [*clients, ops]:
        c.close()

    agg.kill9()
    agg.start()  # on the full disk: it starts from what it had acknowledged
    ops = observer(fault_pki, agg.port)
    status = ops.get_round()
    assert (status.round_id, status.state, uploaded(status)) == (first, pb.ROUND_STATE_OPEN, {"edge-0"})
    filler.unlink()
    clients = [Client(agg.port, fault_pki.ca, *fault_pki.pair(n)) for n in names]
    upload(clients[1], "edge-1", first)
    assert upload(clients[2], "edge-2", first).round_state == pb.ROUND_STATE_CLOSED
    second = clients[0].join([LENGTH]).round_id
    for c, name in zip(clients, names, strict=True):
        assert c.join([LENGTH]).round_id == second
        upload(c, name, second)
    listed = ops.list_rounds()
    for c in [*clients, ops]:
        c.close()
    version, state = final_state(fault_pki, agg.port)
    assert [(r.round_id, r.state) for r in listed.rounds] == [
        (first, pb.ROUND_STATE_CLOSED),
        (second, pb.ROUND_STATE_CLOSED),
    ]
    assert version == 3
    check_accounting(listed, receipts)
    np.testing.assert_allclose(state, fedavg(list(listed.rounds)), rtol=0, atol=1e-6)
    assert "Traceback" not in agg.logs()


def test_a_failed_round_close_acknowledges_no_upload_it_dropped(tmp_path: Path) -> None:
    """Upload A's write completes the quorum while upload B waits for the next write; closing the
    round fails (disk full) and the federation reloads what the disk holds, which lacks B: B must
    get UNAVAILABLE, not a receipt for an increment the aggregator no longer has."""
    store = Store(tmp_path / "state")
    config = AggregatorConfig(state_dir=store.path, quorum=2, min_edges=1, total_rounds=2)
    fed = RoundCoordinator(config, store)
    manifest = wire.manifest_from(pb.Manifest(tensors=[pb.TensorSpec(id=0, length=10)], fingerprint=FP))
    for name in ("edge-0", "edge-1"):
        assert fed.join(name, manifest, 0).action == "TRAIN"
    release, writes, closes = threading.Event(), [], []
    prepare, finish = store.prepare_upload, store.finish_round

    def slow_first_write(record, total, *rest, **kwargs):
        commit = prepare(record, total, *rest, **kwargs)
        writes.append(record.committed)
        return (lambda: (release.wait(10), commit())) if len(writes) == 1 else commit

    def full_disk_once(*args):
        closes.append(args[0].round_id)
        if len(closes) == 1:
            raise StorageUnavailable("cannot write the aggregator state: No space left on device")
        return finish(*args)

    store.prepare_upload, store.finish_round = slow_first_write, full_disk_once
    answers: dict[str, object] = {}

    def send(name: str, value: float) -> None:
        stream = upload_messages(1, [np.full(10, value, np.float32)], fingerprint=FP)
        try:
            answers[name] = fed.upload(name, iter(stream))
        except StorageUnavailable as exc:
            answers[name] = exc

    a = threading.Thread(target=send, args=("edge-0", 1.0))
    a.start()
    wait_until(lambda: writes, 10, "upload A's write")
    b = threading.Thread(target=send, args=("edge-1", 2.0))
    b.start()
    wait_until(lambda: fed._commits.applied == 2, 10, "upload B applied in memory")
    release.set()
    a.join(10)
    b.join(10)
    status = fed.round_status(1)
    assert (
        closes == [1]
        and status.state == "OPEN"
        and [e for e in status.edges if status.edges[e].uploaded] == ["edge-0"]
    )
    assert isinstance(answers["edge-1"], StorageUnavailable), answers  # no receipt for a dropped upload
    assert isinstance(answers["edge-0"], StorageUnavailable)  # counted, but its receipt is lost
    store.close()
