"""Sanity check of a pretrained one-prompt segmenter on one real category (not a benchmark: a handful of images).

Pixel AP (torchmetrics ``BinaryAveragePrecision`` over every pixel of every test image, 256 px) with one normal
training image as the prompt, for the segmenter and for the non-learned nearest-neighbour cosine distance it gets as
an input (stride 4, PatchCore-like, upsampled), which shows what the learned part adds::

    python benchmarks/segmenter_sanity.py RUN_FOLDER --category bottle [--prompt train/good/000.png]

The data root is ``$ANOMALIB_SYNTH_DATA`` or ``../shared/data`` relative to the repository root; ``mvtec_ad/<category>``
in the MVTec layout. Refuses a segmenter that saw the category or a test image (``check_segmenter_leakage``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAveragePrecision

from anomalib_synth.io import list_images, load_images, masks_for, read_mask
from anomalib_synth.models.one_prompt_segmenter import OnePromptSegmenterModel, check_segmenter_leakage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--prompt", default=None, help="relative to the category (default: the first train/good)")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    root = Path(os.environ.get("ANOMALIB_SYNTH_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
    category = root / "mvtec_ad" / args.category
    normals = list_images(category / "train" / "good") if (category / "train" / "good").is_dir() else []
    prompt = category / args.prompt if args.prompt else (normals or list_images(category / "test" / "good"))[0]
    tests = [p for p in list_images(category / "test") if p != prompt]
    size = (args.size, args.size)
    truth = category / "ground_truth"
    masks = torch.stack([read_mask([] if p.parent.name == "good" else masks_for(truth / p.parent.name, p), size)
                         for p in tests])  # fmt: skip
    model = OnePromptSegmenterModel.from_pretrained(args.run).eval()
    check_segmenter_leakage(model, args.category, tests)
    images, prompt_image = load_images(tests, size), load_images([prompt], size)
    with torch.no_grad():
        prompts = model.embed(prompt_image)
        maps, distances = [], []
        for i in range(0, len(images), 8):
            query = model.embed(images[i : i + 8])
            lower, skip = model.decoder_inputs(query, prompts)
            maps.append(torch.sigmoid(model.decode(lower, skip, size)))
            distances.append(F.interpolate(skip[:, -1:], size=size, mode="bilinear", align_corners=False))
    target = masks.flatten().long()
    for name, values in (("segmenter", torch.cat(maps)), ("nn-distance (stride 4, its input)", torch.cat(distances))):
        ap = BinaryAveragePrecision()(values.flatten(), target)
        print(f"{args.category}: pixel AP {float(ap):.3f}  {name}  [prompt {prompt.relative_to(category)}, "
              f"{len(tests)} test images, {int(target.sum())} defect pixels]")


if __name__ == "__main__":
    main()
