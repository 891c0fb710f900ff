"""AnomalyXFusion's trained components (Hu et al., arXiv 2404.19444): MIF (Sec. 4.2), DDF (Sec. 4.3), the adapter.

:class:`XFusionAdapter` is a diffusers ``ModelMixin`` + ``ConfigMixin``: ``save_pretrained`` / ``from_pretrained``
are diffusers' own (``config.json`` + ``diffusion_pytorch_model.safetensors``). Its config also records what the
weights need but do not hold: the base models (by id or path, never copied), the LoRA rank (the LoRA itself lives in
the UNet, see :mod:`.lora`) and the training images (``training_data``, read by the leakage check).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import Tensor, nn

from ..loading import CLIP_VIT_L14, SD15, ModelNotFoundError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DynamicDifFusion",
    "MaskEncoder",
    "MultiModalInFusion",
    "XFusionAdapter",
]

ADAPTER_CONFIG = CONFIG_NAME
"""The adapter's config file, diffusers' ``config.json`` (``adapter_config.json`` before the diffusers format)."""
ADAPTER_WEIGHTS = SAFETENSORS_WEIGHTS_NAME
"""The adapter's weights, diffusers' ``diffusion_pytorch_model.safetensors`` (formerly ``adapter.safetensors``)."""


class MaskEncoder(nn.Module):
    """A small convolutional mask encoder.

    *Departure* (Sec. 4.2): the paper uses a pre-trained ISTR mask encoder, which is not available; this one is
    trained with the rest of the adapter.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), size: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, width), width),
                nn.SiLU(),
            ]
            previous = width
        self.layers, self.size = nn.Sequential(*layers), size
        self.out_channels = previous

    def forward(self, masks: Tensor) -> Tensor:
        x = F.interpolate(masks.float(), size=(self.size, self.size), mode="area")
        return F.adaptive_avg_pool2d(self.layers(x), 4)  # [B, C, 4, 4]


class MultiModalInFusion(nn.Module):
    """MIF (Sec. 4.2, Eq. 1-5): semantic, location and textural embeddings fused into the X-embedding ``[B, 3k, d]``.

    Args:
        dim (int): token width ``d`` (the UNet's ``cross_attention_dim``).
        num_tokens (int): tokens per modality ``k``. Defaults to ``4``.
        text_dim (int): width of the pooled caption embedding. Defaults to ``dim``.
        image_dim (int): width of the CLIP image embedding. Defaults to ``dim``.
        heads (int): heads of the aggregator's self-attention. Defaults to the largest of 8, 4, 2, 1 dividing ``dim``.
        mask_channels (tuple[int, ...]): widths of the mask encoder. Defaults to ``(16, 32, 64)``.

    The paper does not report layer sizes (the partial public code has none either): the widths here are ours.
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int = 4,
        text_dim: int | None = None,
        image_dim: int | None = None,
        heads: int | None = None,
        mask_channels: tuple[int, ...] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.dim, self.num_tokens = dim, num_tokens
        text_dim, image_dim = text_dim or dim, image_dim or dim
        self.semantic_proj = nn.Identity() if text_dim == dim else nn.Linear(text_dim, dim)
        self.mask_encoder = MaskEncoder(tuple(mask_channels))
        self.location_head = nn.Conv2d(self.mask_encoder.out_channels, num_tokens * dim, kernel_size=4)  # one layer
        self.texture_proj = nn.Linear(image_dim, num_tokens * dim)
        heads = heads or next(h for h in (8, 4, 2, 1) if dim % h == 0)
        self.attention_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def semantic(self, text_features: Tensor) -> Tensor:
        """Eq. 1: replicated, L2-normalised caption embedding ``[B, k, d]``."""
        tokens = self.semantic_proj(text_features).unsqueeze(1).expand(-1, self.num_tokens, -1)
        return F.normalize(tokens, dim=-1)

    def location(self, masks: Tensor) -> Tensor:
        """Eq. 2: mask encoder + one-layer CNN, ``[B, k, d]``."""
        return self.location_head(self.mask_encoder(masks)).view(-1, self.num_tokens, self.dim)

    def texture(self, image_features: Tensor) -> Tensor:
        """Eq. 3: projected CLIP embedding of ``image * mask``, ``[B, k, d]``."""
        return self.texture_proj(image_features).view(-1, self.num_tokens, self.dim)

    def forward(self, text_features: Tensor, masks: Tensor, image_features: Tensor) -> Tensor:
        x = torch.cat([self.semantic(text_features), self.location(masks), self.texture(image_features)], 1)  # Eq. 4
        h = self.attention_norm(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]  # Eq. 5
        return x + self.mlp(self.mlp_norm(x))


class DynamicDifFusion(nn.Module):
    """DDF (Sec. 4.3, Eq. 14): ``e_t = e_X + MLP([e_X ; emb(t)])``, the X-embedding adapted to the timestep.

    The paper writes ``e_t = f_phi(e_X, t)`` without the form of ``f_phi``; ours is an MLP on the sinusoidal timestep
    embedding concatenated with ``e_X``, residual so that it starts close to ``e_X``. The partial public code omits
    DDF.
    """

    def __init__(self, dim: int, time_dim: int | None = None, hidden: int | None = None) -> None:
        super().__init__()
        self.time_dim = time_dim or dim
        hidden = hidden or 2 * dim
        self.mlp = nn.Sequential(nn.Linear(dim + self.time_dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_embedding: Tensor, timesteps: Tensor) -> Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        t = torch.as_tensor(timesteps, device=x_embedding.device).reshape(-1).expand(x_embedding.shape[0])
        emb = get_timestep_embedding(t, self.time_dim).to(x_embedding.dtype)
        emb = emb.unsqueeze(1).expand(-1, x_embedding.shape[1], -1)
        return x_embedding + self.mlp(torch.cat([x_embedding, emb], -1))


SETTINGS = ("dim", "num_tokens", "text_dim", "image_dim", "base_model", "clip_model", "lora_rank")
"""The config entries that define the architecture and its base models (all but ``training_data``)."""


class XFusionAdapter(ModelMixin, ConfigMixin):
    """The trained part of AnomalyXFusion: MIF + DDF, a diffusers model (``save_pretrained`` / ``from_pretrained``).

    Args:
        dim (int): token width ``d`` (the UNet's ``cross_attention_dim``).
        num_tokens (int): tokens per modality ``k``. Defaults to ``4``.
        text_dim (int | None): width of the pooled caption embedding. Defaults to ``dim``.
        image_dim (int | None): width of the CLIP image embedding. Defaults to ``dim``.
        base_model (str): the Stable Diffusion it was trained with (Hub id or folder). Defaults to SD 1.5.
        clip_model (str): the CLIP image encoder it was trained with. Defaults to ViT-L/14.
        lora_rank (int): rank of the LoRA trained on the UNet's cross-attention (0 = none). The LoRA weights are
            saved next to the adapter in diffusers' LoRA format (:mod:`.lora`).
        training_data (dict | None): the training images (:func:`~anomalib_synth.training.leakage.training_data`),
            for the evaluation's leakage check; set after training through :attr:`training_data`.
    """

    config_name = CONFIG_NAME

    @register_to_config
    def __init__(self, dim: int, num_tokens: int = 4, text_dim: int | None = None, image_dim: int | None = None,
                 base_model: str = SD15, clip_model: str = CLIP_VIT_L14, lora_rank: int = 0,
                 training_data: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.mif = MultiModalInFusion(dim, num_tokens, text_dim, image_dim)
        self.ddf = DynamicDifFusion(dim)

    @property
    def settings(self) -> dict[str, Any]:
        """The architecture and base models of the config (everything but ``training_data``)."""
        return {name: self.config[name] for name in SETTINGS}

    @property
    def training_data(self) -> dict[str, Any] | None:
        """The training images recorded in the config (``None`` when unknown)."""
        return self.config.get("training_data")

    @training_data.setter
    def training_data(self, value: dict[str, Any] | None) -> None:
        self.register_to_config(training_data=value)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Path:
        """diffusers' ``save_pretrained``; returns the folder. The earlier call ``save_pretrained(folder,
        lora_state)`` still works, with a ``DeprecationWarning``: the LoRA state is written as diffusers' LoRA file
        beside the adapter (prefer :meth:`XFusionModel.save_adapter`, which saves both)."""
        old_call = bool(args) and (isinstance(args[0], dict) or args[0] is None)
        lora = args[0] if old_call else kwargs.pop("lora_state", None)
        if old_call or lora is not None:
            import warnings

            warnings.warn("XFusionAdapter.save_pretrained(folder, lora_state) is deprecated: use "
                          "XFusionModel.save_adapter(folder)", DeprecationWarning, stacklevel=2)  # fmt: skip
            args = args[1:] if old_call else args
        super().save_pretrained(save_directory, *args, **kwargs)
        if lora:
            from .lora import save_lora

            save_lora(None, save_directory, state=lora)
        return Path(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> XFusionAdapter:
        """diffusers' ``from_pretrained`` on an adapter folder (from ``save_pretrained`` or ``train xfusion``).

        A folder in the format before diffusers (``adapter_config.json`` + ``adapter.safetensors``) still loads,
        with a ``DeprecationWarning`` (:mod:`.legacy`).

        Raises:
            ModelNotFoundError: when the folder does not exist or holds no adapter.
        """
        from .legacy import is_legacy_folder, load_legacy_adapter

        folder = Path(pretrained_model_name_or_path).expanduser()
        missing = (f"AnomalyXFusion adapter: {str(folder)!r} has no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}; train one "
                   "with `anomalib-synth train xfusion ... --output DIR` and pass DIR/adapter")  # fmt: skip
        if (folder / ADAPTER_CONFIG).is_file():
            class_name = json.loads((folder / ADAPTER_CONFIG).read_text()).get("_class_name")
            if class_name != cls.__name__:
                msg = f"AnomalyXFusion adapter: {str(folder)!r} holds a {class_name or 'non-diffusers'} config"
                raise ModelNotFoundError(msg)
            try:
                return super().from_pretrained(folder, **kwargs)
            except OSError as error:  # the weights file is missing (diffusers raises EnvironmentError)
                raise ModelNotFoundError(f"{missing}. Cause: {str(error).splitlines()[0]}") from error
        if is_legacy_folder(folder):
            return load_legacy_adapter(cls, folder)
        raise ModelNotFoundError(missing)
