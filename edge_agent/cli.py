"""The `edge_agent` command: take part in a federation, or make a federation key.

edge_agent --shard DIR --server HOST:PORT --key federation.key --cert edge.pem --cert-key edge.key --ca ca.pem
edge_agent keygen --out federation.key
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from recognizer.charset import ALPHABETS
from recognizer.cli import parse_gamma
from recognizer.device import DEVICES, WORKERS_HELP, default_bf16, default_workers, resolve_device
from recognizer.recipe import DEFAULT_OPTIMIZER, OPTIMIZERS

log = logging.getLogger("edge_agent")

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge_agent",
        description="FedOCR edge: trains the hashed recognizer on a local LMDB shard and uploads "
        "increments to the aggregator over mutual TLS until the federation finishes. "
        "`edge_agent keygen --out FILE` makes a federation key.",
    )
    p.add_argument("--shard", required=True, type=Path, help="the local LMDB of word images (never sent)")
    p.add_argument("--server", required=True, help="aggregator address, host:port")
    p.add_argument("--key", required=True, type=Path, help="federation key file (32 bytes; never sent)")
    p.add_argument("--cert", required=True, type=Path, help="this edge's certificate (PEM, role edge)")
    p.add_argument("--cert-key", required=True, type=Path, help="this edge's private key (PEM)")
    p.add_argument("--ca", required=True, type=Path, help="the federation CA certificate (PEM)")
    p.add_argument("--server-name", help="name to check in the aggregator's certificate (default: the host)")
    p.add_argument("--preset", default="fedocr-cpu", help="model preset; every edge must use the same")
    p.add_argument(
        "--alphabet",
        choices=sorted(ALPHABETS),
        help="symbols the model reads (default: the preset's); part of the fingerprint, so every "
        "edge must use the same",
    )
    p.add_argument("--gamma", type=parse_gamma, default=1.0, help="hashing ratio: 1, 1/2, 1/4, 1/8 or none")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=DEFAULT_OPTIMIZER,
        help="local optimizer when the aggregator's plan names none (default adam; the paper's: "
        "adadelta); a plan that names one overrides this",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("edge-work"),
        help="where the journal (rounds.jsonl) and the final model go (default: ./edge-work)",
    )
    p.add_argument(
        "--val", type=Path, help="a local held-out LMDB; the global model is scored on it each round"
    )
    p.add_argument("--personalize", action="store_true",
                   help="keep a personalized model beside the generic one (WORK_DIR/personal.npz): each "
                        "round's local fine-tune of the global model, never uploaded; with --val, the mix of "
                        "the global model and its fine-tune that reads --val best (or --own-model)")
    p.add_argument("--personal-epochs", type=int, default=8, metavar="N",
                   help="with --personalize, epochs of the personal model's last fine-tune, of the final "
                        "global model; with --val each epoch's mixes are candidates (default 8)")
    p.add_argument("--personal-lr", type=float, metavar="LR",
                   help="the lr of that last fine-tune (default: the optimizer's usual lr, 2e-3 for adam; "
                        "the federation's last rounds have often decayed the plan's lr to nothing)")
    p.add_argument("--own-model", action="store_true",
                   help="with --personalize and --val, also keep this edge's own model (WORK_DIR/own.npz, "
                        "Ditto): trained one round on the shard each round from its last weights, pulled "
                        "toward the global model by --own-prox; the personal model where it reads --val best")
    p.add_argument("--own-prox", type=float, default=0.001, metavar="LAMBDA",
                   help="the own model's pull toward the global model, LAMBDA/2 ||w - global||^2 "
                        "(default 0.001; 0: none)")
    p.add_argument("--no-report-evaluation", dest="report_evaluation", action="store_false",
                   help="keep the --val scores on this edge (default: report them to the aggregator)")
    p.add_argument("--image-key", type=Path,
                   help="the federation's common image key: the shard, --val and warm-up words are encrypted "
                        "with it before training, by a model aligned to the key (a vit preset); the written "
                        "model keeps the plain meaning: recognizer encrypt-model makes the one to serve")
    p.add_argument("--image-transforms", default="all",
                   help="which encryption transforms: blocks, pixels, negate, channels (default all)")
    p.add_argument("--out", type=Path, help="final global model file (default: WORK_DIR/final.npz)")
    p.add_argument(
        "--init",
        type=Path,
        metavar="MODEL",
        help="start from this pretrained model file instead of the key's W_0 (every edge the same "
        "file; it is part of the fingerprint, and the aggregator never sees it)",
    )
    p.add_argument("--workers", type=int, help=WORKERS_HELP)
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where local training runs: auto (default: cuda when torch.cuda.is_available(), else cpu), "
        "cpu or cuda (an error when there is none); uploads are the same CPU float32 vectors either way",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast in local training (default: on for cuda when the GPU supports bfloat16, "
        "off for cpu)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads for training")
    p.add_argument("--seed", type=int, default=0, help="local batch order")
    p.add_argument("--join-wait", type=int, default=30, help="seconds one Join long-poll waits for work")
    p.add_argument(
        "--patience",
        type=float,
        default=3600.0,
        help="seconds to keep retrying an unreachable aggregator before giving up",
    )
    p.add_argument("--zstd-level", type=int, default=3, help="compression level of uploads (1..22)")
    p.add_argument("-q", "--quiet", action="store_true", help="one line per round")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _keygen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge_agent keygen", description="Write a new random federation key (32 bytes, mode 0600)."
    )
    p.add_argument("--out", required=True, type=Path, help="key file to create (never overwritten)")
    return p


def keygen(argv: Sequence[str]) -> int:
    """`edge_agent keygen --out FILE`."""
    from recognizer.keys import KeyFileError, generate_key

    args = _keygen_parser().parse_args(argv)
    try:
        generate_key(args.out)
    except (KeyFileError, OSError) as exc:
        print(f"edge_agent keygen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"wrote a new federation key to {args.out}; copy it to every edge over a private channel, "
        "never to the aggregator"
    )
    return EXIT_OK


def run(argv: Sequence[str]) -> int:
    """Take part in the federation until it finishes."""
    parser = _run_parser()
    args = parser.parse_args(argv)
    if args.own_prox < 0:
        parser.error(f"--own-prox must be 0 or more, got {args.own_prox}")
    if args.personal_epochs < 1 or (args.personal_lr is not None and not 0 < args.personal_lr < 1e3):
        parser.error("--personal-epochs must be 1 or more and --personal-lr a positive number")
    if args.own_model and not (args.personalize and args.val is not None):
        parser.error("--own-model needs --personalize and --val (the own model is chosen on --val)")
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    import grpc

    from edge_agent.agent import FINAL_MODEL_FILE, PERSONAL_MODEL_FILE, AgentError, AgentSettings, EdgeAgent
    from edge_agent.local import LocalModel, set_threads
    from edge_agent.report import Progress, megabytes
    from fedocr import retry
    from fedocr.client import Endpoint, FederationClient
    from fedocr.tls import CredentialsError
    from recognizer.keys import KeyFileError, load_key
    from recognizer.lmdb_data import DatasetError

    set_threads(args.threads)
    progress = Progress(quiet=args.quiet)
    try:
        device = resolve_device(args.device)
        key = load_key(args.key)
        encryption = None
        if args.image_key is not None:
            from edge_agent.encrypted import ImageEncryption

            encryption = ImageEncryption.load(load_key(args.image_key), args.preset, args.image_transforms)
            args.work_dir.mkdir(parents=True, exist_ok=True)
            progress.summary("encrypting %s with image key %s (%s)", args.shard, encryption.key_name,
                             encryption.transforms)  # fmt: skip
            args.shard = encryption.copy_of(args.shard, args.work_dir)
            if args.val is not None:
                args.val = encryption.copy_of(args.val, args.work_dir)
        local = LocalModel(
            args.shard,
            key,
            args.preset,
            args.gamma,
            optimizer=args.optimizer,
            alphabet=args.alphabet,
            workers=default_workers(device) if args.workers is None else args.workers,
            seed=args.seed,
            device=device,
            bf16=default_bf16(device) if args.bf16 is None else args.bf16,
            init=args.init,
            cipher=None if encryption is None else encryption.cipher,
        )
        endpoint = Endpoint(args.server, args.ca, args.cert, args.cert_key, args.server_name)
        policy = retry.RetryPolicy(
            base_delay=0.5, max_delay=30.0, max_attempts=None, max_elapsed=args.patience
        )
        client = FederationClient(endpoint, policy, on_retry=progress.retrying)
    except (KeyFileError, DatasetError, CredentialsError, ValueError, OSError) as exc:
        print(f"edge_agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.init:
        progress.summary("starting from %s, not the key's W_0", args.init)
    progress.summary(
        "edge on %s (%d words): %s gamma %s on %s, %d values (%s float32) per upload; aggregator %s",
        args.shard,
        local.samples,
        args.preset,
        args.gamma,
        local.device,
        local.length,
        megabytes(4 * local.length),
        args.server,
    )
    settings = AgentSettings(
        work_dir=args.work_dir,
        final_model=args.out or args.work_dir / FINAL_MODEL_FILE,
        join_wait_s=args.join_wait,
        zstd_level=args.zstd_level,
        val=args.val,
        report_evaluation=args.report_evaluation,
        personal_model=args.work_dir / PERSONAL_MODEL_FILE if args.personalize else None,
        own_prox=args.own_prox if args.own_model else None,
        personal_epochs=args.personal_epochs,
        personal_lr=args.personal_lr,
        encryption=encryption,
    )
    agent = EdgeAgent(local, client, settings, progress)
    try:
        agent.run()
    except AgentError as exc:
        print(f"edge_agent: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except grpc.RpcError as exc:
        print(
            f"edge_agent: giving up on {args.server} after {args.patience:.0f} s: "
            f"{retry.status_code(exc)} {exc.details() if hasattr(exc, 'details') else exc}",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("edge_agent: interrupted", file=sys.stderr)
        return 130
    finally:
        client.close()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "keygen":
        return keygen(argv[1:])
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
