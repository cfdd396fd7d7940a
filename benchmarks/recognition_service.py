"""The recognition service's throughput and latency against the same model read in this process.

Run: .venv/bin/python -m benchmarks.recognition_service --model MODEL.npz [--key MODEL.key] --data LMDB
     [--count 200] [--clients 8] [--name NAME]

MODEL is a vit-preset model; it is transformed with a fixed image key (encrypt-model) and served by a
real `recognition_service` process (two torch threads, mutual TLS on 127.0.0.1, a throwaway PKI). The
client encrypts --count images of --data beforehand (PNG bytes, as a client sends them), then measures:

- batch 1: one client, one call at a time: images/s and p50 / p99 latency;
- --clients concurrent clients (threads), each its share of the calls: images/s, p50 / p99 latency
  and the mean batch the service read;
- in this process, the same transformed model on the same encrypted images (two torch threads, greedy):
  one image at a time, and in batches of 16: images/s.

Ratios are service / in-process at the same batching. Client and service share the machine's cores.
Prints the table and writes results/recognition_service/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fedocr import harness, pki, tls
from fedocr.v1 import recognition_pb2 as pb
from fedocr.v1 import recognition_pb2_grpc as pb_grpc
from recognition_service.server import encrypted_input
from recognizer import state
from recognizer.dataset import array_to_tensor, image_to_array
from recognizer.image_crypt import BlockCipher, encrypt_model, image_key_fingerprint
from recognizer.keys import load_key
from recognizer.lmdb_data import LmdbReader
from recognizer.model import build_model
from recognizer.model_io import load_model, save_model

IMAGE_KEY = bytes(range(100, 132))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _calls(stub, requests: list[pb.RecognizeRequest], clients: int) -> dict:
    latencies: list[float] = []
    batches: list[int] = []

    def one(request: pb.RecognizeRequest) -> None:
        t = time.perf_counter()
        reply = stub.Recognize(request, timeout=120)
        latencies.append(time.perf_counter() - t)
        batches.append(reply.batch_size)

    started = time.perf_counter()
    if clients == 1:
        for r in requests:
            one(r)
    else:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, requests))
    wall = time.perf_counter() - started
    return {"images_per_s": len(requests) / wall, "p50_ms": 1000 * _percentile(latencies, 0.5),
            "p99_ms": 1000 * _percentile(latencies, 0.99),
            "mean_batch": statistics.mean(batches)}  # fmt: skip


def _in_process(model, tensors: list[torch.Tensor], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(tensors), batch):
        model.predict_scored(torch.stack(tensors[i : i + batch]), beam_width=1)
    return len(tensors) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.recognition_service", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--key", type=Path, help="federation key (default: MODEL with .key)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--name", default="recognition_service")
    args = p.parse_args(argv)
    key_path = args.key or args.model.with_suffix(".key")
    key = load_key(key_path)
    model, meta = load_model(args.model, key)
    c = model.config
    reader = LmdbReader(args.data)
    count = min(args.count, len(reader))
    cipher = BlockCipher.for_model(IMAGE_KEY, model)
    plain = [image_to_array(reader.get(i)[0], c.input_hw, c.keep_aspect) for i in range(count)]
    encrypted = [cipher.encrypt(x) for x in plain]
    requests = [pb.RecognizeRequest(image=encrypted_input(x)) for x in encrypted]
    transformed = encrypt_model(model, IMAGE_KEY)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki.create_ca(work)
        pki.issue(work, pki.ROLE_SERVER, "service", hosts=["127.0.0.1"])
        pki.issue(work, pki.ROLE_OBSERVER, "client")
        fingerprint = state.fingerprint(build_model(meta["preset"], key, None, meta["alphabet"]), key)
        save_model(work / "enc.npz", transformed, key, meta["preset"], fingerprint,
                   extra={"image_key": image_key_fingerprint(IMAGE_KEY), "transforms": "all"})  # fmt: skip
        cmd = [sys.executable, "-m", "recognition_service.cli", "--model", str(work / "enc.npz"), "--key",
               str(key_path), "--listen", "127.0.0.1:0", "--cert", str(pki.cert_path(work, "service")),
               "--cert-key", str(pki.key_path(work, "service")), "--ca", str(work / pki.CA_CERT_FILE),
               "--threads", "2"]  # fmt: skip
        service = harness.start_service(cmd, work / "serve.log")
        try:
            client = pki.cert_path(work, "client"), pki.key_path(work, "client")
            channel = tls.secure_channel(f"127.0.0.1:{service.port}", work / pki.CA_CERT_FILE, *client)
            stub = pb_grpc.RecognitionStub(channel)
            _calls(stub, requests[:10], 1)  # warm up: connection, first batches
            service_rows = {"batch 1": _calls(stub, requests, 1),
                            f"{args.clients} clients": _calls(stub, requests, args.clients)}  # fmt: skip
            channel.close()
        finally:
            service.stop()

    torch.set_num_threads(2)
    tensors = [array_to_tensor(x) for x in encrypted]
    _in_process(transformed, tensors[:10], 1)
    local = {f"batch {b}": _in_process(transformed, tensors, b) for b in (1, 16)}
    concurrent = service_rows[f"{args.clients} clients"]["images_per_s"]
    report = {"model": str(args.model), "preset": meta["preset"], "count": count, "clients": args.clients,
              "date": time.strftime("%Y-%m-%d"), "service": service_rows, "in_process_images_per_s": local,
              "ratios": {"batch 1": service_rows["batch 1"]["images_per_s"] / local["batch 1"],
                         f"{args.clients} clients vs batch 16": concurrent / local["batch 16"]}}  # fmt: skip
    out = Path("results/recognition_service") / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
