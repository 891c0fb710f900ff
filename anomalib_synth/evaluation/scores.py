"""Metrics on the real test set, with torchmetrics / anomalib implementations.

Scores are min-max normalised to ``[0, 1]`` over the whole test set first: torchmetrics' binary metrics silently
apply a sigmoid to scores outside ``[0, 1]``, which would change AP and F1 thresholds of unbounded maps.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision, BinaryPrecisionRecallCurve

METRICS = ("pixel_AP", "pixel_AUROC", "pixel_F1max", "image_AUROC", "image_AP", "image_F1")
"""Every metric a run may report; ``image_F1`` (F1 of the image labels at a threshold) only comes from the rows that
set a threshold (protocol ``patchcore``), the others are NaN where they do not apply."""


def normalise(scores: Tensor) -> Tensor:
    """Min-max to ``[0, 1]`` (a constant map becomes all zeros)."""
    scores = scores.float()
    lo, hi = scores.min(), scores.max()
    return (scores - lo) / (hi - lo) if hi > lo else torch.zeros_like(scores)


def image_scores(maps: Tensor, top_fraction: float = 0.01) -> Tensor:
    """Image score = mean of the top ``top_fraction`` of each map's pixels (``[N, H, W]`` -> ``[N]``)."""
    flat = maps.flatten(1)
    k = max(1, round(top_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


def f1_max(scores: Tensor, target: Tensor) -> float:
    curve = BinaryPrecisionRecallCurve(thresholds=None)
    precision, recall, _ = curve(scores, target.long())
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return float(f1.max())


def evaluate_maps(maps: Tensor, masks: Tensor, labels: Tensor, max_pixels: int = 2_000_000) -> dict[str, float]:
    """Pixel AP / AUROC / F1-max and image AUROC / AP of anomaly ``maps`` ``[N, H, W]`` against ``masks``, ``labels``.

    Pixel metrics use every pixel when there are at most ``max_pixels``, else a fixed-stride subsample.
    """
    pixels = normalise(maps).flatten()
    target = masks.flatten().long()
    if pixels.numel() > max_pixels:
        step = -(-pixels.numel() // max_pixels)
        pixels, target = pixels[::step], target[::step]
    images = normalise(image_scores(maps))
    both = bool(labels.any()) and not bool(labels.all())  # image metrics need normal and anomalous images
    nan = float("nan")
    return {
        "pixel_AP": float(BinaryAveragePrecision()(pixels, target)),
        "pixel_AUROC": float(BinaryAUROC()(pixels, target)),
        "pixel_F1max": f1_max(pixels, target),
        "image_AUROC": float(BinaryAUROC()(images, labels.long())) if both else nan,
        "image_AP": float(BinaryAveragePrecision()(images, labels.long())) if both else nan,
    }
