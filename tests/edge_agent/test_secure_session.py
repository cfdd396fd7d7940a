"""An edge's checks on what the server tells it in a secure round: each lie is refused before the
edge masks or reveals anything."""

from __future__ import annotations

import pytest

from edge_agent.secure.session import EdgeSession, SecureProtocolError, SecureSettings
from fedocr import secagg

SETTINGS = SecureSettings(clip=8.0, frac_bits=16, round_seed=b"\x07" * 16, weight_by_samples=True)


def roster(n: int) -> tuple[list[EdgeSession], list[tuple[str, int, bytes, bytes]]]:
    sessions = [EdgeSession(f"edge-{k}", 4, SETTINGS) for k in range(n)]
    return sessions, [(s.edge_id, k + 1, *s.advertisement()) for k, s in enumerate(sessions)]


def test_a_threshold_below_a_majority_of_the_holders_is_refused() -> None:
    sessions, entries = roster(5)  # k = 4: the complete graph, 5 holders per edge
    with pytest.raises(SecureProtocolError, match="threshold 2 is not a majority of this edge's 5 share"):
        sessions[0].deal(entries, 4, 2)
    sessions[1].deal(entries, 4, 3)  # 3 of 5 is a majority


def test_an_edge_does_not_mask_when_too_few_neighbours_dealt() -> None:
    sessions, entries = roster(5)
    me = sessions[0]
    me.deal(entries, 4, 3)
    with pytest.raises(SecureProtocolError, match="only 1 of edge-0's 4 neighbours dealt; 3 share holders"):
        me.receive(["edge-0", "edge-1"], [], {})


def test_an_edge_reveals_nothing_to_survivors_it_cannot_trust() -> None:
    sessions, entries = roster(8)
    me = sessions[0]
    me.deal(entries, 2, 2)  # a ring: 2 neighbours, 3 holders, a majority of 2
    everyone = [s.edge_id for s in sessions]
    me.receive(everyone, [], {})
    ring = secagg.neighbours(everyone, 2, SETTINGS.round_seed)
    left, right = sorted(ring["edge-0"])
    with pytest.raises(SecureProtocolError, match="never dealt"):
        me.reveal(["edge-0", left, "edge-9"], [])
    with pytest.raises(SecureProtocolError, match="share holders survive"):
        me.reveal(["edge-0"] + [e for e in everyone if e not in ("edge-0", left, right)], [left, right])
    # Survivors in two parts of the ring: the server could unmask each part's sum.
    far = next(e for e in everyone if e not in ring["edge-0"] | {"edge-0"} | ring[left] | ring[right])
    with pytest.raises(SecureProtocolError, match="graph is split"):
        alive = ["edge-0", left, right, far]
        me.reveal(alive, [e for e in everyone if e not in alive])
    # The whole ring alive is connected: the edge reveals its survivors' self-mask shares.
    assert [kind for _, kind, _ in me.reveal(everyone, [])] == ["self_seed"]
