"""The `recognition_service` command: serve one model file until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recognition_service",
        description="a recognition service over mutual TLS (gRPC, health, reflection)",
    )
    p.add_argument("--model", required=True,
                   help="a model file (by `recognizer encrypt-model`: encrypted images)")
    p.add_argument("--key", help="federation key file (default: MODEL with .key)")
    p.add_argument("--listen", default="127.0.0.1:50052", help="host:port (port 0: any free port)")
    p.add_argument("--cert", required=True, help="the service's certificate (PEM)")
    p.add_argument("--cert-key", required=True, help="its private key (PEM)")
    p.add_argument("--ca", required=True, help="the CA whose client certificates may call (PEM)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--max-batch", type=int, default=16, help="requests read together at most")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model_path = Path(args.model)
    key_path = Path(args.key) if args.key else model_path.with_suffix(".key")
    for what, path in (("model", model_path), ("key", key_path), ("cert", Path(args.cert)),
                       ("cert-key", Path(args.cert_key)), ("ca", Path(args.ca))):  # fmt: skip
        if not path.is_file():
            print(f"recognition_service: error: --{what} {path}: no such file", file=sys.stderr)
            return 2

    import torch

    from recognition_service import server
    from recognizer.keys import load_key
    from recognizer.model_io import load_model

    torch.set_num_threads(args.threads)
    model, meta = load_model(model_path, load_key(key_path))
    encrypted = "image_key" in meta
    serving = server.start(model, server.model_file_fingerprint(model_path), args.listen, Path(args.cert),
                           Path(args.cert_key), Path(args.ca), encrypted=encrypted, max_batch=args.max_batch,
                           max_wait_s=args.max_wait_ms / 1000)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    what = f"images encrypted with image key {meta['image_key']}" if encrypted else "plain images"
    print(f"recognition_service: serving {meta['preset']} ({what}); listening on port {serving.port}",
          flush=True)  # fmt: skip
    stop.wait()
    serving.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
