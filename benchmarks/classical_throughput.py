"""Throughput of the classical synthesizers vs anomalib's ``PerlinAnomalyGenerator``, measured in one run.

    python benchmarks/classical_throughput.py [--device cpu] [--batch 32] [--size 256] [--repeats 7]

Prints images/second per synthesizer (median over ``--repeats`` timed calls after one warm-up) and the ratio to
anomalib's generator on the same batch. Targets (issue 2): ``perlin`` >= 10x, every classical synthesizer >= 5x.
The batch is built from scikit-image's shipped photos, so no data set is needed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from anomalib_synth.io import builtin_photo, resize
from anomalib_synth.synthesizers import available, get

TARGETS = {"perlin": 10.0}
DEFAULT_TARGET = 5.0


def make_batch(batch: int, size: int, device: str) -> torch.Tensor:
    names = ["brick", "grass", "gravel", "coffee"]
    photos = [resize(builtin_photo(n), (size, size)) for n in names]
    return torch.stack([photos[i % len(photos)] for i in range(batch)]).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, repeats: int, device: str) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--synthesizers", default=",".join(n for n in available() if n != "anomalib-perlin"))
    args = parser.parse_args()

    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

    images = make_batch(args.batch, args.size, args.device)
    baseline = PerlinAnomalyGenerator(probability=1.0)
    base_s = time_call(lambda: baseline(images), args.repeats, args.device)
    base_ips = args.batch / base_s
    print(f"batch {args.batch}x3x{args.size}x{args.size} on {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'synthesizer':<22}{'img/s':>10}{'x anomalib':>12}{'target':>8}  ok")
    print(f"{'anomalib PerlinAnomalyGenerator':<22}{base_ips:>10.0f}{1.0:>12.2f}")
    generator = torch.Generator().manual_seed(0)
    failed = []
    for name in args.synthesizers.split(","):
        synth = get(name).to(args.device)
        seconds = time_call(lambda s=synth: s(images, generator=generator), args.repeats, args.device)
        ips = args.batch / seconds
        ratio = ips / base_ips
        target = TARGETS.get(name, DEFAULT_TARGET)
        ok = ratio >= target
        failed += [] if ok else [name]
        print(f"{name:<22}{ips:>10.0f}{ratio:>12.2f}{target:>7.0f}x  {'yes' if ok else 'NO'}")
    if failed:
        print(f"below target: {', '.join(failed)}")


if __name__ == "__main__":
    main()
