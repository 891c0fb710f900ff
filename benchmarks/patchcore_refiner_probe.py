"""PatchCore (the untrained refiner) against the trained refiner on real categories: pixel AP and CPU seconds.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/patchcore_refiner_probe.py [--categories bottle capsule]
        [--data-root DATA]
    python benchmarks/patchcore_refiner_probe.py --quick    # a smoke run, no data set (seconds)

Data: ``--data-root``, else ``$ANOMALIB_SYNTH_DATA`` or ``../shared/data`` (relative to the repository root):
``mvtec_ad/<category>``. ``--quick`` needs no data set: it writes a toy category (``toydata.make_toy_mvtec``, 64 px
crops of scikit-image's gravel photo with drawn defects) into a temporary folder and trains the head for 3 steps at
64 px; its numbers mean nothing.
One shot (seed 0 of the harness's draw; capsule has no train/good, so its shot is the first test/good image, 001.png,
which leaves the test set), 256 px, one thread. Nothing here chooses anything: the refiner runs with its defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torchmetrics.classification import BinaryAveragePrecision

from anomalib_synth.evaluation.data import load_category, load_images, load_test_set
from anomalib_synth.models.patchcore_refiner import PatchcoreRefinerModel, train_refiner
from anomalib_synth.seeding import generator_for
from anomalib_synth.synthesizers.mix import build

ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("ANOMALIB_SYNTH_DATA", ROOT / ".." / "shared" / "data"))


def pixel_ap(maps: torch.Tensor, masks: torch.Tensor) -> float:
    return float(BinaryAveragePrecision()(maps.flatten(), masks.flatten().long()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--categories", nargs="+", default=["bottle", "capsule"])
    parser.add_argument("--synthesizer", default="nsa+cutpaste")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--data-root", default=None, help="default: $ANOMALIB_SYNTH_DATA or ../shared/data")
    parser.add_argument("--quick", action="store_true", help="toy category in a temporary folder, 64 px, 3 steps")
    args = parser.parse_args()
    if args.quick:
        from anomalib_synth.toydata import make_toy_mvtec

        with tempfile.TemporaryDirectory(prefix="refiner-probe-quick-") as tmp:
            make_toy_mvtec(Path(tmp) / "mvtec_ad", size=64)
            args.categories, args.size = ["gravel"], 64
            run(args, Path(tmp), steps=3)
    else:
        run(args, Path(args.data_root) if args.data_root else data_root())


def run(args: argparse.Namespace, root: Path, steps: int | None = None) -> None:
    torch.set_num_threads(1)
    size = (args.size, args.size)
    textures = str(root / "textures" / "dtd" / "images")
    training = {} if steps is None else {"steps": steps}
    rows = []
    for category in args.categories:
        data = load_category(root / "mvtec_ad", category)
        if data.shots_from_test:
            shot_paths = sorted(data.normal)[:1]  # the first test/good image (capsule here has no 000.png: 001.png)
            test = [s for s in data.test if s.image not in shot_paths]
        else:
            shot_paths, test = data.split(1, args.seed)
        shots = load_images(shot_paths, size)
        images, masks, _ = load_test_set(test, size)
        generator = generator_for(args.seed, "train")
        start = time.process_time()
        torch.manual_seed(args.seed)
        model = PatchcoreRefinerModel(seed=args.seed)
        model.fit(shots, generator)
        fit_s = time.process_time() - start
        losses, _ = train_refiner(model, shots, build(args.synthesizer, textures), generator=generator, **training)
        train_s = time.process_time() - start - fit_s
        model.eval()
        refined, plain = [], []
        with torch.no_grad():
            for i in range(0, len(images), 8):
                r, z = model.maps(images[i : i + 8])
                refined.append(r)
                plain.append(z)
        row = {"category": category, "shot": str(shot_paths[0].relative_to(root)), "test_images": len(test),
               "patchcore_pixel_AP": pixel_ap(torch.cat(plain), masks),
               "refiner_pixel_AP": pixel_ap(torch.cat(refined), masks),
               "fit_cpu_s": round(fit_s, 1), "train_cpu_s": round(train_s, 1),
               "loss_first10": sum(losses[:10]) / len(losses[:10]),
               "loss_last10": sum(losses[-10:]) / len(losses[-10:])}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)


if __name__ == "__main__":
    main()
