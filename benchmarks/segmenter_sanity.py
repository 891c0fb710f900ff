"""Sanity check of a pretrained one-prompt segmenter on one real category (not a benchmark: a handful of images).

Pixel AP (torchmetrics ``BinaryAveragePrecision`` over every pixel of every test image, 256 px) with one normal
training image as the prompt, for the segmenter and for the non-learned nearest-neighbour cosine distance it gets as
an input (stride 4, PatchCore-like, upsampled), which shows what the learned part adds::

    python benchmarks/segmenter_sanity.py RUN_FOLDER --category bottle [--prompt train/good/000.png] [--data-root DATA]
    python benchmarks/segmenter_sanity.py --quick    # a smoke run, no data set and no RUN_FOLDER (seconds)

The data root is ``--data-root``, else ``$ANOMALIB_SYNTH_DATA`` or ``../shared/data`` relative to the repository root;
``mvtec_ad/<category>`` in the MVTec layout. Refuses a segmenter that saw the category or a test image
(``check_segmenter_leakage``). ``--quick`` needs neither: in a temporary folder it writes a toy category
(``toydata.make_toy_mvtec``, 64 px crops of scikit-image's gravel photo with drawn defects) and pretrains a segmenter
for 2 steps of 2 pairs at 64 px on scikit-image's other photos (gravel excluded), then checks that; its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAveragePrecision

from anomalib_synth.io import list_images, load_images, masks_for, read_mask
from anomalib_synth.models.one_prompt_segmenter import OnePromptSegmenterModel, check_segmenter_leakage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="a pretrained segmenter's folder (not with --quick)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--prompt", default=None, help="relative to the category (default: the first train/good)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--data-root", default=None, help="default: $ANOMALIB_SYNTH_DATA or ../shared/data")
    parser.add_argument("--quick", action="store_true", help="toy category, 2-step segmenter, 64 px: a smoke run")
    args = parser.parse_args()
    if args.quick:
        torch.set_num_threads(1)
        from anomalib_synth.models.one_prompt_segmenter.pretrain import pretrain_segmenter
        from anomalib_synth.toydata import make_toy_mvtec

        with tempfile.TemporaryDirectory(prefix="segmenter-sanity-quick-") as tmp:
            make_toy_mvtec(Path(tmp) / "mvtec_ad", size=64)
            args.category, args.prompt, args.size, args.run = "gravel", None, 64, str(Path(tmp) / "segmenter")
            pretrain_segmenter([], [args.category], args.run, steps=2, batch_size=2, image_size=64,
                               synthesizers="cutpaste+nsa", progress=False, threads=1)  # fmt: skip
            run(args, Path(tmp))
        return
    if args.run is None:
        parser.error("RUN_FOLDER is required (or --quick)")
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    run(args, Path(args.data_root or os.environ.get("ANOMALIB_SYNTH_DATA", default)))


def run(args: argparse.Namespace, root: Path) -> None:
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
