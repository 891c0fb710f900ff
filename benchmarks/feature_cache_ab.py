"""A/B of the evaluation's per-image feature cache: the same runs with and without it (CPU seconds, metrics).

    python benchmarks/feature_cache_ab.py [DATA]      # default ../shared/data (MVTec AD bottle)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from anomalib_synth.evaluation.runner import EvalConfig, execute


def main() -> None:
    data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
    torch.set_num_threads(1)
    out = {}
    for method, protocol in (("ssn-default", "supersimplenet"), ("cutpaste", "glass")):
        for cache in (True, False):
            config = EvalConfig(data_root=data, categories=["mvtec_ad/bottle"], synthesizers=["cutpaste"], seeds=[0],
                                protocols=[protocol], texture_dir=f"{data}/textures/dtd/images", feature_cache=cache,
                                workers=1)  # fmt: skip
            config.validate()
            task = {"protocol": protocol, "category": "mvtec_ad/bottle", "method": method, "seed": 0}
            record = execute(task, config, Path(f"feature_cache_ab_{cache}"))
            out[f"{protocol}/{method}/cache={cache}"] = {
                "cpu_seconds": record["cpu_seconds"], "pixel_AP": record["metrics"]["pixel_AP"],
                "feature_cache": record["info"].get("feature_cache"),
            }  # fmt: skip
            print(json.dumps(out[f"{protocol}/{method}/cache={cache}"]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
