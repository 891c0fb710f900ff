"""Capture of cross-attention probabilities inside a diffusers UNet, with gradients flowing to the latent.

:func:`attach_attention_store` installs a :class:`StoreCrossAttnProcessor` on the cross-attention (``attn2``) layers
only, through ``unet.set_attn_processor``; self-attention keeps its own processor (SDPA). Layers whose query count is
``resolution**2`` compute the probabilities explicitly and add their head average to the store; the other
cross-attention layers run through SDPA. :meth:`AttentionStore.detach` puts the original processors back.

The maps are what AnomalyAny (arXiv 2406.01078, Sec. 3.2) and Attend-and-Excite aggregate: the average over heads
and layers of ``softmax(QK^T/sqrt(d))`` at one spatial resolution (16x16 for SD 1.5 at 512 px).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttentionStore", "StoreCrossAttnProcessor", "attach_attention_store", "cross_attention_resolutions"]


class AttentionStore:
    """Sum of head-averaged cross-attention probabilities at one resolution, over the layers of one UNet forward.

    Args:
        resolution (int): side of the captured maps (query count ``resolution**2``).
        cfg_batch (bool, optional): the UNet batch is ``[unconditional, conditional]`` (classifier-free guidance):
            keep only the conditional half. Set per forward by the caller. Defaults to ``False``.
    """

    def __init__(self, resolution: int, cfg_batch: bool = False) -> None:
        self.resolution = int(resolution)
        self.cfg_batch = cfg_batch
        self.enabled = True
        self._sum: Tensor | None = None
        self._layers = 0
        self._restore: dict[str, Any] | None = None
        self._unet: Any = None

    def reset(self) -> None:
        """Forget the maps of the previous forward (call before each UNet forward whose maps you want)."""
        self._sum, self._layers = None, 0

    def add(self, probabilities: Tensor, heads: int) -> None:
        """Add one layer's ``[batch*heads, queries, tokens]`` probabilities."""
        if not self.enabled:
            return
        probs = probabilities.reshape(-1, heads, *probabilities.shape[1:]).mean(1)  # [batch, queries, tokens]
        if self.cfg_batch:
            probs = probs[probs.shape[0] // 2 :]
        self._sum = probs if self._sum is None else self._sum + probs
        self._layers += 1

    @property
    def num_layers(self) -> int:
        """Layers captured since the last :meth:`reset`."""
        return self._layers

    def maps(self) -> Tensor:
        """The layer average as ``[batch, tokens, resolution, resolution]``; rows sum to 1 over tokens.

        Raises:
            RuntimeError: when no layer at ``resolution`` ran since the last :meth:`reset`.
        """
        if self._sum is None:
            msg = (
                f"no cross-attention map of {self.resolution}x{self.resolution} was captured: is the store attached "
                "and does the UNet have cross-attention at that resolution (see cross_attention_resolutions)?"
            )
            raise RuntimeError(msg)
        mean = self._sum / self._layers
        return mean.transpose(1, 2).reshape(mean.shape[0], -1, self.resolution, self.resolution)

    def detach(self) -> None:
        """Restore the processors the UNet had before :func:`attach_attention_store`."""
        if self._unet is not None and self._restore is not None:
            self._unet.set_attn_processor(self._restore)
        self._unet, self._restore = None, None


class StoreCrossAttnProcessor:
    """Cross-attention that records its probabilities in an :class:`AttentionStore` when at the store's resolution.

    Mirrors diffusers' ``AttnProcessor`` (explicit ``softmax(QK^T)``) for the captured layers, so that the maps are
    part of the autograd graph, and uses ``scaled_dot_product_attention`` for the rest.
    """

    def __init__(self, store: AttentionStore) -> None:
        self.store = store

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **_: Any,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, queries, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        if queries == self.store.resolution**2 and self.store.enabled:
            query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
            probs = attn.get_attention_scores(query, key, attention_mask)
            self.store.add(probs, attn.heads)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        else:
            head_dim = query.shape[-1] // attn.heads
            query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
            if attention_mask is not None:
                attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )
            hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attach_attention_store(unet: Any, store: AttentionStore) -> AttentionStore:
    """Install a :class:`StoreCrossAttnProcessor` on every ``attn2`` layer of ``unet``; other layers are untouched."""
    if store._unet is not None:
        msg = "this AttentionStore is already attached to a UNet; detach it first"
        raise RuntimeError(msg)
    current = dict(unet.attn_processors)
    processor = StoreCrossAttnProcessor(store)
    unet.set_attn_processor({name: processor if ".attn2." in name else proc for name, proc in current.items()})
    store._unet, store._restore = unet, current
    return store


def cross_attention_resolutions(unet: Any, latent_size: int) -> list[int]:
    """Sides of the cross-attention maps a ``UNet2DConditionModel`` computes for a square latent of ``latent_size``."""
    config = unet.config
    n = len(config.down_block_types)
    sizes = {latent_size // 2**i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind}
    sizes |= {latent_size // 2 ** (n - 1 - i) for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
    if config.mid_block_type and "CrossAttn" in str(config.mid_block_type):
        sizes.add(latent_size // 2 ** (n - 1))
    return sorted(s for s in sizes if s > 0)
