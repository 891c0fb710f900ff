"""The anomaly map: where the defect words attend (AnomalyAny, arXiv 2406.01078, Sec. 3.2, Eq. 3-4; Sec. 3.4).

The cross-attention maps that :class:`~anomalib_synth.synthesizers.diffusion.attention.AttentionStore` captures
(averaged over heads and layers at one resolution, 16x16 for SD 1.5 at 512 px) become one map per sample:

1. the logits of the prompt's own tokens (no start, end or padding token) are scaled by ``token_scale`` (100) and
   soft-maxed over those tokens;
2. the probabilities of the defect words' tokens are averaged;
3. the map is Gaussian-smoothed (k=3, sigma=0.5, reflect padding), as the official code does.

It drives ``L_att`` (:mod:`.losses`), gives ``n_t`` for the localization-aware scheduler (:mod:`.schedule`), and its
last value is the output mask (Sec. 3.4, :func:`output_mask`).

*Departures.* The official code soft-maxes over ``[1:-1]`` of the 77 tokens, end and padding tokens included; we
soft-max over the prompt's own tokens only, so the defect words do not compete with padding. The official code
never saves a mask (it only shows the thresholded map); we return one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor

from ..attention import cross_attention_resolutions
from ..prompts import AnomalyPrompt

__all__ = ["anomaly_map", "attention_cells", "attention_resolution", "output_mask", "token_weights"]


def attention_resolution(unet: Any, latent_size: int) -> int:
    """The cross-attention resolution closest to ``latent_size / 4`` (16 for SD 1.5 at 512 px; coarser on ties)."""
    sizes = cross_attention_resolutions(unet, latent_size)
    if not sizes:
        msg = "the UNet has no cross-attention layers"
        raise ValueError(msg)
    target = latent_size / 4
    return min(sizes, key=lambda s: (abs(math.log(s / target)), s))


def token_weights(tokenizer: Any, prompts: list[AnomalyPrompt], ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(weights, valid)``, float32 and bool ``[B, T]`` over the token axis of ``ids``.

    ``weights`` average the tokens of each prompt's defect words (their last occurrence); ``valid`` marks the
    prompt's own tokens (no start, end or padding token), over which the token softmax runs.

    Raises:
        ValueError: when the defect words are not among the prompt's tokens (e.g. truncated away).
    """
    weights = torch.zeros(ids.shape, dtype=torch.float32)
    valid = torch.zeros(ids.shape, dtype=torch.bool)
    eos = tokenizer.eos_token_id
    for row, prompt in enumerate(prompts):  # tokenisation is host-side string work, one row per prompt
        seq = ids[row].tolist()
        end = seq.index(eos, 1) if eos in seq[1:] else len(seq)
        valid[row, 1:end] = True
        word = tokenizer(" " + prompt.defect, add_special_tokens=False).input_ids
        starts = [s for s in range(1, end - len(word) + 1) if seq[s : s + len(word)] == word]
        if not word or not starts:
            msg = f"defect {prompt.defect!r} is not among the tokens of {prompt.anomaly_text!r} (truncated?)"
            raise ValueError(msg)
        weights[row, starts[-1] : starts[-1] + len(word)] = 1.0 / len(word)
    return weights, valid


def anomaly_map(
    maps: Tensor, weights: Tensor, valid: Tensor, token_scale: float, smoothing: tuple[int, float]
) -> Tensor:
    """``A_anomaly`` of Sec. 3.2 (the map ``L_att`` of Eq. 3-4 maximises): smoothed float32 ``[B, 1, r, r]`` attention of the defect words.

    Args:
        maps (Tensor): captured cross-attention ``[B, T, r, r]`` (head- and layer-averaged probabilities).
        weights (Tensor): ``[B, T]`` weights of the defect words' tokens (:func:`token_weights`).
        valid (Tensor): ``[B, T]`` tokens the softmax runs over.
        token_scale (float): logits multiplier before the token softmax (100 in the official code).
        smoothing (tuple[int, float]): Gaussian kernel size and sigma.
    """
    maps = maps.float()
    logits = (maps * token_scale).masked_fill(~valid.to(maps.device)[:, :, None, None], float("-inf"))
    probs = logits.softmax(dim=1)
    amap = (probs * weights.to(maps.device)[:, :, None, None]).sum(1, keepdim=True)
    k, sigma = smoothing
    return gaussian_blur2d(amap, (k, k), (sigma, sigma), border_type="reflect")


def attention_cells(amap: Tensor) -> Tensor:
    """``n_t`` (Eq. 5): cells of the max-normalised map at or above its mean, per sample (long ``[B]``)."""
    norm = amap / amap.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return (norm >= norm.mean(dim=(1, 2, 3), keepdim=True)).flatten(1).sum(1)


def output_mask(amap: Tensor, fg: Tensor, threshold: float | None = None) -> Tensor:
    """The anomaly mask (Sec. 3.4): the final map, max-normalised, upsampled to the input size and thresholded,
    inside the foreground, never empty (the map's peak inside the foreground at least).

    Args:
        amap (Tensor): final ``[B, 1, r, r]`` map.
        fg (Tensor): bool ``[B, 1, H, W]`` foreground at input size.
        threshold (float | None): threshold of the max-normalised map; ``None`` = its mean (the official rule).
    """
    norm = amap / amap.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    up = F.interpolate(norm, size=fg.shape[-2:], mode="bilinear", align_corners=False).to(fg.device)
    threshold = norm.mean(dim=(1, 2, 3), keepdim=True) if threshold is None else threshold
    threshold = torch.as_tensor(threshold, device=fg.device, dtype=up.dtype)
    best = up.masked_fill(~fg, float("-inf")).amax(dim=(1, 2, 3), keepdim=True)
    return (up >= torch.minimum(threshold, best)) & fg
