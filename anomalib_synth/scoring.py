"""``anomalib-synth score``: generation-quality figures of a generated folder against real anomalous images.

The generated folder is what ``anomalib-synth generate`` writes (its ``manifest.jsonl`` gives each image, its mask and
its source image); the real folder holds real anomalous images (e.g. ``mvtec_ad/bottle/test/broken_large``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import metrics as M
from .io import BUILTIN_PREFIX, builtin_photo, list_images, read_image, resize, write_text
from .writer import MANIFEST

__all__ = ["METRICS", "markdown_table", "score_folder"]

METRICS = ("is", "kid", "ic-lpips", "background")
"""What :func:`score_folder` can compute (IS and KID need the Inception weights, IC-LPIPS and the background LPIPS
the LPIPS weights)."""


def _read_source(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A generated image's source, resized and quantised to 8 bits as the generated PNG was."""
    image = builtin_photo(path[len(BUILTIN_PREFIX) :]) if path.startswith(BUILTIN_PREFIX) else read_image(path)
    return (resize(image, size) * 255).round() / 255


def score_folder(
    generated: str | Path,
    real: str | Path,
    metrics: Sequence[str] = METRICS,
    size: int = 256,
    distance: str = "lpips-alex",
    device: str = "cpu",
) -> dict[str, Any]:
    """Compute ``metrics`` for the anomalous images of ``generated`` against the images of ``real``.

    Args:
        generated (str | Path): a folder written by ``anomalib-synth generate``.
        real (str | Path): a folder of real anomalous images (searched recursively).
        metrics (Sequence[str]): any of :data:`METRICS`.
        size (int): images are resized to ``size x size``.
        distance (str): ``"lpips-alex"``, ``"lpips-vgg"`` or ``"pixel"`` (mean squared pixel difference: a cheap,
            weight-free stand-in for smoke tests, not comparable to published IC-LPIPS).
        device (str): where LPIPS runs.

    Raises:
        ValueError: for an unknown metric or distance, or a folder without images / manifest.
        ModelNotFoundError: when the weights a metric needs cannot be loaded.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or distance not in ("lpips-alex", "lpips-vgg", "pixel"):
        msg = f"unknown metrics {unknown} or distance {distance!r}; metrics: {', '.join(METRICS)}"
        raise ValueError(msg)
    generated = Path(generated)
    if not (generated / MANIFEST).is_file():
        msg = f"{generated} has no {MANIFEST}: score a folder written by `anomalib-synth generate`"
        raise ValueError(msg)
    records = [json.loads(line) for line in (generated / MANIFEST).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("label")]
    real_files = list_images(real)
    if not records or not real_files:
        msg = f"need anomalous generated images ({len(records)} in {generated}) and real images ({len(real_files)})"
        raise ValueError(msg)
    hw = (size, size)
    images = torch.stack([resize(read_image(generated / r["image"]), hw) for r in records])
    masks = torch.stack([resize(read_image(generated / r["mask"], channels=1), hw) > 0.5 for r in records])
    sources = torch.stack([_read_source(r["source"], hw) for r in records])
    reals = torch.stack([resize(read_image(p), hw) for p in real_files])
    dist = M.pixel_distance if distance == "pixel" else M.LPIPSDistance(distance.split("-")[1], device)
    out: dict[str, Any] = {"generated": str(generated), "real": str(real), "n_generated": len(records),
                           "n_real": len(real_files), "size": size, "distance": distance}  # fmt: skip
    if "is" in metrics:
        out["is_mean"], out["is_std"] = M.inception_score(images)
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = M.kernel_inception_distance(images, reals)
    if "ic-lpips" in metrics:
        out["ic_lpips"] = M.ic_lpips(images, reals, dist)
    if "background" in metrics:
        out.update(M.background_preservation(images, sources, masks, dist))
    return out


def markdown_table(scores: dict[str, Any]) -> str:
    """One-row markdown table of the numeric figures."""
    keys = [k for k, v in scores.items() if isinstance(v, float)]
    cells = ["inf" if math.isinf(scores[k]) else f"{scores[k]:.4g}" for k in keys]
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys), "| " + " | ".join(cells) + " |"])


def write_scores(scores: dict[str, Any], output: str | Path) -> None:
    """``output`` (JSON) and the markdown table next to it (``.md``), written atomically."""
    output = Path(output)
    write_text(output, json.dumps(scores, indent=2, default=str))
    write_text(output.with_suffix(".md"), markdown_table(scores) + "\n")
