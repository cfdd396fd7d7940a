"""Secure aggregation end to end: a real aggregator process, real mutual TLS, light edge processes.

The edges (light_edge.py) run the protocol's phases with edge_agent.secure.protocol and upload
masked increments; the aggregator only ever holds their masked sum. Precision: with frac_bits f
(here 18, from max_weight_sum = 1000 and clip = 8) the unmasked mean is within n·½/(2^f·W) plus
float32 rounding of plain FedAvg.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pytest runs in importlib mode

import light_edge  # noqa: E402
from test_crashes import (  # noqa: E402
    CONFIG,
    LENGTH,
    Aggregator,
    Events,
    Processes,
    final_state,
    observer,
    wait_exit,
    wait_until,
)

from fedocr.v1 import federation_pb2 as pb  # noqa: E402

SECURE = """[secure_aggregation]
enabled = true
max_weight_sum = 1000
phase_s = {phase_s}
"""
FRAC_BITS = 18  # what max_weight_sum = 1000 and clip = 8 leave (AggregatorConfig.secagg_bits)


NAMES = [f"edge-{k}" for k in range(4)]  # every test runs one round of these four, three at least


def started_aggregator(
    fault_pki, work: Path, procs: Processes, phase_s: float = 5, quorum: int = len(NAMES), least: int = 3,
    more: str = "",
) -> tuple[Aggregator, Path]:
    """A secure aggregator for one round of ``quorum`` edges (``least`` at least), started (and
    stopped at teardown), and the empty directory the edges write their files to. ``more``: lines
    added to the [secure_aggregation] table."""
    agg = Aggregator(fault_pki, work, "--rounds", "1", "--quorum", str(quorum), "--min-edges", str(least))
    agg.flags += ("--deadline", "60", "--weighting", "samples")
    agg.config.write_text(CONFIG + SECURE.format(phase_s=phase_s) + more)
    procs.aggregators.append(agg)
    agg.start()
    out = work / "edges"
    out.mkdir()
    return agg, out


def expected_mean(names: list[str], round_id: int) -> tuple[np.ndarray, float]:
    """Plain FedAvg of the edges' (clipped) increments, and the stated precision bound.

    Edges round stochastically, so each upload is off by less than one unit in the last place.
    """
    w = np.array([light_edge.samples(e, round_id) for e in names], dtype=np.float64)
    xs = np.stack([light_edge.increment(e, round_id, LENGTH) for e in names]).astype(np.float64)
    xs = np.clip(xs, -8, 8)
    return (w[:, None] * xs).sum(axis=0) / w.sum(), len(names) * 1.0 / (2.0**FRAC_BITS * w.sum())


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Children of the test; killed (by pid) if still running at the end."""
    p = Processes()
    yield p
    for popen in p.started:
        if popen.poll() is None:
            os.kill(popen.pid, signal.SIGKILL)
            popen.wait(10)
    for agg in p.aggregators:
        agg.stop()


def check_closed_as_fedavg(fault_pki, agg: Aggregator, names: list[str]) -> pb.RoundStatus:
    """The one round closed, and the global state is the FedAvg of ``names``' increments."""
    ops = observer(fault_pki, agg.port)
    listed = ops.list_rounds()
    ops.close()
    assert len(listed.rounds) == 1, [(r.state, r.message) for r in listed.rounds]
    (closed,) = listed.rounds
    assert closed.state == pb.ROUND_STATE_CLOSED, closed.message
    assert closed.plan.secure.enabled and closed.plan.encoding == pb.ENCODING_MASKED_INT
    assert {e.edge_id for e in closed.edges if e.uploaded} == set(names)
    version, state = final_state(fault_pki, agg.port)
    want, bound = expected_mean(names, closed.round_id)
    assert version == 2
    assert np.all(np.abs(state - want) <= bound + 2.0**-23 * np.abs(want)), np.abs(state - want).max()
    assert "Traceback" not in agg.logs()
    return closed


def test_a_secure_round_closes_and_equals_plain_fedavg(fault_pki, tmp_path: Path, procs: Processes) -> None:
    agg, out = started_aggregator(fault_pki, tmp_path, procs)
    edges = [procs.edge(fault_pki, agg.port, n, out) for n in NAMES]
    wait_exit(edges, out, timeout=120)
    closed = check_closed_as_fedavg(fault_pki, agg, NAMES)
    # every edge's extra messages are counted: masked upload (4 bytes a value) and the phases
    for e in closed.edges:
        assert e.bytes.raw_up > 4 * LENGTH and e.bytes.raw_down > 0
    receipts = [light_edge_lines(out, n) for n in NAMES]
    assert all(r["how"] == "secure" and r["raw_bytes"] == 4 * LENGTH for r in receipts)
    # every edge signed the survivor list it was shown before it revealed (the consistency check);
    # an edge whose reveal was not needed any more (the round closed on the others') reveals nothing
    revealed = 0
    for n in NAMES:
        kinds = [json.loads(t)["kind"] for t in (out / f"{n}.events.jsonl").read_text().splitlines()]
        assert kinds.index("uploaded") < kinds.index("confirmed"), kinds
        if "revealed" in kinds:
            assert kinds.index("confirmed") < kinds.index("revealed"), kinds
            revealed += 1
    assert revealed >= 3  # the threshold of four holders


def test_compressed_uploads_cost_a_byte_a_value_and_unmask_to_exactly_the_sum_of_their_codes(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    # code_bits = 4 with four edges: codes in [-7, 7] masked mod 2^8 (a sum of four stays within ±28);
    # the first round's range is the clip, as the edges' increments are standard normal.
    more = "code_bits = 4\nsample_cap = 5\ncode_range = 8\n"
    agg, out = started_aggregator(fault_pki, tmp_path, procs, more=more)
    edges = [procs.edge(fault_pki, agg.port, n, out) for n in NAMES]
    wait_exit(edges, out, timeout=120)
    ops = observer(fault_pki, agg.port)
    (closed,) = ops.list_rounds().rounds
    ops.close()
    assert closed.state == pb.ROUND_STATE_CLOSED, closed.message
    assert closed.plan.secure.bits == 4 and closed.plan.secure.code_range == 8 and closed.plan.error_feedback
    receipts = [light_edge_lines(out, n) for n in NAMES]
    assert all(r["raw_bytes"] == LENGTH for r in receipts)  # one byte a value, against four
    # Each edge's codes, read back from what it says they stand for (code · clip / (7 · weight)).
    weights = {n: min(light_edge.samples(n, closed.round_id), 5) / 5 for n in NAMES}
    codes = {}
    for n in NAMES:
        stood_for = np.load(out / f"{n}.r{closed.round_id}.decoded.npy").astype(np.float64)
        codes[n] = np.rint(stood_for * (7 * weights[n] / 8)).astype(np.int64)
        assert np.abs(codes[n]).max() <= 7
    want = (sum(codes.values()) * (8 / (7 * sum(weights.values())))).astype(np.float32)
    version, state = final_state(fault_pki, agg.port)
    assert version == 2 and np.array_equal(state, want)  # bit for bit
    # and unbiased: within one step of each code of plain FedAvg, and on average much closer
    plain, _ = expected_mean(NAMES, closed.round_id)
    assert np.abs(state - plain).max() <= len(NAMES) * (8 / 7) / sum(weights.values()) + 1e-5
    assert abs(float(np.mean(state - plain))) < 0.02


def test_hidden_weights_close_the_round_as_fedavg_while_no_sample_count_travels_in_clear(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    agg, out = started_aggregator(fault_pki, tmp_path, procs, more="hide_weights = true\n")
    edges = [procs.edge(fault_pki, agg.port, n, out) for n in NAMES]
    wait_exit(edges, out, timeout=120)
    closed = check_closed_as_fedavg(fault_pki, agg, NAMES)  # weighted by the unmasked total weight
    assert closed.plan.secure.hide_weights
    assert all(e.samples == 0 for e in closed.edges)  # no upload declared its count
    assert all(light_edge_lines(out, n)["raw_bytes"] == 4 * (LENGTH + 1) for n in NAMES)  # + the weight


def test_an_edge_killed_after_its_upload_is_unmasked_by_the_others(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    agg, out = started_aggregator(fault_pki, tmp_path, procs)
    victim = procs.edge(fault_pki, agg.port, "edge-3", out, "--stall-after-step", "uploaded")
    others = [procs.edge(fault_pki, agg.port, n, out) for n in NAMES[:3]]
    events = Events(out, ["edge-3"])
    wait_until(lambda: any(e["kind"] == "stalled" for e in events.poll()), 90, "edge-3 to upload and stall")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    wait_exit(others, out, timeout=120)
    closed = check_closed_as_fedavg(fault_pki, agg, NAMES)  # edge-3's upload is in the mean
    assert closed.message.startswith("aggregated 4")


def test_an_edge_whose_reveal_comes_after_the_close_still_counts_its_upload(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    """Three reveals unmask a round of four: the slow edge's reveal is refused (the round ended),
    and the edge learns from the round's record that its upload is in the aggregate."""
    agg, out = started_aggregator(fault_pki, tmp_path, procs, phase_s=30)
    edges = [procs.edge(fault_pki, agg.port, "edge-3", out, "--reveal-delay", "3")]
    edges += [procs.edge(fault_pki, agg.port, n, out) for n in NAMES[:3]]
    wait_exit(edges, out, timeout=120)
    closed = check_closed_as_fedavg(fault_pki, agg, NAMES)
    assert closed.message.startswith("aggregated 4")
    assert "RevealShares from" in agg.logs() and "refused: FAILED_PRECONDITION" in agg.logs()
    late = light_edge_lines(out, "edge-3")
    assert late["how"] == "secure" and not late["revealed"]
    assert all(light_edge_lines(out, n)["revealed"] for n in NAMES[:3])


def test_an_edge_killed_before_its_upload_has_its_masks_removed(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    agg, out = started_aggregator(fault_pki, tmp_path, procs)
    victim = procs.edge(fault_pki, agg.port, "edge-3", out, "--stall-after-step", "shared")
    others = [procs.edge(fault_pki, agg.port, n, out) for n in NAMES[:3]]
    events = Events(out, ["edge-3"])
    wait_until(lambda: any(e["kind"] == "stalled" for e in events.poll()), 90, "edge-3 to deal and stall")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    wait_exit(others, out, timeout=120)  # the upload phase ends at its deadline (phase_s = 5)
    closed = check_closed_as_fedavg(fault_pki, agg, NAMES[:3])
    assert closed.message.startswith("aggregated 3")


def test_more_than_n_minus_t_killed_fails_the_round_and_leaves_the_state(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    agg, out = started_aggregator(fault_pki, tmp_path, procs)
    victims = [procs.edge(fault_pki, agg.port, n, out, "--stall-after-step", "uploaded") for n in NAMES[2:]]
    for n in NAMES[:2]:
        procs.edge(fault_pki, agg.port, n, out)
    events, stalled = Events(out, NAMES[2:]), set()

    def both_stalled() -> bool:
        stalled.update(e["edge"] for e in events.poll() if e["kind"] == "stalled")
        return len(stalled) == 2

    wait_until(both_stalled, 90, "edge-2 and edge-3 to upload and stall")
    for victim in victims:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
    ops = observer(fault_pki, agg.port)
    failed = wait_until(
        lambda: (r := ops.get_round(1)).state != pb.ROUND_STATE_OPEN and r, 60, "round 1 to end"
    )
    assert failed.state == pb.ROUND_STATE_FAILED
    assert "too many edges dropped" in failed.message and "threshold is 3" in failed.message
    assert "global state is unchanged" in failed.message
    assert {e.edge_id for e in failed.edges if e.uploaded} == set(NAMES)  # 2 > n - t = 1 silent after
    current = ops.get_round()
    ops.close()
    assert current.round_id == 2 and current.round_index == 0 and current.state_version == 1
    version, state = final_state(fault_pki, agg.port)
    assert version == 1 and not state.any()
    assert "Traceback" not in agg.logs()


def test_an_aggregator_killed_mid_round_resumes_it(fault_pki, tmp_path: Path, procs: Processes) -> None:
    """SIGKILL the aggregator once the first edge dealt its shares and again once one uploaded;
    restarted on the same state, it finishes the round with every edge, equal to plain FedAvg.
    (Phase deadlines run on through an outage: phase_s must outlast the restarts, else the round
    fails cleanly and is retried.) The edges pause after each step, so both kills land while the
    round is open: on loopback the whole round otherwise takes a tenth of a second."""
    agg, out = started_aggregator(fault_pki, tmp_path, procs, phase_s=40)
    edges = [procs.edge(fault_pki, agg.port, n, out, "--step-pause", "2") for n in NAMES]
    events = Events(out, NAMES)
    seen: list[dict] = []

    def happened(kind: str) -> bool:
        seen.extend(events.poll())
        return any(e["kind"] == kind for e in seen)

    for step in ("shared", "uploaded"):
        wait_until(lambda s=step: happened(s), 90, f"an edge to have {step}")
        agg.kill9()
        agg.start()
    wait_exit(edges, out, timeout=150)
    check_closed_as_fedavg(fault_pki, agg, NAMES)
    logs = [(tmp_path / f"aggregator-{k}.log").read_text() for k in range(3)]
    assert [("round 1 closed" in log) for log in logs] == [False, False, True], "a kill came after the round"
    assert all("resumed round 1" in log for log in logs[1:])


def test_an_upload_still_streaming_when_the_upload_phase_ends_is_refused_and_not_summed(
    fault_pki, tmp_path: Path, procs: Processes
) -> None:
    """edge-3's upload stream sends its header in the upload phase, then its chunks only once the
    phase clock fixed the survivors without it (--straddle-upload). Counted, its masked vector would
    enter the sum while its pairwise masks are removed as a dropped edge's: the aggregator refuses it
    with FAILED_PRECONDITION and the round is the FedAvg of the three others. Those reveal only once
    edge-3's upload has ended (--reveal-after), so the round cannot close before it."""
    agg, out = started_aggregator(fault_pki, tmp_path, procs, quorum=4, least=3)
    gate = out / "reveal.gate"
    survivors = [procs.edge(fault_pki, agg.port, n, out, "--reveal-after", str(gate)) for n in NAMES[:3]]
    slow = procs.edge(fault_pki, agg.port, "edge-3", out, "--straddle-upload")
    events, seen = Events(out, ["edge-3"]), []

    def upload_ended() -> bool:
        seen.extend(events.poll())
        return slow.poll() is not None or any(e["kind"] in ("refused", "uploaded") for e in seen)

    wait_until(upload_ended, 90, "edge-3's upload to be refused or acknowledged")
    gate.touch()
    wait_exit(survivors, out, timeout=120)
    kinds = [e["kind"] for e in seen]
    assert "straddling" in kinds and "straddled" in kinds, kinds  # the stream did outlast the phase
    refused = [e for e in seen if e["kind"] == "refused"]
    assert [e["code"] for e in refused] == ["FAILED_PRECONDITION"], kinds
    assert "upload phase of round 1 ended while the upload of 'edge-3' streamed" in refused[0]["details"]
    assert "uploaded" not in kinds
    wait_exit([slow], out, timeout=60)
    closed = check_closed_as_fedavg(fault_pki, agg, NAMES[:3])  # the three counted edges' mean
    assert closed.message.startswith("aggregated 3")
    assert (out / "edge-3.receipts.jsonl").read_text() == ""  # no receipt was ever written


def light_edge_lines(out: Path, name: str) -> dict:
    """The one receipt line of an edge."""
    (line,) = [json.loads(t) for t in (out / f"{name}.receipts.jsonl").read_text().splitlines()]
    return line


pytestmark = pytest.mark.timeout(300)
