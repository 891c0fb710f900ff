"""Model-free quality figures of a :class:`~anomalib_synth.synthesizers.SynthesisResult` against its input.

All functions return one value per sample (``[B]``) so that they can be aggregated or filtered:

- :func:`background_psnr`: PSNR (dB) of the pixels *outside* the mask. ``inf`` when the background is untouched,
  which is what every synthesizer here guarantees. A damaged background inflates diversity metrics such as
  IC-LPIPS, so report it next to them.
- :func:`anomaly_visibility`: mean absolute change inside the mask (intensity in ``[0, 1]``, averaged over
  channels). Near 0 means the "anomaly" is invisible and the label is noise.
- :func:`mask_agreement`: IoU between the changed pixels (``max over channels |change| > tau``) and the mask. Near 1
  means the mask covers what changed and nothing else.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .synthesizers.base import SynthesisResult


def _change(result: SynthesisResult, images: Tensor) -> Tensor:
    if result.images.shape != images.shape:
        msg = f"result images {tuple(result.images.shape)} and input images {tuple(images.shape)} differ in shape"
        raise ValueError(msg)
    return (result.images.float() - images.float()).abs()


def background_psnr(result: SynthesisResult, images: Tensor) -> Tensor:
    """PSNR in dB of the pixels outside the mask (``inf`` if they are unchanged or the mask covers everything)."""
    change = _change(result, images)
    outside = 1 - result.masks.float()
    squared = (change**2 * outside).sum((1, 2, 3))
    count = (outside.sum((1, 2, 3)) * change.shape[1]).clamp_min(1)
    mse = squared / count
    return torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-20)), torch.full_like(mse, math.inf))


def anomaly_visibility(result: SynthesisResult, images: Tensor) -> Tensor:
    """Mean absolute change inside the mask (0 for an empty mask)."""
    change = _change(result, images).mean(1, keepdim=True)
    inside = result.masks.float()
    return (change * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3)).clamp_min(1)


def mask_agreement(result: SynthesisResult, images: Tensor, tau: float = 1 / 255) -> Tensor:
    """IoU between ``max_c |change| > tau`` and the mask (1 when both are empty)."""
    changed = _change(result, images).amax(1, keepdim=True) > tau
    mask = result.masks > 0.5
    intersection = (changed & mask).sum((1, 2, 3)).float()
    union = (changed | mask).sum((1, 2, 3)).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def summarize(result: SynthesisResult, images: Tensor, tau: float = 1 / 255) -> dict[str, float]:
    """Batch means of the three figures, plus the anomalous fraction and the mean mask area."""
    psnr = background_psnr(result, images)
    finite = psnr[psnr.isfinite()]
    return {
        "anomalous": float(result.labels.float().mean()),
        "mask_area": float(result.masks.mean()),
        "background_psnr": float(finite.mean()) if finite.numel() else math.inf,
        "visibility": float(anomaly_visibility(result, images).mean()),
        "mask_iou": float(mask_agreement(result, images, tau).mean()),
    }
