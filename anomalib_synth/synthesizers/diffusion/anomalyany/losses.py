"""The three guidance losses of AnomalyAny (arXiv 2406.01078), per sample, float32 ``[B]``.

- ``L_att = 1 - max(A_anomaly * m)`` (Sec. 3.2, Eq. 3-4): :func:`attention_loss`. Pulls the defect words'
  attention (:func:`~.anomaly_map.anomaly_map`) up somewhere inside the foreground ``m``. *Departure:* the paper's
  mask-weighted form; the official code drops the mask (``1 - max(A_anomaly)``).
- ``L_prompt = 1 - cos(E_anomaly, E_detailed)`` (Sec. 3.3, Eq. 6-7): :func:`prompt_loss`. Pulls the anomaly
  prompt's text embedding towards the detailed description's. *Departure:* ``E`` is the mean over each prompt's own
  tokens (:func:`token_mean`); the official cosine runs over the 77-token axis, padding included.
- ``L_img = 1 - cos(CLIP_text(detailed), CLIP_image(x))`` (Sec. 3.3, Eq. 6-7): :func:`image_loss`, on the decoded
  image ``x``. The official code uses CLIP's logit / 100, the same cosine.

How they are weighted and when they apply is the sampling loop's business (:mod:`.sampling`, :mod:`.schedule`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..latents import clip_pixels

__all__ = ["attention_loss", "clip_image_features", "clip_text_features", "image_loss", "prompt_loss", "token_mean"]


def attention_loss(amap: Tensor, foreground: Tensor) -> Tensor:
    """``L_att = 1 - max(A_anomaly * m)`` per sample, for ``[B, 1, r, r]`` map and foreground ``m`` (same size)."""
    return 1 - (amap * foreground).flatten(1).amax(1)


def token_mean(embeddings: Tensor, ids: Tensor, eos_token_id: int) -> Tensor:
    """``E``: mean over each prompt's own tokens (start token up to the end token, no padding), float32 ``[B, d]``."""
    positions = torch.arange(ids.shape[1])
    ends = torch.tensor(
        [row.index(eos_token_id, 1) + 1 if eos_token_id in row[1:] else len(row) for row in ids.tolist()]
    )
    keep = (positions[None] < ends[:, None]).to(embeddings.device, torch.float32).unsqueeze(-1)
    return (embeddings.float() * keep).sum(1) / keep.sum(1)


def prompt_loss(embeddings: Tensor, ids: Tensor, detailed_mean: Tensor, eos_token_id: int) -> Tensor:
    """``L_prompt = 1 - cos(E_anomaly, E_detailed)`` of anomaly-prompt ``embeddings`` ``[B, T, d]`` (tokens ``ids``)
    and the detailed prompts' :func:`token_mean` ``[B, d]``."""
    return 1 - F.cosine_similarity(token_mean(embeddings, ids, eos_token_id), detailed_mean, dim=-1)


def clip_image_features(clip: Any, images: Tensor) -> Tensor:
    """Unit CLIP image embeddings (float32 ``[B, d]``) of ``[B, 3, H, W]`` images in ``[0, 1]``."""
    pixels = clip_pixels(images, clip.config.vision_config.image_size, clip.dtype)
    out = clip.get_image_features(pixel_values=pixels)
    return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)


def clip_text_features(clip: Any, tokenizer: Any, texts: list[str]) -> Tensor:
    """Unit CLIP text embeddings (float32 ``[B, d]``) of ``texts``."""
    ids = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").input_ids
    out = clip.get_text_features(input_ids=ids.to(clip.device))
    return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)


def image_loss(clip: Any, images: Tensor, text_features: Tensor) -> Tensor:
    """``L_img = 1 - cos(CLIP_text, CLIP_image)`` of decoded ``images`` and unit ``text_features`` ``[B, d]``."""
    return 1 - (clip_image_features(clip, images) * text_features).sum(-1)
