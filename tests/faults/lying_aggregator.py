"""The real aggregator, serving with one lie in its secure-aggregation replies (for tests only).

    python tests/faults/lying_aggregator.py LIE serve [aggregator serve's flags]

LIE is one of:
- ``key``: every edge but edge-1 is shown a mask key of the server's own in edge-1's roster entry
  (to sit between edge-1 and the others);
- ``threshold``: the roster's threshold is 2 whatever the roster's size (a minority of holders);
- ``survivors``: edge-0 alone is shown edge-3 among the dropped (so that it reveals shares of
  edge-3's mask key while the others reveal its self-mask seed: both secrets of one edge).

Everything else is the real service: the lie is applied to each SecureRoundStatus as it leaves
(FederationServicer._answer), so what the edges check is what a dishonest server would send.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aggregator import cli, servicer  # noqa: E402
from fedocr import secagg  # noqa: E402
from fedocr.v1 import federation_pb2 as pb  # noqa: E402

LIES = ("key", "threshold", "survivors")


def lie(kind: str, caller: str, reply: pb.SecureRoundStatus) -> None:
    """Alter ``reply`` (to ``caller``) in place as the lie ``kind`` says."""
    if kind == "key" and caller != "edge-1":
        for entry in reply.roster:
            if entry.edge_id == "edge-1":
                entry.mask_public = SERVER_KEY
    elif kind == "threshold" and reply.threshold:
        reply.threshold = 2
    elif kind == "survivors" and caller == "edge-0" and "edge-3" in reply.survivors:
        survivors = [e for e in reply.survivors if e != "edge-3"]
        dropped = sorted([*reply.dropped, "edge-3"])
        del reply.survivors[:], reply.dropped[:]
        reply.survivors.extend(survivors)
        reply.dropped.extend(dropped)


def main() -> int:
    kind = sys.argv[1]
    if kind not in LIES:
        raise SystemExit(f"lie must be one of {', '.join(LIES)}, got {kind!r}")
    honest = servicer.FederationServicer._answer

    def answer(self, caller: str, view) -> pb.SecureRoundStatus:
        reply = honest(self, caller, view)
        lie(kind, caller, reply)
        return reply

    servicer.FederationServicer._answer = answer
    return cli.main(sys.argv[2:])


SERVER_KEY = secagg.generate_keypair().public

if __name__ == "__main__":
    sys.exit(main())
