"""Starting services on this machine for the demo, the experiments, the benchmarks and the tests:
a throwaway PKI and federation key, an aggregator, edge agents and observer queries, each child in
its own process group and stopped by group (``processes``), the command lines and the PKI
(``services``), and a whole federation with its round plan (``federation``).

fedocr imports neither side: the aggregator, the edges and `edge_agent keygen` run as commands.
"""

from fedocr.harness.federation import LocalFederation, Settings, scores_by_version
from fedocr.harness.processes import (
    LISTENING,
    HarnessError,
    Service,
    kill,
    run_command,
    spawn,
    start_service,
    stop,
    stop_all,
    stop_many,
    stop_on_signals,
)
from fedocr.harness.services import (
    KEY_FILE,
    OBSERVER,
    PY,
    SERVER,
    SERVER_HOSTS,
    aggregator_command,
    edge_command,
    list_rounds,
    make_key,
    make_pki,
    start_aggregator,
)

__all__ = [
    "KEY_FILE", "LISTENING", "OBSERVER", "PY", "SERVER", "SERVER_HOSTS", "HarnessError",
    "LocalFederation", "Service", "Settings", "aggregator_command", "edge_command", "kill",
    "list_rounds", "make_key", "make_pki", "run_command", "scores_by_version", "spawn",
    "start_aggregator", "start_service", "stop", "stop_all", "stop_many", "stop_on_signals",
]  # fmt: skip
