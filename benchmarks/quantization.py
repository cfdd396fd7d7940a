"""What the upload and download encodings cost and save: bytes per edge per round, and the accuracy
they leave.

    .venv/bin/python -m benchmarks.quantization            # bytes (about a minute)
    .venv/bin/python -m benchmarks.quantization --accuracy [--rounds 16] [--parallel 2]

Bytes: a real increment (``fedocr-tiny`` at gamma 1/2, and the paper-width ``fedocr`` at gamma
1/4, each after a few Adam steps from W_0 on clean digit strings) is encoded the way an edge
uploads it (fedocr.client.encode_upload: chunks of 65,536 values, zstd level 3, the running
statistics in float32 whatever the encoding) in every encoding. Printed: raw and wire bytes, their
ratios to float32's, and the relative error of one round's decoded increment, for nearest and
stochastic rounding. Downloads: the same increment as the change of the state an edge sees,
encoded by the aggregator's own path (aggregator.visible.encode_change), and both ways together.

Accuracy (``--accuracy``): an in-process federation of the services' own parts (edge_agent.local's
LocalModel per edge, aggregator.fedavg's weighted sum, the edge's upload encoder for the wire): EDGES
edges with IID shards of clean digit strings, one local epoch per round, the default plan (Adam,
recognizer.recipe's lr and batch size); after every round the global model is scored on a
held-out set of another seed. A variant with a lossy download encoding keeps the visible state as
the aggregator does (aggregator.visible): the edges train from it, and it is what is scored. The
``secure-*`` variants encode the uploads as secure aggregation does (SecureEncoding). One
variant per setting, each in a process of its own on one thread; one JSON per finished variant
lands in --results, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedocr import encodings

KEY = bytes(range(32))
EDGES = 2
SHARD_SIZE = 2000
HELD_OUT = 300
TRAIN_SEED, HELD_OUT_SEED = 31, 32


@dataclass(frozen=True)
class Variant:
    """One federation: its upload encoding, error feedback and rounding, and its download encoding."""

    name: str
    encoding: str
    feedback: bool
    rounding: str = "stochastic"
    download: str = "float32"  # lossy: each round's change of the visible state, error feedback on the server
    download_rounding: str = "nearest"  # "fit": each block's scale fitted to the least squared error
    # Secure aggregation's encodings (the masks, which cancel exactly, left out): -1 = plain uploads;
    # 0 = every value in 32-bit fixed point; b = the parameters as b-bit codes (statistics fixed point).
    secure_bits: int = -1
    code_range: float = 0.0  # a fixed range for the codes (0: as the aggregator sets it each round)


VARIANTS: tuple[Variant, ...] = (
    Variant("float32", "float32", False),
    Variant("float16", "float16", False),
    Variant("int8", "int8", False),
    Variant("int8-ef", "int8", True),
    Variant("int4", "int4", False),
    Variant("int4-ef", "int4", True),
    Variant("int4-ef-nearest", "int4", True, "nearest"),
    Variant("int3-ef", "int3", True),
    Variant("int2", "int2", False),
    Variant("int2-ef", "int2", True),
    Variant("int2-ef-nearest", "int2", True, "nearest"),
    Variant("float16-ef", "float16", True),
    Variant("int3-ef-down-int3", "int3", True, download="int3"),
    Variant("float32-down-int3", "float32", False, download="int3"),
    Variant("int3-ef-down-int3-fit", "int3", True, download="int3", download_rounding="fit"),
    Variant("int3-fit-down-int3-fit", "int3", True, "fit", download="int3", download_rounding="fit"),
    Variant("secure-fixed32", "float32", False, secure_bits=0),
    Variant("secure-int8-ef", "float32", True, secure_bits=8),
    Variant("secure-int4-ef", "float32", True, secure_bits=4),
    Variant("secure-int3-ef", "float32", True, secure_bits=3),
    Variant("secure-int4-ef-clip", "float32", True, secure_bits=4, code_range=8.0),
)


class SecureEncoding:
    """What a secure round's sum decodes to, in-process: each edge's values encoded as
    edge_agent.secure.session encodes them (fixed point, or b-bit codes and fixed-point statistics),
    summed as integers, and decoded as aggregator.secure.record decodes the unmasked sum. The masks
    are left out: they cancel exactly (tests/faults/test_secure_aggregation.py checks it bit for bit).
    The settings are the aggregator's defaults ([secure_aggregation] clip, max_weight_sum, sample_cap,
    code_range), and the codes' range follows the global increment as the aggregator sets it
    (secagg.next_code_range) unless the variant fixes it.
    """

    def __init__(self, bits: int, code_range: float, statistics: int, length: int, seed: int = 0) -> None:
        from aggregator.config import AggregatorConfig

        config = AggregatorConfig(secure_aggregation=True, quorum=3, secagg_code_bits=bits)
        self.bits, self.clip, self.frac = bits, config.secagg_clip, config.secagg_bits
        self.range, self.cap = code_range or config.secagg_code_range, config.secagg_sample_cap
        self.adapt = not code_range
        self.cut = length - statistics if bits else 0  # values [0, cut) go as codes
        self.rng = np.random.default_rng(7 + seed)
        self.start()

    def start(self) -> None:
        """A new round's empty sums."""
        self.fixed = np.zeros(0, dtype=np.uint32)
        self.codes = np.zeros(self.cut, dtype=np.int64)
        self.weight = self.code_weights = 0.0
        self.largest = 0

    def add(self, sent: np.ndarray, samples: int) -> np.ndarray:
        """Add one edge's upload; returns what it stands for (for error feedback)."""
        from fedocr import secagg

        fixed = secagg.encode_fixed(sent[self.cut :], samples, self.clip, self.frac, self.rng)
        self.fixed = fixed if not self.fixed.size else self.fixed + fixed
        self.weight += samples
        self.largest = max(self.largest, samples)
        if not self.bits:
            return sent
        w = secagg.code_weight(samples, True, self.cap)
        codes, decoded = secagg.encode_codes(sent[: self.cut], w, self.range, self.bits, self.rng)
        self.codes += codes.view(np.int32)
        self.code_weights += w
        return np.concatenate([decoded, sent[self.cut :]])

    def mean(self) -> np.ndarray:
        """The round's weighted mean increment, float32."""
        from fedocr import secagg

        fixed = secagg.decode_fixed(self.fixed, self.weight, self.frac)
        if not self.bits:
            return fixed
        total = self.codes.astype(np.uint32)  # two's complement mod 2^32, as the unmasked sum
        codes = secagg.decode_codes(total, 32, self.bits, self.range, self.code_weights)
        if self.adapt:  # the next round's range, as the aggregator sets it
            self.range = secagg.next_code_range(codes, self.range, self.clip)
        self.cap = float(self.largest)  # and its sample cap
        return np.concatenate([codes, fixed])


def sample_increment(preset: str, gamma: float, steps: int, data: Path) -> tuple[np.ndarray, int]:
    """The packed increment W - W_0 of ``preset`` after ``steps`` Adam steps (batch 8) on ``data``,
    and how many of its values (the last) are running statistics."""
    import torch

    from recognizer import state, train
    from recognizer.dataset import make_loader
    from recognizer.model import build_model

    torch.manual_seed(0)
    model = build_model(preset, KEY, gamma)
    w0 = state.pack_model(model, KEY)
    optimizer = train.make_optimizer(model, 1e-3, "adam")
    loader = make_loader(data, 8, shuffle=True, drop_last=True, **model.image_options)
    for step, (images, targets, _) in enumerate(loader):
        if step == steps:
            break
        model.train()
        train.train_step(model, images, targets, optimizer)
    return state.pack_model(model, KEY) - w0, state.statistics_length(model)


def byte_rows(increment: np.ndarray, statistics: int) -> list[dict]:
    """Raw and wire bytes and the relative error of each encoding (and rounding) of ``increment``,
    encoded as an edge uploads it (its last ``statistics`` values in float32)."""
    rows = []
    norm = float(np.linalg.norm(increment))
    for name, encoding in encodings.NAMES.items():
        for rounding in ("nearest", "stochastic", "fit") if encoding in encodings.QMAX else ("nearest",):
            decoded = upload(increment, statistics, encoding, rounding, 0)
            error = float(np.linalg.norm(decoded.values - increment)) / norm
            rows.append({"encoding": name, "rounding": rounding if encoding in encodings.QMAX else "-",
                         "raw": decoded.raw, "wire": decoded.wire, "error": error})
    return rows


@dataclass(frozen=True)
class Decoded:
    """An upload as the aggregator decodes it, and its raw and wire bytes."""

    values: np.ndarray
    raw: int
    wire: int


def upload(increment: np.ndarray, statistics: int, encoding: int, rounding: str, seed: int) -> Decoded:
    """Encode ``increment`` as fedocr.client uploads it; what the aggregator decodes."""
    from fedocr.client import encode_upload

    enc = encode_upload(increment, statistics, encoding, rounding=rounding, seed=seed)
    for _ in enc.chunks():
        pass
    return Decoded(np.concatenate(enc.decoded()), enc.raw_bytes, enc.wire_bytes)


def download_rows(increment: np.ndarray, statistics: int) -> list[dict]:
    """Raw and wire bytes of ``increment`` as the change of the visible state the aggregator sends
    (aggregator.visible.encode_change), per lossy encoding, and the relative error it leaves."""
    from aggregator.config import AggregatorConfig
    from aggregator.visible import encode_change
    from fedocr.client import manifest_specs

    defaults = AggregatorConfig()
    specs = tuple((s.id, s.length, s.exact) for s in manifest_specs(increment.size, statistics))
    start = np.zeros(increment.size, np.float32)
    rows, norm = [], float(np.linalg.norm(increment))
    for name, encoding in encodings.NAMES.items():
        if encodings.is_lossy(encoding):
            change, seen = encode_change(start, increment, 2, specs, encoding, defaults.zstd_level,
                                         defaults.chunk_elements)
            rows.append({"encoding": name, "raw": change.header.raw_bytes, "wire": change.header.wire_bytes,
                         "error": float(np.linalg.norm(seen - increment)) / norm})
    return rows


def print_downloads(values: int, up: list[dict], down: list[dict]) -> None:
    """The download rows, and up + down against float32 both ways."""
    f32 = next(r for r in up if r["encoding"] == "float32")
    print(f"downloads (the state's change, {values:,} values) and both ways, against float32 both ways")
    print(f"{'encoding':<9} {'raw MB':>8} {'wire MB':>8} {'raw/f32':>8} {'wire/f32':>8} {'rel. error':>10} "
          f"{'up+down raw/f32':>15} {'up+down wire/f32':>16}")
    for r in down:
        u = next(x for x in up if x["encoding"] == r["encoding"] and x["rounding"] in ("stochastic", "-"))
        both_raw = (u["raw"] + r["raw"]) / (2 * f32["raw"])
        both_wire = (u["wire"] + r["wire"]) / (2 * f32["wire"])
        print(f"{r['encoding']:<9} {r['raw'] / 1e6:>8.3f} {r['wire'] / 1e6:>8.3f} "
              f"{r['raw'] / f32['raw']:>8.3f} {r['wire'] / f32['wire']:>8.3f} {r['error']:>10.4f} "
              f"{both_raw:>15.3f} {both_wire:>16.3f}")


def print_bytes(title: str, values: int, statistics: int, rows: list[dict]) -> None:
    base = next(r for r in rows if r["encoding"] == "float32")
    print(f"\n{title}: {values:,} values per upload, the last {statistics:,} (running statistics) in float32")
    print(f"{'encoding':<9} {'rounding':<10} {'raw MB':>8} {'wire MB':>8} {'raw/f32 raw':>11} "
          f"{'wire/f32 wire':>13} {'rel. error':>10}")
    for r in rows:
        print(f"{r['encoding']:<9} {r['rounding']:<10} {r['raw'] / 1e6:>8.3f} {r['wire'] / 1e6:>8.3f} "
              f"{r['raw'] / base['raw']:>11.3f} {r['wire'] / base['wire']:>13.3f} {r['error']:>10.4f}")


def make_data(data_dir: Path) -> tuple[list[Path], Path]:
    """Render (once) EDGES IID shards of clean digit strings and a held-out set of another seed."""
    from recognizer.shard import split_dataset
    from recognizer.synth import render_dataset

    pool, held_out = data_dir / "pool", data_dir / "held-out"
    if not (held_out / "data.mdb").exists():
        render_dataset(pool, EDGES * SHARD_SIZE, TRAIN_SEED, ["clean"], labels="digits", workers=2,
                       overwrite=True)
        split_dataset(pool, EDGES, data_dir / "shards", "iid", seed=0, overwrite=True)
        render_dataset(held_out, HELD_OUT, HELD_OUT_SEED, ["clean"], labels="digits", overwrite=True)
    return [data_dir / "shards" / f"shard{k}" for k in range(EDGES)], held_out


def seeded_key(seed: int) -> bytes:
    """The hashing key of run ``seed``: KEY itself for seed 0, so earlier results stay comparable."""
    return bytes((b + seed) % 256 for b in KEY)


def federate(variant: Variant, shards: list[Path], held_out: Path, rounds: int, seed: int = 0) -> dict:
    """Run ``rounds`` FedAvg rounds with ``variant``'s uploads; the global accuracy after each.

    ``seed`` changes the hashing key (and with it the initial weights), each edge's data order and
    the uploads' rounding draws; the data stay the same.
    """
    import torch

    from aggregator import fedavg
    from edge_agent.local import LocalModel, Plan
    from recognizer.recipe import DEFAULT_BATCH_SIZE, DEFAULT_LR

    torch.set_num_threads(1)
    from aggregator.visible import encode_change
    from fedocr.client import manifest_specs

    encoding, download = encodings.NAMES[variant.encoding], encodings.NAMES[variant.download]
    key = seeded_key(seed)
    edges = [LocalModel(s, key, "fedocr-tiny", 0.5, seed=k + 100 * seed) for k, s in enumerate(shards)]
    residuals = [np.zeros(edges[0].length, dtype=np.float32) for _ in edges]
    global_state = np.zeros(edges[0].length, dtype=np.float32)
    visible = global_state.copy()  # what edges hold: the global state itself for float32 downloads
    specs = tuple((s.id, s.length, s.exact) for s in manifest_specs(edges[0].length, edges[0].statistics))
    plan = Plan(local_epochs=1, learning_rate=DEFAULT_LR["adam"], batch_size=DEFAULT_BATCH_SIZE)
    curve, started = [], time.process_time()
    secure = None
    if variant.secure_bits >= 0:
        secure = SecureEncoding(variant.secure_bits, variant.code_range, edges[0].statistics, edges[0].length,
                                seed)
    for t in range(rounds):
        total = np.zeros(global_state.size, dtype=np.float64)
        if secure is not None:
            secure.start()
        for k, edge in enumerate(edges):
            edge.apply_global(visible)
            edge.train_round(plan)
            sent = edge.increment() + (residuals[k] if variant.feedback else 0)
            if secure is not None:
                decoded = secure.add(sent, edge.samples)
            else:
                decoded = upload(sent, edge.statistics, encoding, variant.rounding,
                                 seed=1000 * t + k + 1_000_000 * seed).values
            if variant.feedback:
                residuals[k] = sent - decoded
            fedavg.accumulate(total, decoded, float(edge.samples))
        if secure is not None:
            global_state += secure.mean()
        else:
            fedavg.apply_mean(global_state, total, float(sum(e.samples for e in edges)))
        if encodings.is_lossy(download):
            _, visible = encode_change(visible, global_state, t + 2, specs, download, 3, 1 << 16,
                                       variant.download_rounding)
        else:
            visible = global_state.copy()
        edges[0].apply_global(visible)
        result = edges[0].evaluate(held_out, beam_width=1)
        point = {"round": t + 1, "accuracy": round(result.accuracy, 4),
                 "char_accuracy": round(result.char_accuracy, 4),
                 "cpu_s": round(time.process_time() - started)}
        if secure is not None and secure.bits:
            point["next_code_range"] = round(secure.range, 6)
        curve.append(point)
        print(json.dumps({"variant": variant.name, "seed": seed, **point}), flush=True)
    return {"variant": dataclasses.asdict(variant), "seed": seed, "rounds": rounds, "edges": len(edges),
            "shard_size": SHARD_SIZE, "curve": curve}


def result_name(variant: str, seed: int) -> str:
    """The result file's name: seed 0 keeps the name results had before runs were seeded."""
    return f"{variant}.json" if seed == 0 else f"{variant}-seed{seed}.json"


def print_accuracy(results: list[dict]) -> None:
    """One row per result, each compared with the float32 run of its own seed."""
    print(f"\n{'variant':<24} {'seed':>4} {'feedback':>8} {'rounding':>10} {'download':>8} "
          f"{'final acc.':>10} {'vs float32':>10} {'best acc.':>9} {'1-NED':>6}")
    for r in results:
        v, last, seed = r["variant"], r["curve"][-1], r.get("seed", 0)
        base = next((b for b in results if b["variant"]["name"] == "float32" and b.get("seed", 0) == seed),
                    None)
        delta = "-" if base is None else f"{100 * (last['accuracy'] - base['curve'][-1]['accuracy']):+.1f} pt"
        best = max(p["accuracy"] for p in r["curve"])
        rounding = v["rounding"] if v["encoding"] in ("int8", "int4", "int3", "int2") else "-"
        print(f"{v['name']:<24} {seed:>4} {'on' if v['feedback'] else 'off':>8} {rounding:>10} "
              f"{v.get('download', 'float32'):>8} "
              f"{100 * last['accuracy']:>9.1f}% {delta:>10} {100 * best:>8.1f}% "
              f"{last['char_accuracy']:>6.3f}")


def main(argv: list[str] | None = None) -> int:
    """Print the byte table; with --accuracy, run the missing federations and print their table."""
    p = argparse.ArgumentParser(prog="benchmarks.quantization", description=__doc__.split("\n\n")[0])
    p.add_argument("--accuracy", action="store_true", help="also run the federations (slow)")
    p.add_argument("--variants", help="comma-separated variant names (default: all)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--parallel", type=int, default=2, help="federations run at once (one thread each)")
    p.add_argument("--data-dir", type=Path, default=Path("runs/quantization"))
    p.add_argument("--results", type=Path, default=Path("results/quantization"))
    p.add_argument("--paper-steps", type=int, default=3, help="Adam steps of the paper-width model")
    p.add_argument("--seeds", default="0", help="comma-separated run seeds (key, data order, rounding; "
                   "default 0: the results' original runs)")
    p.add_argument("--run-variant", help=argparse.SUPPRESS)  # internal: one federation in this process
    args = p.parse_args(argv)
    by_name = {v.name: v for v in VARIANTS}
    names = args.variants.split(",") if args.variants else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(by_name)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    shards, held_out = make_data(args.data_dir)
    if args.run_variant:
        result = federate(by_name[args.run_variant], shards, held_out, args.rounds, seeds[0])
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / result_name(args.run_variant, seeds[0])).write_text(json.dumps(result, indent=1))
        return 0
    if not args.accuracy:
        import torch

        torch.set_num_threads(2)
        tiny, stats = sample_increment("fedocr-tiny", 0.5, 125, shards[0])  # a demo edge's local epoch
        rows = byte_rows(tiny, stats)
        print_bytes("fedocr-tiny, gamma 1/2, after 125 Adam steps", tiny.size, stats, rows)
        print_downloads(tiny.size, rows, download_rows(tiny, stats))
        paper, stats = sample_increment("fedocr", 0.25, args.paper_steps, shards[0])
        rows = byte_rows(paper, stats)
        print_bytes(f"fedocr (paper width), gamma 1/4, after {args.paper_steps} Adam steps", paper.size,
                    stats, rows)
        print_downloads(paper.size, rows, download_rows(paper, stats))
        return 0
    runs = [(n, s) for s in seeds for n in names]
    todo = [(n, s) for n, s in runs if not (args.results / result_name(n, s)).exists()]
    running: list[subprocess.Popen] = []
    while todo or running:
        running = [proc for proc in running if proc.poll() is None]
        if todo and len(running) < args.parallel:
            name, seed = todo.pop(0)
            cmd = [sys.executable, "-m", "benchmarks.quantization", "--run-variant", name,
                   "--seeds", str(seed), "--rounds", str(args.rounds), "--data-dir", str(args.data_dir),
                   "--results", str(args.results)]
            running.append(subprocess.Popen(cmd))
            continue
        time.sleep(2)
    results = [json.loads((args.results / result_name(n, s)).read_text()) for n, s in runs
               if (args.results / result_name(n, s)).exists()]
    print(f"{EDGES} edges x {SHARD_SIZE} clean digit strings, {args.rounds} rounds of one local epoch")
    print_accuracy(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
