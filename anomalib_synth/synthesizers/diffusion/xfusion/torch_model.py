"""The torch core of AnomalyXFusion: frozen SD 1.5 + CLIP, the trainable adapter, the conditioning and the Eq. 17 loss.

- Conditioning: ``[caption tokens ; e_t]`` goes to the UNet's cross-attention, ``e_t`` being DDF of the
  X-embedding (Sec. 4.3). *Departure:* the paper's code base is the older LDM (``txt2img-f8-large``, BERT
  context); we use SD 1.5, frozen, with an optional LoRA on the cross-attention projections (:mod:`.lora`).
- Training (Eq. 16-17): inside the mask the model denoises, outside it the noised original is kept, so the loss is
  the noise-prediction error in the **L2** norm (the simplified DDPM objective SD was trained with; L1 would change
  the frozen UNet's optimum), weighted ``1`` inside the latent mask and ``background_weight`` (0.1) outside, because
  outside the mask the sampler discards the prediction anyway. The latent mask is the cells that hold any mask
  pixel (:func:`.masks.covering_latent_mask`), as in sampling.
- Caption dropout (10 %) trains the unconditional branch of classifier-free guidance (:mod:`.sampling`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ....io import atomic_files
from ..latents import clip_pixels, encode, noise_to_timestep, training_noise
from ..loading import CLIP_VIT_L14, SD15, load_pretrained, resolve_dtype
from .lora import LORA_TARGETS, add_lora, load_lora, lora_state, save_lora
from .masks import covering_latent_mask
from .modules import XFusionAdapter
from .sampling import DEFAULT_GUIDANCE, regenerated_cells, sample

__all__ = ["LORA_TARGETS", "XFusionModel"]


class XFusionModel(nn.Module):
    """The torch core of AnomalyXFusion: frozen SD 1.5 + CLIP image encoder, a trainable :class:`XFusionAdapter`.

    Args:
        base_model (str | Path): Stable Diffusion pipeline (Hub id or folder). Defaults to the adapter's, else SD 1.5.
        clip_model (str | Path): CLIP with a vision tower, for the textural embedding. Defaults to the adapter's,
            else ViT-L/14.
        adapter (XFusionAdapter | str | Path | None): a trained adapter (or its folder, whose LoRA is loaded too);
            ``None`` builds a new one.
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

        folder = None
        if isinstance(adapter, (str, Path)):
            folder = Path(adapter).expanduser()  # the LoRA is read from the same folder as the adapter
            adapter = XFusionAdapter.from_pretrained(folder)
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
            adapter = XFusionAdapter(dim=self.unet.config.cross_attention_dim, num_tokens=num_tokens,
                                     text_dim=self.text_encoder.config.hidden_size,
                                     image_dim=self.image_encoder.config.projection_dim, base_model=self.base_model,
                                     clip_model=self.clip_model, lora_rank=lora_rank)  # fmt: skip
        self.adapter = adapter
        self.lora_rank = adapter.config.lora_rank
        if self.lora_rank and folder is not None:
            load_lora(self.unet, self.lora_rank, folder)
        elif self.lora_rank:
            add_lora(self.unet, self.lora_rank)
        self.background_weight, self.caption_dropout = background_weight, caption_dropout

    def lora_state(self) -> dict[str, Tensor] | None:
        """peft's state dict of the UNet's LoRA (``None`` without LoRA)."""
        return lora_state(self.unet) if self.lora_rank else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the adapter (diffusers' ``save_pretrained``) and its LoRA (:func:`.lora.save_lora`); returns ``folder``."""
        folder = Path(folder)
        with atomic_files(folder) as tmp:  # an interrupted save leaves the previous adapter as it was
            self.adapter.save_pretrained(tmp)
            if self.lora_rank:
                save_lora(self.unet, tmp)
        return folder

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
        """MIF (Eq. 1-5): the X-embedding ``e_X`` of the caption, the mask and the texture."""
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

    # -- sampling (see :mod:`.sampling`) ------------------------------------------------------------------------

    def regenerated_cells(self, masks: Tensor) -> Tensor:
        """The latent cells that :meth:`sample` regenerates for model-size pixel ``masks``, ``[B, 1, h, w]``."""
        return regenerated_cells(self, masks)

    @torch.no_grad()
    def sample(self, images: Tensor, masks: Tensor, captions: list[str], seeds: Tensor,
               references: Tensor | None = None, reference_masks: Tensor | None = None,
               num_inference_steps: int = 50, strength: float = 1.0, guidance_scale: float = DEFAULT_GUIDANCE,
               progress: bool = False, textures: Tensor | None = None) -> Tensor:  # fmt: skip
        """Eq. 16 sampling at model size: :func:`.sampling.sample` with this model."""
        return sample(self, images, masks, captions, seeds, references, reference_masks, num_inference_steps,
                      strength, guidance_scale, progress, textures)  # fmt: skip
