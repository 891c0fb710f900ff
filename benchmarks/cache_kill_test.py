"""Kill test of the on-disk cache (mode ``cache``): SIGKILL a build at random points, resume, compare.

Each round starts a fresh build of the same cache entry in a child process, waits until a random number of samples
is on disk (from none to all but one), kills the child with SIGKILL, and then resumes the build to completion in a
new process. The resumed entry must be identical, file by file, to an uninterrupted build, with no corrupt entry
(a manifest line whose files are missing or unreadable, a file that differs, a stray temporary file).

    python benchmarks/cache_kill_test.py --kills 20
    python benchmarks/cache_kill_test.py --quick      # 2 kills on 3 images x 2 variants at 64 px (a smoke run)

Prints one line per round and a summary; exits 1 if any round differs. Uses scikit-image's photos (no data needed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from anomalib_synth.data.cache import build_cache
from anomalib_synth.synthesizers import get
sources, cache, variants, size, synth = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
build_cache(get(synth), sources, cache, variants=variants, seed=0, size=(size, size), batch_size=4, progress=False)
"""


def write_sources(folder: Path, count: int, size: int) -> list[str]:
    """``count`` crops of scikit-image's photos, written as PNG."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = [skimage.data.brick(), skimage.data.gravel(), skimage.data.grass(), skimage.data.coffee()]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        top = rng.integers(0, photo.shape[0] - size)
        left = rng.integers(0, photo.shape[1] - size)
        path = folder / f"{i:03d}.png"
        Image.fromarray(photo[top : top + size, left : left + size]).save(path)
        paths.append(str(path))
    return paths


def start(args: argparse.Namespace, sources: list[str], cache: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", CHILD, ",".join(sources), str(cache), str(args.variants), str(args.size),
               args.synthesizer]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def entry(cache: Path) -> Path | None:
    entries = [p for p in cache.iterdir() if p.is_dir()] if cache.is_dir() else []
    return entries[0] if entries else None


def written(cache: Path) -> int:
    folder = entry(cache)
    manifest = folder / "manifest.jsonl" if folder else None
    return manifest.read_text().count("\n") if manifest and manifest.is_file() else 0


def digest(cache: Path) -> dict[str, str]:
    """sha256 of every file of the entry (manifest lines parsed, so that their order does not matter)."""
    folder = entry(cache)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if rel == "manifest.jsonl":
            lines = sorted(json.dumps(json.loads(line), sort_keys=True) for line in path.read_text().splitlines())
            files[rel] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        else:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def corrupt_entries(cache: Path, reference: dict[str, str]) -> list[str]:
    """Files that differ from the reference, are missing, are extra (e.g. temporary), or that a manifest line
    names but cannot be opened."""
    from PIL import Image

    got = digest(cache)
    bad = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
    folder = entry(cache)
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("image", "mask"):
            if record.get(key):
                try:
                    with Image.open(folder / record[key]) as img:
                        img.load()
                except OSError:
                    bad.append(record[key])
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--synthesizer", default="nsa")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    parser.add_argument("--time-limit", type=float, default=3600, help="seconds; stop starting new rounds after it")
    parser.add_argument("--quick", action="store_true", help="2 kills, 3 images x 2 variants at 64 px")
    args = parser.parse_args(argv)
    if args.quick:
        args.kills, args.images, args.variants, args.size = 2, 3, 2, 64
    total = args.images * args.variants
    rng = random.Random(args.seed)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cache-kill-") as tmp:
        work = Path(tmp)
        sources = write_sources(work / "sources", args.images, args.size)
        reference_cache = work / "reference"
        child = start(args, sources, reference_cache)
        if child.wait() != 0:
            print(child.stderr.read(), file=sys.stderr)
            return 1
        reference = digest(reference_cache)
        print(f"reference build: {total} samples, {len(reference)} files")
        failures, kills_landed, rounds = 0, 0, 0
        for round_index in range(args.kills):
            if time.perf_counter() - began > args.time_limit:
                print(f"time limit reached after {round_index} rounds")
                break
            rounds += 1
            cache = work / f"round{round_index:02d}"
            target = rng.randrange(total)
            child = start(args, sources, cache)
            while child.poll() is None and written(cache) < target:
                time.sleep(0.005)
            time.sleep(rng.random() * 0.05)  # land anywhere inside the next sample, not only between samples
            landed = child.poll() is None
            child.send_signal(signal.SIGKILL)
            child.wait()
            before = written(cache)
            temporaries = len(list(cache.rglob(".*.tmp*"))) if cache.is_dir() else 0
            resumed = start(args, sources, cache)
            if resumed.wait() != 0:
                print(resumed.stderr.read(), file=sys.stderr)
                failures += 1
                continue
            bad = corrupt_entries(cache, reference)
            failures += bool(bad)
            kills_landed += landed
            print(f"round {round_index + 1:2d}: killed at {before:3d}/{total} samples "
                  f"({temporaries} temp files left), resumed: {len(bad)} corrupt entries"
                  + (f" {bad[:5]}" if bad else ""))  # fmt: skip
        print(f"\n{rounds} SIGKILLs ({kills_landed} during the build), {failures} rounds with corrupt entries, "
              f"{time.perf_counter() - began:.0f}s")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
