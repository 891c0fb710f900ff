"""AnomalyControl's frozen-VLM side: CSM (Sec. 3.2) and ASEA (Sec. 3.3) of He et al., arXiv 2412.06510.

- :class:`CrossModalSemanticModeling` (CSM, Sec. 3.2): a frozen BLIP-2 (vision tower + Q-Former, transformers'
  ``Blip2ForImageTextRetrieval``) encodes the reference image (224 px for the real model) and its text in the
  Q-Former's multimodal mode; the query tokens are averaged to one vector (as the official code does).
- :class:`AnomalySemanticEnhancedAttention` (ASEA, Sec. 3.3): an attention guidance variable ``e_g``,
  zero-initialised and, as in the official code, added to the detached output of the frozen vision tower
  (``ln_vision(visual_encoder(image))``; transformers: ``vision_model(...).last_hidden_state``), optimised per
  sample (official: 5 Adam steps, lr 0.1) with ``(1 - sum(A M) / sum(A))^2``, ``A`` the Q-Former cross-attention
  (averaged over layers, heads and queries, without the CLS patch) and ``M`` the reference mask on the patch grid.
  Each step runs the Q-Former only: the vision tower (EVA ViT-g, about 1B parameters) runs once and gets no
  gradient. The features are those of the last optimisation forward, as the official code. This is test-time
  optimisation inside the frozen VLM, as the official code (the paper calls ``e_g`` trainable).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..latents import clip_pixels
from ..loading import load_pretrained, resolve_dtype

__all__ = ["BLIP2_ITM", "AnomalySemanticEnhancedAttention", "CrossModalSemanticModeling"]

BLIP2_ITM = "Salesforce/blip2-itm-vit-g"
"""BLIP-2 (EVA ViT-g + Q-Former) image-text model in transformers format: the default VLM of the CSM."""


class AnomalySemanticEnhancedAttention(nn.Module):
    """ASEA (Sec. 3.3): test-time optimisation of ``e_g`` so the Q-Former looks at the reference anomaly region.

    As in the official code, ``e_g`` is added to the *detached* output of the frozen vision tower,
    ``ln_vision(visual_encoder(image))`` (transformers: ``vision_model(...).last_hidden_state``, post-layernorm
    included), so each step runs the Q-Former only and no gradient reaches the vision tower.
    """

    def __init__(self, steps: int = 5, lr: float = 0.1) -> None:
        super().__init__()
        self.steps, self.lr = int(steps), float(lr)

    @staticmethod
    def loss(attention: Tensor, masks: Tensor) -> Tensor:
        """``(1 - sum(A M) / sum(A))^2`` per sample; ``attention`` and ``masks`` are ``[B, g, g]``."""
        inside = (attention * masks).flatten(1).sum(1) / attention.flatten(1).sum(1).clamp_min(1e-12)
        return (1 - inside) ** 2

    def optimise(self, csm: CrossModalSemanticModeling, image_embeds: Tensor, input_ids: Tensor,
                 attention_mask: Tensor, masks: Tensor) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
        """Optimise ``e_g`` on the vision features ``image_embeds`` (from :meth:`CrossModalSemanticModeling.vision`).

        Returns the reference features ``[B, d]`` and the attention fraction inside the mask at each step (``[B]``
        each). As the official code, the features are those of the last optimisation forward, i.e. after
        ``steps - 1`` updates of ``e_g`` (one step leaves them unchanged).
        """
        image_embeds = image_embeds.detach()
        e_g = torch.zeros(image_embeds.shape, device=image_embeds.device, dtype=torch.float32, requires_grad=True)
        optimizer = torch.optim.Adam([e_g], lr=self.lr)  # fp32 for Adam, as the official code
        features, fractions = None, []
        with torch.enable_grad():
            for _ in range(self.steps):
                features, attention = csm.encode(image_embeds, input_ids, attention_mask, e_g)
                grid = F.interpolate(masks.float(), size=attention.shape[-2:], mode="nearest")[:, 0]
                loss = self.loss(attention, grid)
                fractions.append(1 - loss.detach().sqrt())
                optimizer.zero_grad()
                loss.sum().backward()
                optimizer.step()
        if features is None:
            with torch.no_grad():
                features = csm.encode(image_embeds, input_ids, attention_mask)[0]
        return features.detach(), fractions


class CrossModalSemanticModeling(nn.Module):
    """CSM (Sec. 3.2): frozen BLIP-2 Q-Former features of a text-image reference, ``[B, d_qformer]``.

    Args:
        vlm (str | Path): a ``Blip2ForImageTextRetrieval`` checkpoint with its tokenizer. Defaults to
            ``Salesforce/blip2-itm-vit-g``.
        asea_steps (int), asea_lr (float): ASEA's test-time optimisation (0 steps disables it). Defaults 5, 0.1.

    The Q-Former's cross-attention is read from its ``cross_attentions`` output (``output_attentions=True``, eager
    attention), which transformers returns in every version that has ``Blip2ForImageTextRetrieval``.
    """

    def __init__(self, vlm: str | Path = BLIP2_ITM, asea_steps: int = 5, asea_lr: float = 0.1,
                 torch_dtype: str | torch.dtype | None = None, local_files_only: bool | None = None) -> None:  # fmt: skip
        super().__init__()
        from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

        self.vlm_name = str(vlm)
        self.vlm = load_pretrained(Blip2ForImageTextRetrieval, vlm, "AnomalyControl: BLIP-2 (CSM)", local_files_only,
                                   dtype=resolve_dtype(torch_dtype), attn_implementation="eager")  # fmt: skip
        self.tokenizer = load_pretrained(AutoTokenizer, vlm, "AnomalyControl: BLIP-2 tokenizer", local_files_only)
        self.vlm.requires_grad_(False).eval()
        self.asea = AnomalySemanticEnhancedAttention(asea_steps, asea_lr)

    @property
    def dim(self) -> int:
        return self.vlm.config.qformer_config.hidden_size

    def pixels(self, images: Tensor) -> Tensor:
        size = self.vlm.config.vision_config.image_size
        return clip_pixels(images.to(self.vlm.device), size, self.vlm.dtype)

    def tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return out.input_ids.to(self.vlm.device), out.attention_mask.to(self.vlm.device)

    @torch.no_grad()
    def vision(self, pixels: Tensor) -> Tensor:
        """``ln_vision(visual_encoder(image))``: the frozen vision tower's output ``[B, 1 + patches, d]``, detached."""
        return self.vlm.vision_model(pixel_values=pixels).last_hidden_state.detach()

    def encode(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor,
               e_g: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Q-Former in multimodal mode on the vision features (plus ``e_g``): averaged query features ``[B, d]`` and
        the cross-attention on the patch grid ``[B, g, g]`` (averaged over layers, heads and queries; CLS dropped)."""
        qformer_dtype = next(self.vlm.qformer.parameters()).dtype
        hidden = image_embeds.float() if e_g is None else image_embeds.float() + e_g
        hidden = hidden.to(qformer_dtype)
        b = hidden.shape[0]
        queries = self.vlm.query_tokens.expand(b, -1, -1)
        n_query = queries.shape[1]
        embeds = self.vlm.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones(b, n_query, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], 1)  # fmt: skip
        out = self.vlm.qformer(query_embeds=embeds, query_length=n_query, attention_mask=mask,
                               encoder_hidden_states=hidden,
                               encoder_attention_mask=torch.ones(hidden.shape[:2], dtype=torch.long,
                                                                 device=hidden.device),
                               output_attentions=True, return_dict=True)  # fmt: skip
        maps = [a for a in (out.cross_attentions or ()) if torch.is_tensor(a)]
        if not maps:
            msg = ("the Q-Former returned no cross-attention maps (output_attentions=True); load BLIP-2 with "
                   "attn_implementation='eager' and a transformers version this package supports")  # fmt: skip
            raise RuntimeError(msg)
        features = out.last_hidden_state[:, :n_query].mean(1)
        attention = torch.stack(maps).mean(0).mean(1)  # layers, heads -> [B, queries, 1 + patches]
        attention = attention[:, :n_query].mean(1)[:, 1:]  # queries; drop the CLS patch
        side = int(attention.shape[-1] ** 0.5)
        return features.float(), attention.float().reshape(b, side, side)

    def forward(self, images: Tensor, texts: list[str], masks: Tensor | None = None) -> Tensor:
        """Reference features ``[B, d]``; with ``masks`` (and ASEA steps > 0), ``e_g`` is optimised first.

        The vision tower runs once, without gradient; ASEA's steps run the Q-Former only.
        """
        image_embeds = self.vision(self.pixels(images))
        input_ids, attention_mask = self.tokens(texts)
        if masks is not None and self.asea.steps > 0:
            return self.asea.optimise(self, image_embeds, input_ids, attention_mask, masks.to(image_embeds.device))[0]
        with torch.no_grad():
            return self.encode(image_embeds, input_ids, attention_mask)[0]
