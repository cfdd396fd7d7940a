"""Train-step speed and memory of the recognizer presets: hashed vs unhashed, float32 vs bf16 autocast.

Run: .venv/bin/python -m benchmarks.model_speed [--presets fedocr-tiny fedocr-small] [--bf16] [--json]

Each preset is measured in its own spawned process. Within it every variant (unhashed, gamma 1, 1/4,
1/8, and with --bf16 the same under CPU bf16 autocast) is built and trained side by side, one step
of each per round, so machine noise hits all variants alike. The figure per variant is its fastest
step over the rounds (the least disturbed on a shared machine; the median is printed beside it),
and ratios are against the unhashed float32 model of the same run.
A second process per preset trains only the hashed gamma=1/4 model to report its peak RSS alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time

GAMMAS = (None, 1.0, 0.25, 0.125)


def _variants(bf16: bool) -> list[tuple[str, float | None, bool]]:
    out = [("plain" if g is None else f"hash {g:g}", g, False) for g in GAMMAS]
    if bf16:
        out += [("plain bf16", None, True), ("hash 0.25 bf16", 0.25, True)]
    return out


def _batch(batch: int, seq_len: int):
    import torch

    from recognizer.charset import EOS

    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 64, 256, generator=g) * 2 - 1
    targets = torch.randint(0, 62, (batch, seq_len), generator=g)
    targets[:, -1] = EOS
    return images, targets


def _trainer(preset: str, gamma: float | None, bf16: bool):
    """A closure running one forward + backward + Adadelta step, as recognizer.train does."""
    import torch
    import torch.nn.functional as F

    from recognizer.charset import NUM_CLASSES, PAD
    from recognizer.model import build_model

    model = build_model(preset, bytes(32), gamma=gamma).train()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)

    def step(images, targets) -> float:
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with cast:
            logits = model(images, targets)
        loss = F.cross_entropy(logits.float().reshape(-1, NUM_CLASSES), targets.reshape(-1), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_speed(preset: str, batch: int, seq_len: int, rounds: int, threads: int, bf16: bool) -> dict:
    """Fastest and median train-step seconds of every variant of ``preset``, interleaved round by round."""
    import torch

    torch.set_num_threads(threads)
    images, targets = _batch(batch, seq_len)
    variants = _variants(bf16)
    steps = {name: _trainer(preset, g, b) for name, g, b in variants}
    for step in steps.values():  # warm-up: oneDNN primitives, allocator
        for _ in range(3):
            step(images, targets)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(images, targets)
            times[name].append(time.perf_counter() - start)
    best = {name: min(ts) for name, ts in times.items()}
    return {
        "preset": preset,
        "batch": batch,
        "seq_len": seq_len,
        "threads": threads,
        "step_s": best,
        "step_s_median": {name: statistics.median(ts) for name, ts in times.items()},
        "images_per_s": {name: batch / s for name, s in best.items()},
        "ratio_vs_plain": {name: s / best["plain"] for name, s in best.items()},
        "peak_rss_mib_all_variants": _peak_rss_mib(),
    }


def measure_rss(preset: str, batch: int, seq_len: int, threads: int) -> float:
    """Peak RSS (MiB) of a process training the gamma=1/4 model alone for three steps."""
    import torch

    torch.set_num_threads(threads)
    images, targets = _batch(batch, seq_len)
    step = _trainer(preset, 0.25, False)
    for _ in range(3):
        step(images, targets)
    return _peak_rss_mib()


def _in_child(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main(argv: list[str] | None = None) -> int:
    from recognizer.charset import MAX_SEQ_LEN
    from recognizer.model import PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=MAX_SEQ_LEN, help="decoder steps (default: the maximum)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also time CPU bf16 autocast")
    p.add_argument("--json", action="store_true", help="print one JSON object per preset")
    args = p.parse_args(argv)

    for preset in args.presets:
        batch = args.batch
        res = _in_child(measure_speed, preset, batch, args.seq_len, args.rounds, args.threads, args.bf16)
        res["peak_rss_mib_gamma_0.25"] = _in_child(measure_rss, preset, batch, args.seq_len, args.threads)
        if args.json:
            print(json.dumps(res), flush=True)
            continue
        print(f"\n{preset}  batch {batch}  T={args.seq_len}  threads {args.threads}")
        print(f"  {'variant':<16}{'ms/step':>9}{'median':>8}{'img/s':>8}{'vs plain':>10}")
        for name, s in res["step_s"].items():
            med = res["step_s_median"][name]
            ips, ratio = res["images_per_s"][name], res["ratio_vs_plain"][name]
            print(f"  {name:<16}{s * 1e3:>9.0f}{med * 1e3:>8.0f}{ips:>8.0f}{ratio:>9.3f}x")
        print(
            f"  peak RSS: {res['peak_rss_mib_gamma_0.25']:.0f} MiB training gamma 1/4 alone, "
            f"{res['peak_rss_mib_all_variants']:.0f} MiB with all variants",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
