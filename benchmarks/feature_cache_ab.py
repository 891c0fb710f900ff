"""A/B of the evaluation's per-image feature cache: the same runs with and without it (CPU seconds, metrics).

    python benchmarks/feature_cache_ab.py [DATA]      # default ../shared/data (MVTec AD bottle)
    python benchmarks/feature_cache_ab.py --quick     # a smoke run, no data set (seconds)

``--quick`` needs no data set: in a temporary folder it writes a toy category (``toydata.make_toy_mvtec``, 128 px
crops of scikit-image's gravel photo with drawn defects) and runs the same four runs on it at 128 px (SuperSimpleNet's
Perlin noise fails on the feature maps of 64 px) with 2 training steps each, writing their outputs there too; its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from anomalib_synth.evaluation.runner import EvalConfig, execute

PROTOCOLS = ("supersimplenet", "glass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default="../shared/data", help="the data root (MVTec AD bottle, DTD)")
    parser.add_argument("--quick", action="store_true", help="toy category in a temporary folder, 128 px, 2 steps")
    args = parser.parse_args()
    if args.quick:
        from anomalib_synth.toydata import make_toy_mvtec

        with tempfile.TemporaryDirectory(prefix="feature-cache-ab-quick-") as tmp:
            make_toy_mvtec(Path(tmp) / "mvtec_ad", size=128)
            quick = {"category": "mvtec_ad/gravel", "texture_dir": None, "image_size": 128,
                     "budgets": {p: {"steps": 2, "batch_size": 2, "val_images": 2} for p in PROTOCOLS}}  # fmt: skip
            run(tmp, Path(tmp), **quick)
    else:
        run(args.data, Path())


def run(data: str, output: Path, category: str = "mvtec_ad/bottle", texture_dir: str | None = "",
        image_size: int | None = None, budgets: dict | None = None) -> None:  # fmt: skip
    torch.set_num_threads(1)
    textures = f"{data}/textures/dtd/images" if texture_dir == "" else texture_dir
    out = {}
    for method, protocol in (("ssn-default", "supersimplenet"), ("cutpaste", "glass")):
        for cache in (True, False):
            config = EvalConfig(data_root=data, categories=[category], synthesizers=["cutpaste"], seeds=[0],
                                protocols=[protocol], texture_dir=textures, feature_cache=cache, workers=1,
                                image_size=image_size, budgets=budgets or {})  # fmt: skip
            config.validate()
            task = {"protocol": protocol, "category": category, "method": method, "seed": 0}
            record = execute(task, config, output / f"feature_cache_ab_{cache}")
            out[f"{protocol}/{method}/cache={cache}"] = {
                "cpu_seconds": record["cpu_seconds"], "pixel_AP": record["metrics"]["pixel_AP"],
                "feature_cache": record["info"].get("feature_cache"),
            }  # fmt: skip
            print(json.dumps(out[f"{protocol}/{method}/cache={cache}"]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
