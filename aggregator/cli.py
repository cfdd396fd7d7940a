"""The `aggregator` console script: `aggregator serve [--config FILE] [flags]`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aggregator.config import AggregatorConfig, ConfigError
from aggregator.server_opt import SERVER_OPTIMIZERS
from fedocr import encodings
from fedocr.recipe import DEFAULT_LR, RECIPE


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aggregator", description="FedOCR aggregator (FedAvg over mTLS gRPC)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the federation until SIGINT/SIGTERM")
    serve.add_argument(
        "--config", type=Path, help="TOML file (see deploy/aggregator.toml); flags override it"
    )
    add = serve.add_argument
    add("--listen", help="host:port, e.g. 127.0.0.1:50051 (port 0 = ephemeral)")
    add("--state-dir", dest="state_dir", type=Path, help="LMDB directory of the durable state")
    add("--cert", type=Path, help="server certificate (PEM)")
    add("--key", type=Path, help="server private key (PEM)")
    add("--ca", type=Path, help="federation CA certificate; clients must present a cert it signed")
    add("--rounds", dest="total_rounds", type=int, help="number of rounds to run")
    add("--quorum", type=int, help="uploads that close a round at once")
    add(
        "--min-edges", dest="min_edges", type=int, help="uploads needed at the deadline, else the round fails"
    )
    add("--deadline", dest="deadline_s", type=float, help="seconds a round stays open")
    add("--weighting", choices=("samples", "uniform"), help="FedAvg weights")
    add("--local-epochs", dest="local_epochs", type=int)
    add("--lr", dest="learning_rate", type=float,
        help=f"base lr (default {RECIPE.lr:g}, for {RECIPE.optimizer} edges; the paper's Adadelta: "
        f"{DEFAULT_LR['adadelta']:g})")
    add("--lr-decay-rounds", dest="lr_decay_rounds", type=_ints, help="1-based rounds, e.g. 5,30")
    add("--lr-decay-factors", dest="lr_decay_factors", type=_floats, help="e.g. 0.1,0.01")
    add("--lr-cosine-from-round", dest="lr_cosine_from_round", type=int,
        help="1-based round from which the lr falls along a cosine to 1%% at the last round")
    add("--batch-size", dest="batch_size", type=int)
    add("--optimizer", help="the edges' local optimizer in the plan (adam, adamw, adadelta; '' = theirs)")
    add("--encoding", choices=tuple(encodings.NAMES), help="how edges encode uploads (plan)")
    add(
        "--error-feedback",
        dest="error_feedback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="edges carry their quantization error into the next round (default on)",
    )
    add("--download-encoding", dest="download_encoding", choices=tuple(encodings.NAMES),
        help="how edges download each round's change of the state (default float32: the whole state)")
    add("--proximal-mu", dest="proximal_mu", type=float,
        help="FedProx: edges add mu/2 ||w - w_round||^2 to their local loss (plan; default 0, off)")
    add("--warmup-rounds", dest="warmup_rounds", type=int,
        help="first rounds in which edges train on words they render themselves (plan; default 0)")
    add("--warmup-words", dest="warmup_words", type=int, help="words each edge renders for warm-up")
    add("--warmup-styles", dest="warmup_styles", help="their styles (recognizer synth --styles)")
    add("--warmup-labels", dest="warmup_labels", help="their label kind (recognizer synth --labels)")
    add("--warmup-rehearsal", dest="warmup_rehearsal", type=float,
        help="after warm-up, each epoch also goes over this many warm-up words per shard image (plan; "
        "default 0, off)")
    add("--server-optimizer", dest="server_optimizer", choices=SERVER_OPTIMIZERS,
        help="how the round's mean increment moves the global state (default fedavg: added as it is)")
    add("--server-lr", dest="server_lr", type=float, help="the server optimizer's lr (default: its own)")
    add("--server-beta1", dest="server_beta1", type=float,
        help="fedavgm's momentum, fedadam's and fedyogi's first-moment decay (default 0.9)")
    add("--server-tau", dest="server_tau", type=float,
        help="fedadam's and fedyogi's floor under sqrt(v) (default 0.001)")
    add("--accept-encodings", dest="accept_encodings", type=_names, help="e.g. float32,int8")
    add("--zstd-level", dest="zstd_level", type=int, help="compression level of downloads (1..22)")
    add("--max-concurrent-uploads", dest="max_concurrent_uploads", type=int)
    add("--max-workers", dest="max_workers", type=int, help="threads for uploads, downloads, unary RPCs")
    add("--log-uploads-from-bytes", dest="log_uploads_from_bytes", type=int,
        help="write plain uploads to the upload log when the round's sum has this many bytes (0: always)")
    add("--log-level", dest="log_level", help="DEBUG, INFO, WARNING ...")
    add(
        "--secure-aggregation",
        dest="secure_aggregation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="masked uploads: the server learns only the round's sum ([secure_aggregation] in the config)",
    )
    add("--root", help="run as a leaf aggregator of the root at host:port ([tier] root)")
    add("--root-cert", dest="root_cert", type=Path, help="the leaf's certificate toward the root (role leaf)")
    add("--root-key", dest="root_key", type=Path, help="the leaf's private key toward the root")
    add("--secure-code-bits", dest="secagg_code_bits", type=int,
        help="secure uploads as b-bit codes, 2..8 (0: 32-bit fixed point; [secure_aggregation] code_bits)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = vars(_parser().parse_args(argv))
    command, path = args.pop("command"), args.pop("config")
    try:
        config = AggregatorConfig.load(path, **args)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"aggregator: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if command == "serve":
        from aggregator.server import serve  # grpc is loaded only to serve
        from aggregator.store import StateFormatMismatch, StateLocked
        from fedocr.errors import StorageUnavailable
        from fedocr.tls import CredentialsError

        try:
            return serve(config)
        except (
            ConfigError,
            OSError,
            StateLocked,
            StateFormatMismatch,
            StorageUnavailable,
            CredentialsError,
        ) as exc:
            print(f"aggregator: cannot start: {exc}", file=sys.stderr)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
