"""Load figures (not a test): N concurrent light edges upload one increment each in ONE round.

    .venv/bin/python -m benchmarks.load [--edges 200] [--floats 3400000] [--short] [--json FILE]
                                        [--stagger S] [--long-poll S] [--max-workers N] ...

A real aggregator runs as a child process (mutual TLS on 127.0.0.1, a fresh PKI with one
certificate per edge, quorum = edges, one round). The edges are threads in a few client
processes, each edge with its own channel (one TLS connection each). Uploads are encoded once per
client process (a few distinct increments, kept as serialized messages; only the header differs
per edge), so an edge costs little more than TLS and HTTP/2. Every edge joins and downloads the
state, waits for all the others, then all upload at once (or spread over --stagger seconds), and
then long-poll Join until the federation says FINISHED, as edge_agent does. Every call retries
RESOURCE_EXHAUSTED, UNAVAILABLE and DEADLINE_EXCEEDED with capped exponential backoff and full
jitter (fedocr.retry).

One job per module: workload (the increments and their FedAvg), worker (the client processes),
server (the aggregator child and what is sampled around it), checks (the state read back), run
(one measured round) and table (the figures as text); fedocr.harness starts and stops the aggregator.

Figures: round time (first Join to the last receipt), ingest rate, the aggregator's peak RSS
(sampled every 50 ms with its children), failures by status code, retries, CPU seconds of the
aggregator and the clients, and whether the final global state equals the FedAvg of the uploads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.load.run import run
from benchmarks.load.table import table
from benchmarks.load.workload import COMPRESSIONS
from fedocr import harness

# About FedOCR-Hash_1/4's flat state (`recognizer info --preset fedocr --gamma 1/4`: 3,423,304 float32
# with BN today); the figure benchmarks.aggregator uses, so the two compare.
DEFAULT_FLOATS = 3_400_000
DEFAULT_EDGES = 200
SHORT_EDGES, SHORT_FLOATS = 20, 200_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --short shrinks the defaults for a quick check."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, help=f"concurrent edges (default {DEFAULT_EDGES})")
    parser.add_argument(
        "--floats", type=int, help=f"float32 values per increment (default {DEFAULT_FLOATS:,})"
    )
    parser.add_argument(
        "--short", action="store_true", help=f"quick check: {SHORT_EDGES} edges x {SHORT_FLOATS:,} floats"
    )
    parser.add_argument("--client-procs", type=int, default=2, help="client processes the edges share")
    parser.add_argument("--distinct", type=int, default=4, help="distinct increments (edge j sends j %% N)")
    parser.add_argument("--compression", choices=sorted(COMPRESSIONS), default="zstd")
    parser.add_argument("--zstd-level", type=int, default=3, help="as edge_agent (default 3)")
    parser.add_argument("--max-concurrent-uploads", type=int, help="aggregator setting (default: its own)")
    parser.add_argument("--max-workers", type=int, help="aggregator RPC threads (default: its own)")
    parser.add_argument("--upload-wait", type=float, help="aggregator upload_wait_s (default: its own)")
    parser.add_argument("--stream-window", type=int, help="aggregator stream_window_bytes (default: its own)")
    parser.add_argument(
        "--long-poll",
        type=int,
        default=30,
        help="after its upload each edge long-polls Join this long per call until FINISHED, as edge_agent "
        "does (default 30; 0: no long-poll)",
    )
    parser.add_argument(
        "--stagger", type=float, default=0.0, help="spread the uploads' starts over this many seconds"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up on a phase after this")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.edges is None:
        args.edges = SHORT_EDGES if args.short else DEFAULT_EDGES
    if args.floats is None:
        args.floats = SHORT_FLOATS if args.short else DEFAULT_FLOATS
    if args.edges < 1 or args.floats < 1 or args.distinct < 1:
        parser.error("--edges, --floats and --distinct must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one round under load, print the table (and write JSON); 1 if anything failed."""
    args = parse_args(argv)
    harness.stop_on_signals()  # SIGTERM unwinds too: the aggregator and the client processes are stopped
    result = run(args)
    print(table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    good = not result["failures"] and result["state_check"]["ok"]
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
