"""AnomalyXFusion: multi-modal anomaly synthesis with diffusion (Hu et al., arXiv 2404.19444).

No complete official code exists (the public repository has the MVTec-Caption scripts and a partial LDM
embedding manager), so this is our implementation of the paper, on Stable Diffusion 1.5.

- :class:`MultiModalInFusion` (MIF, Sec. 4.2) fuses three embeddings of ``k`` tokens of width ``d`` (the UNet's
  cross-attention width) into the X-embedding:

  - semantic (Eq. 1): the pooled frozen CLIP text embedding of the caption, replicated ``k`` times and
    L2-normalised;
  - location (Eq. 2): a mask encoder followed by a one-layer CNN. *Departure:* the paper uses a pre-trained ISTR mask
    encoder, which is not available; ours is a small convolutional encoder trained with the rest;
  - textural (Eq. 3): the frozen CLIP image encoder on ``image * mask``, projected to ``k x d``;
  - concatenation (Eq. 4), then self-attention + MLP with residuals (Eq. 5).

- :class:`DynamicDifFusion` (DDF, Sec. 4.3, Eq. 14): ``e_t = f_phi(e_X, t)``, an MLP on the sinusoidal timestep
  embedding concatenated with ``e_X`` (residual), applied at every denoising step. The partial public code omits it.
- Conditioning: ``[caption tokens ; e_t]`` goes to the UNet's cross-attention. *Departure:* the paper's code base is
  the older LDM (``txt2img-f8-large``, BERT context); we use SD 1.5, frozen, with optional LoRA on the
  cross-attention projections (peft).
- Blended training and sampling (Eq. 16): inside the mask the model denoises; outside it the noised original
  ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` is kept. The loss (Eq. 17) is the noise-prediction error in the
  **L2** norm (the simplified DDPM objective SD was trained with; L1 would change the frozen UNet's optimum),
  weighted ``1`` inside the (latent) mask and ``background_weight`` (0.1) outside, because outside the mask the
  sampler discards the prediction anyway.
- Latent mask and label: the latent mask is the set of latent cells that hold any mask pixel (an adaptive max-pool,
  :func:`covering_latent_mask`), in training and in sampling, so that no mask pixel is left out of the regenerated
  region. The synthesizer's output mask is exactly the regenerated region (those cells mapped back to the pixel
  grid, :func:`regenerated_pixels`), and the composite pastes generated pixels there only: every pixel the label
  claims was regenerated, and every regenerated pixel is labelled.
- Texture at inference: as in training (Eq. 3), the CLIP embedding of a real defect image times *its own* defect
  mask (``references``; by default the adapter's training images, whose paths its config records), while the
  location embedding takes the target mask.
- Guidance: classifier-free guidance with scale 5 by default, the value of the LDM/AnomalyDiffusion sampler the
  paper builds on (the paper does not state its own); the unconditional branch is the empty caption in the caption
  tokens and in ``e_X`` (mask and texture kept), which is what training's caption dropout (10 %) prepares for.
- Leakage: the adapter config records the training images (``training_data``); ``anomalib-synth train xfusion``
  can exclude categories, images or a split file, and the evaluation harness refuses a synthesizer that has seen
  its test images (:mod:`anomalib_synth.training.leakage`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import Params, SynthesisResult
from ..registry import register
from .common import DiffusionSynthesizer, composite, restartable_scheduler, to_model_size
from .latents import (
    clip_pixels,
    decode,
    encode,
    generators_for,
    noise_like,
    noise_to_timestep,
    training_noise,
    vae_scale_factor,
)
from .loading import CLIP_VIT_L14, SD15, ModelNotFoundError, load_pretrained, resolve_dtype

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_GUIDANCE",
    "DynamicDifFusion",
    "MaskEncoder",
    "MultiModalInFusion",
    "XFusionAdapter",
    "XFusionModel",
    "XFusionSynthesizer",
    "covering_latent_mask",
    "regenerated_pixels",
]

ADAPTER_WEIGHTS = "adapter.safetensors"
LORA_WEIGHTS = "lora.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DEFAULT_GUIDANCE = 5.0
"""Classifier-free guidance scale: LDM / AnomalyDiffusion's sampler (``scale 5.0``), the code base of the paper."""


def covering_latent_mask(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, 1, h, w]`` float mask of the latent cells that hold any pixel of ``masks`` (adaptive max-pool).

    Nearest downsampling would drop mask pixels that are not at a cell's sampling point, so that the label could
    claim pixels that were never regenerated; the max-pool keeps every cell a mask pixel touches.
    """
    return F.adaptive_max_pool2d(masks.float(), tuple(size))


def regenerated_pixels(cells: Tensor, size: tuple[int, int]) -> Tensor:
    """The latent ``cells`` (from :func:`covering_latent_mask`) on a pixel grid of ``size``, as bool ``[B, 1, H, W]``.

    Pixel ``y`` belongs to cell ``floor(y * h / H)`` (nearest), which is always one of the cells whose max-pool
    window holds ``y``: every pixel of the mask is inside the returned region.
    """
    return F.interpolate(cells.float(), size=tuple(size), mode="nearest") > 0.5


class MaskEncoder(nn.Module):
    """A small convolutional mask encoder (stands in for the paper's pre-trained ISTR encoder, Sec. 4.2)."""

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
    """DDF (Sec. 4.3, Eq. 14): ``e_t = e_X + MLP([e_X ; emb(t)])``, the X-embedding adapted to the timestep."""

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


class XFusionAdapter(nn.Module):
    """The trained part: MIF + DDF, saved as ``adapter.safetensors`` + ``adapter_config.json`` (+ ``lora.safetensors``).

    The base models are referenced by id or path in the config, never copied.
    """

    def __init__(self, dim: int, num_tokens: int = 4, text_dim: int | None = None, image_dim: int | None = None,
                 base_model: str = SD15, clip_model: str = CLIP_VIT_L14, lora_rank: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.settings = {"dim": dim, "num_tokens": num_tokens, "text_dim": text_dim, "image_dim": image_dim,
                         "base_model": str(base_model), "clip_model": str(clip_model), "lora_rank": int(lora_rank)}  # fmt: skip
        self.mif = MultiModalInFusion(dim, num_tokens, text_dim, image_dim)
        self.ddf = DynamicDifFusion(dim)
        self.training_data: dict[str, Any] | None = None
        """The training images (``anomalib_synth.training.leakage.training_data``), recorded in the config."""

    def save_pretrained(self, folder: str | Path, lora_state: dict[str, Tensor] | None = None) -> Path:
        """Write the adapter (atomically, file by file) and return the folder."""
        from ...io import write_safetensors, write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / ADAPTER_WEIGHTS, self.state_dict())
        if lora_state:
            write_safetensors(folder / LORA_WEIGHTS, lora_state)
        config = {"type": "xfusion", **self.settings}
        if self.training_data is not None:
            config["training_data"] = self.training_data
        write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> tuple[XFusionAdapter, dict[str, Tensor] | None]:
        """Load an adapter folder; returns the adapter and the LoRA state (``None`` without LoRA).

        Raises:
            ModelNotFoundError: when the folder or its files are missing.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
            msg = (f"AnomalyXFusion adapter: {str(folder)!r} has no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}; train one "
                   "with `anomalib-synth train xfusion ... --output DIR` and pass DIR/adapter")  # fmt: skip
            raise ModelNotFoundError(msg)
        settings = json.loads((folder / ADAPTER_CONFIG).read_text())
        settings.pop("type", None)
        training_data = settings.pop("training_data", None)
        adapter = cls(**settings)
        adapter.training_data = training_data
        adapter.load_state_dict(load_file(str(folder / ADAPTER_WEIGHTS)))
        lora = load_file(str(folder / LORA_WEIGHTS)) if (folder / LORA_WEIGHTS).is_file() else None
        return adapter, lora


LORA_TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


class XFusionModel(nn.Module):
    """The torch core of AnomalyXFusion: frozen SD 1.5 + CLIP image encoder, a trainable :class:`XFusionAdapter`.

    Args:
        base_model (str | Path): Stable Diffusion pipeline (Hub id or folder). Defaults to SD 1.5.
        clip_model (str | Path): CLIP with a vision tower, for the textural embedding. Defaults to ViT-L/14.
        adapter (XFusionAdapter | str | Path | None): a trained adapter (or its folder); ``None`` builds a new one.
        num_tokens (int): ``k`` for a new adapter. Defaults to ``4``.
        lora_rank (int): LoRA rank on the cross-attention projections for a new adapter (0 = none, needs peft).
        background_weight (float): loss weight outside the mask (Eq. 17). Defaults to ``0.1``.
        caption_dropout (float): probability of training on the empty caption (for guidance). Defaults to ``0.1``.
        torch_dtype, local_files_only: as in the other diffusion synthesizers.
    """

    def __init__(
        self,
        base_model: str | Path | None = None,
        clip_model: str | Path | None = None,
        adapter: XFusionAdapter | str | Path | None = None,
        num_tokens: int = 4,
        lora_rank: int = 0,
        background_weight: float = 0.1,
        caption_dropout: float = 0.1,
        torch_dtype: str | torch.dtype | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        super().__init__()
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPVisionModelWithProjection

        lora_state = None
        if isinstance(adapter, (str, Path)):
            adapter, lora_state = XFusionAdapter.from_pretrained(adapter)
        settings = adapter.settings if adapter is not None else {}
        self.base_model = str(base_model or settings.get("base_model", SD15))
        self.clip_model = str(clip_model or settings.get("clip_model", CLIP_VIT_L14))
        dtype = resolve_dtype(torch_dtype)
        pipe = load_pretrained(StableDiffusionPipeline, self.base_model, "AnomalyXFusion: Stable Diffusion",
                               local_files_only, dtype=dtype, safety_checker=None, requires_safety_checker=False)  # fmt: skip
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.tokenizer, self.scheduler_config, self._scheduler_cls = (
            pipe.tokenizer,
            pipe.scheduler.config,
            type(pipe.scheduler),
        )
        self.image_encoder = load_pretrained(CLIPVisionModelWithProjection, self.clip_model,
                                             "AnomalyXFusion: CLIP image encoder", local_files_only, dtype=dtype)  # fmt: skip
        for module in (self.unet, self.vae, self.text_encoder, self.image_encoder):
            module.requires_grad_(False).eval()
        if adapter is None:
            adapter = XFusionAdapter(self.unet.config.cross_attention_dim, num_tokens,
                                     self.text_encoder.config.hidden_size, self.image_encoder.config.projection_dim,
                                     self.base_model, self.clip_model, lora_rank)  # fmt: skip
        self.adapter = adapter
        self.lora_rank = adapter.settings["lora_rank"]
        if self.lora_rank:
            self._add_lora(self.lora_rank, lora_state)
        self.background_weight, self.caption_dropout = background_weight, caption_dropout

    def _add_lora(self, rank: int, state: dict[str, Tensor] | None) -> None:
        try:
            from peft import LoraConfig
            from peft.utils import set_peft_model_state_dict
        except ImportError as error:
            msg = "LoRA needs peft: pip install peft (or use lora_rank=0)"
            raise ImportError(msg) from error
        self.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian")
        )
        if state is not None:
            set_peft_model_state_dict(self.unet, state)

    def lora_state(self) -> dict[str, Tensor] | None:
        if not self.lora_rank:
            return None
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_adapter(self, folder: str | Path) -> Path:
        return self.adapter.save_pretrained(folder, self.lora_state())

    # -- embeddings -----------------------------------------------------------------------------------------------

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Caption tokens ``[B, L, d]`` and the pooled embedding ``[B, text_dim]`` (frozen CLIP text encoder)."""
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.text_encoder.device)  # fmt: skip
        with torch.no_grad():
            out = self.text_encoder(ids)
        return out.last_hidden_state, out.pooler_output

    def encode_texture(self, images: Tensor, masks: Tensor) -> Tensor:
        """Frozen CLIP image embedding of ``image * mask`` (Eq. 3's input)."""
        pixels = clip_pixels(
            images.float() * masks.float(), self.image_encoder.config.image_size, self.image_encoder.dtype
        )
        with torch.no_grad():
            return self.image_encoder(pixel_values=pixels).image_embeds.float()

    def x_embedding(self, pooled: Tensor, masks: Tensor, texture: Tensor) -> Tensor:
        return self.adapter.mif(pooled.float(), masks, texture)

    def condition(self, tokens: Tensor, x_embedding: Tensor, timesteps: Tensor) -> Tensor:
        """``[caption tokens ; DDF(e_X, t)]``: the cross-attention context at timestep ``t``."""
        return torch.cat([tokens.float(), self.adapter.ddf(x_embedding, timesteps)], 1).to(self.unet.dtype)

    # -- training -------------------------------------------------------------------------------------------------

    def training_loss(self, images: Tensor, masks: Tensor, captions: list[str], generator: torch.Generator | None = None,
                      timesteps: Tensor | None = None, noise: Tensor | None = None) -> Tensor:  # fmt: skip
        """Eq. 17 on a batch of (anomalous image, mask, caption); ``timesteps``/``noise`` may be fixed for tests."""
        device = self.unet.device
        images, masks = images.to(device), masks.to(device)
        b = images.shape[0]
        scheduler = self._scheduler_cls.from_config(self.scheduler_config)
        with torch.no_grad():
            z0 = encode(self.vae, images).float()
        timesteps, noise = training_noise(scheduler, z0, generator, timesteps, noise)
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(b, generator=generator) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        tokens, pooled = self.encode_text(captions)
        x_embedding = self.x_embedding(pooled, masks, self.encode_texture(images, masks))
        zt = noise_to_timestep(scheduler, z0, timesteps, noise)
        eps = self.unet(
            zt.to(self.unet.dtype), timesteps, encoder_hidden_states=self.condition(tokens, x_embedding, timesteps)
        ).sample
        m = covering_latent_mask(masks, z0.shape[-2:])  # the cells sampling regenerates
        weight = m + self.background_weight * (1 - m)
        return (weight * (eps.float() - noise) ** 2).sum() / (weight.sum() * z0.shape[1])

    # -- sampling -------------------------------------------------------------------------------------------------

    def regenerated_cells(self, masks: Tensor) -> Tensor:
        """The latent cells that :meth:`sample` regenerates for model-size pixel ``masks``, ``[B, 1, h, w]``."""
        factor = vae_scale_factor(self.vae)
        return covering_latent_mask(masks, (masks.shape[-2] // factor, masks.shape[-1] // factor))

    @torch.no_grad()
    def sample(self, images: Tensor, masks: Tensor, captions: list[str], seeds: Tensor,
               references: Tensor | None = None, reference_masks: Tensor | None = None,
               num_inference_steps: int = 50, strength: float = 1.0, guidance_scale: float = DEFAULT_GUIDANCE,
               progress: bool = False, textures: Tensor | None = None) -> Tensor:  # fmt: skip
        """Eq. 16 sampling at model size: denoise the latent cells of ``masks``, keep the noised input elsewhere.

        ``images``/``masks`` are model-size ``[B,3,S,S]``/``[B,1,S,S]``; the regenerated cells are
        :meth:`regenerated_cells` of ``masks`` (``masks`` themselves drive the location embedding). The textural embedding is,
        as in training, the CLIP embedding of a defect image times its own defect mask: ``textures`` (``[B, D]``
        from :meth:`encode_texture`), else ``references * reference_masks``, else ``images * masks`` (only
        meaningful when ``images`` are themselves anomalous: on normal images, give references). Returns decoded
        images in [0, 1].
        """
        from tqdm.auto import tqdm

        device = self.unet.device
        images, masks = images.to(device), masks.to(device)
        gens = generators_for(seeds)
        z0 = encode(self.vae, images, gens).float()
        m = covering_latent_mask(masks, z0.shape[-2:])
        tokens, pooled = self.encode_text(captions)
        if textures is not None:
            texture = textures.to(device).float()
        elif references is not None:
            if reference_masks is None:
                msg = "references need their defect masks: the texture is reference * mask, as in training (Eq. 3)"
                raise ValueError(msg)
            texture = self.encode_texture(references.to(device), reference_masks.to(device))
        else:
            texture = self.encode_texture(images, masks)
        x_embedding = self.x_embedding(pooled, masks, texture)
        if guidance_scale != 1.0:  # the unconditional branch as trained: the empty caption in tokens and in e_X
            empty_tokens, empty_pooled = self.encode_text([""] * len(captions))
            empty_x_embedding = self.x_embedding(empty_pooled, masks, texture)
        # the latent is blended with the re-noised input between steps: a stateful scheduler (SD 1.5's PNDM) would drop it
        scheduler = restartable_scheduler(self.scheduler_config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        start = min(int(num_inference_steps * strength), num_inference_steps)
        timesteps = scheduler.timesteps[num_inference_steps - start :]
        noise = noise_like(z0, gens)
        z = noise_to_timestep(scheduler, z0, timesteps[0], noise)
        if start == num_inference_steps:  # strength 1: the masked region starts from pure noise
            z = m * noise * scheduler.init_noise_sigma + (1 - m) * z
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="xfusion", leave=False)):
            context = self.condition(tokens, x_embedding, t)
            eps = self.unet(z.to(self.unet.dtype), t, encoder_hidden_states=context).sample.float()
            if guidance_scale != 1.0:
                uncond = self.condition(empty_tokens, empty_x_embedding, t)
                eps_u = self.unet(z.to(self.unet.dtype), t, encoder_hidden_states=uncond).sample.float()
                eps = eps_u + guidance_scale * (eps - eps_u)
            z = scheduler.step(eps, t, z).prev_sample.float()
            known = (
                noise_to_timestep(scheduler, z0, timesteps[i + 1], noise_like(z0, gens))
                if i + 1 < len(timesteps)
                else z0
            )
            z = m * z + (1 - m) * known  # Eq. 16
        return decode(self.vae, z)


def _reference_entries(references: str | Path | None, adapter: XFusionAdapter, category: str | None) -> list[dict]:
    """``[{"image", "masks"}]`` references: from ``references`` (see ``load_references``), else the adapter's training
    images (those of ``category`` when it has some). Every reference needs its defect mask."""
    from .common import load_references

    if references is not None:
        entries = [{"image": e["image"], "masks": [e["mask"]] if e["mask"] else []}
                   for e in load_references(references)]  # fmt: skip
        missing = [e["image"] for e in entries if not e["masks"]]
        if missing:
            msg = (f"AnomalyXFusion embeds a reference defect times its own mask, as in training (Eq. 3); no mask for "
                   f"{missing[:3]} (give <stem>_mask.png next to <stem>.png, or 'mask' in the JSON list)")  # fmt: skip
            raise ValueError(msg)
        return entries
    images = (adapter.training_data or {}).get("images", [])
    if category is not None and any(e["category"] == Path(category).name for e in images):
        images = [e for e in images if e["category"] == Path(category).name]
    entries = [{"image": e["image"], "masks": list(e["masks"])} for e in images]
    if not entries or not all(Path(p).is_file() for e in entries for p in [e["image"], *e["masks"]]):
        msg = ("XFusionSynthesizer needs references=PATH (defect images with their masks, see load_references): "
               + ("the adapter's training images are not on this machine" if entries
                  else "the adapter's config records no training images"))  # fmt: skip
        raise ValueError(msg)
    return entries


@register("xfusion")
class XFusionSynthesizer(DiffusionSynthesizer):
    """AnomalyXFusion inference (arXiv 2404.19444): a normal image, a mask, a caption -> an anomalous image.

    Args:
        adapter (str | Path): folder of a trained adapter (``anomalib-synth train xfusion``).
        base_model (str | Path | None): Stable Diffusion; defaults to the one in the adapter's config.
        clip_model (str | Path | None): CLIP image encoder; defaults to the one in the adapter's config.
        references (str | Path | None): defect images with their masks for the textural embedding, one drawn per
            sample: a folder (``<stem>_mask.png`` next to ``<stem>.png``) or a JSON list (see
            :func:`~anomalib_synth.synthesizers.diffusion.common.load_references`). As in training (Eq. 3), the
            CLIP embedding of ``reference * its mask`` is used. ``None`` takes the adapter's training images (those
            of ``category`` if it has some), whose paths its config records. Defaults to ``None``.
        num_inference_steps (int): Defaults to ``50``.
        strength (float): 1 starts the masked region from pure noise. Defaults to ``1.0``.
        guidance_scale (float): classifier-free guidance on the caption (training drops it 10 % of the time); 5 as
            the LDM / AnomalyDiffusion sampler the paper builds on, 1 turns guidance off. Defaults to ``5.0``.
        reference_dir (str | Path | None): alias of ``references`` (a folder).
        model (str | Path | None): alias of ``adapter`` (so ``--model-path`` works on the command line).
        **kwargs: prompt, mask and resolution options of
            :class:`~anomalib_synth.synthesizers.diffusion.common.DiffusionSynthesizer`; the caption is the
            prompt's description (or an MVTec-Caption sentence with ``captions=``).

    The output mask is the regenerated region: the latent cells (8x8 pixels at SD 1.5's resolution) that hold any
    pixel of the drawn mask, mapped back to the image, so it covers the drawn mask and may exceed it by up to a cell.
    Outside it, pixels are the input's own. :attr:`source_images` lists the images the synthesizer has seen (the
    adapter's training images and the references), for the evaluation's leakage check.
    """

    description = "AnomalyXFusion: text + mask + texture X-embedding with timestep-adaptive fusion (trained adapter)"
    cost = (
        "`2 x num_inference_steps x strength` UNet evaluations per image (classifier-free guidance, on by "
        "default; half that with `guidance_scale=1`), plus one CLIP image pass per reference (cached per synthesizer). "
        "Training updates only the adapter (MIF + DDF [+ LoRA])."
    )
    _param_keys = ("prompt", "seed", "reference")

    def __init__(
        self,
        adapter: str | Path | None = None,
        base_model: str | Path | None = None,
        clip_model: str | Path | None = None,
        references: str | Path | None = None,
        num_inference_steps: int = 50,
        strength: float = 1.0,
        guidance_scale: float = DEFAULT_GUIDANCE,
        torch_dtype: str | torch.dtype | None = None,
        local_files_only: bool | None = None,
        reference_dir: str | Path | None = None,
        model: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        adapter = adapter or model
        references = references if references is not None else reference_dir
        if adapter is None:
            msg = "XFusionSynthesizer needs adapter=DIR (from `anomalib-synth train xfusion`)"
            raise ValueError(msg)
        if num_inference_steps < 1 or not 0 < strength <= 1:
            msg = f"need num_inference_steps >= 1 and 0 < strength <= 1, got {num_inference_steps}, {strength}"
            raise ValueError(msg)
        self.adapter_path = str(adapter)
        self.references_path = None if references is None else str(references)
        self.num_inference_steps, self.strength, self.guidance_scale = (
            int(num_inference_steps),
            strength,
            guidance_scale,
        )
        self.torch_dtype = str(resolve_dtype(torch_dtype)).removeprefix("torch.")
        self.core = XFusionModel(
            base_model, clip_model, adapter, torch_dtype=torch_dtype, local_files_only=local_files_only
        )
        self.core.eval()
        self.references = _reference_entries(references, self.core.adapter, self.category)
        self._textures: dict[int, Tensor] = {}
        self._loaded()

    def _unet_and_vae(self) -> tuple[Any, Any]:
        return self.core.unet, self.core.vae

    @property
    def source_images(self) -> list[str]:
        """Images this synthesizer has seen: its adapter's training images and its references."""
        trained = [e["image"] for e in (self.core.adapter.training_data or {}).get("images", [])]
        return list(dict.fromkeys([*trained, *(e["image"] for e in self.references)]))

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        from ..ops import randint

        params = super().sample_params(images, fg_masks, generator)
        params["reference"] = randint(0, len(self.references) - 1, (images.shape[0],), generator, images.device)
        return params

    def reference_textures(self, indices: list[int]) -> Tensor:
        """CLIP embeddings of ``reference * its mask`` (Eq. 3), computed once per reference and kept."""
        from ...io import read_image, read_mask, resize

        size = (self.resolution, self.resolution)
        for i in sorted(set(indices) - set(self._textures)):
            ref = self.references[i]
            image = resize(read_image(ref["image"], channels=3), size)[None]
            mask = read_mask([Path(m) for m in ref["masks"]], size)[None, None].float()
            self._textures[i] = self.core.encode_texture(image.to(self.model_device), mask.to(self.model_device))[0]
        return torch.stack([self._textures[i] for i in indices])

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        size = self.resolution
        masks = params["mask"]
        model_masks = F.adaptive_max_pool2d(masks.float(), (size, size))  # no mask pixel is lost in the resize
        label = regenerated_pixels(self.core.regenerated_cells(model_masks), images.shape[-2:]).to(images.device)
        generated = self.core.sample(
            to_model_size(images, size),
            model_masks,
            [p.detailed_text for p in self.prompt_texts(params)],
            params["seed"],
            textures=self.reference_textures(params["reference"].tolist()),
            num_inference_steps=self.num_inference_steps,
            strength=self.strength,
            guidance_scale=self.guidance_scale,
            progress=self.progress,
        )
        out = composite(images, generated.to(images.device), label)
        return self._result(images, out, label, params, self._param_keys)
