"""Background pasted onto the object, per classical synthesizer at its defaults (issue 20).

    python benchmarks/background_pasted.py [--data-root ../shared/data/mvtec_ad/bottle/train/good]
                                           [--seeds 6] [--images 8] [--size 256] [--quick]

For each synthesizer: the fraction of the changed pixels inside the masks that now have the colour of the plain
background (the median of the image's border) and did not before (:func:`anomalib_synth.metrics.background_pasted`),
pooled over ``--seeds`` calls on the same ``--images`` images. Target: under 1 % on MVTec bottle. Without
``--data-root`` (or with ``--quick``) the images are scikit-image's ``coffee`` and ``rocket`` photos, which have no
plain background (a smoke run, not the measure).
"""

from __future__ import annotations

import argparse

import torch

from anomalib_synth.io import builtin_photo, list_images, read_image, resize
from anomalib_synth.metrics import background_pasted_counts
from anomalib_synth.synthesizers import available, get, get_class

DEFAULT_ROOT = "../shared/data/mvtec_ad/bottle/train/good"
TARGET = 0.01


def classical() -> list[str]:
    return [n for n in available() if get_class(n).kind == "classical"]


def load(root: str | None, count: int, size: int) -> torch.Tensor:
    if root is None:
        photos = [resize(builtin_photo(n), (size, size)) for n in ("coffee", "rocket")]
        return torch.stack([photos[i % len(photos)] for i in range(count)])
    files = list_images(root)[:count]
    images = torch.stack([resize(read_image(f), (size, size)) for f in files])
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def measure(name: str, images: torch.Tensor, seeds: int) -> float:
    synth = get(name)
    pasted = changed = 0
    for seed in range(seeds):
        result = synth(images, generator=torch.Generator().manual_seed(seed))
        p, c = background_pasted_counts(result, images)
        pasted, changed = pasted + int(p.sum()), changed + int(c.sum())
    return pasted / max(changed, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=DEFAULT_ROOT, help="a folder of normal images ('' for the photos)")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--synthesizers", default=",".join(classical()))
    parser.add_argument("--quick", action="store_true", help="2 photos, 2 seeds, 64 px: a smoke run")
    args = parser.parse_args(argv)
    root = args.data_root or None
    if args.quick:
        root, args.seeds, args.images, args.size = None, 2, 2, 64
    images = load(root, args.images, args.size)
    print(f"{len(images)} images from {root or 'scikit-image photos'} at {args.size}px, seeds 0-{args.seeds - 1}")
    print(f"{'synthesizer':<18}{'pasted':>9}{'target':>8}  ok")
    for name in args.synthesizers.split(","):
        fraction = measure(name, images, args.seeds)
        print(f"{name:<18}{fraction:>8.2%}{TARGET:>8.0%}  {'yes' if fraction < TARGET else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
