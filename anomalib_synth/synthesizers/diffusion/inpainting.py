"""Inpainting baseline: Stable Diffusion inpainting of a drawn defect mask with a defect prompt.

The mask comes from our mask generator (a Perlin blob, on the object when ``foreground="auto"``, or the caller's
``fg_masks``); the prompt from the vocabulary (:mod:`~anomalib_synth.synthesizers.diffusion.prompts`). diffusers'
``StableDiffusionInpaintPipeline`` fills the mask; because the VAE round trip changes every pixel, the original is
pasted back outside the mask, so the returned mask covers exactly what changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Params, SynthesisResult
from ..registry import register
from .common import DiffusionSynthesizer, composite, to_model_size
from .loading import SD15_INPAINTING, load_pretrained, resolve_dtype

__all__ = ["InpaintingSynthesizer"]


@register("inpainting")
class InpaintingSynthesizer(DiffusionSynthesizer):
    """Stable Diffusion inpainting of a drawn mask ("a photo of a {object} with a {defect} on it").

    Args:
        model (str | Path): Hub id or local folder of an inpainting pipeline (9-channel UNet). Defaults to SD 1.5
            inpainting.
        num_inference_steps (int): denoising steps. Defaults to ``30``.
        guidance_scale (float): classifier-free guidance. Defaults to ``7.5``.
        strength (float): how far the masked region is noised (1 = from pure noise). Defaults to ``1.0``.
        negative_prompt (str | None): Defaults to ``"smooth, plain, flawless"``.
        torch_dtype (str | torch.dtype | None): weights dtype (``"float16"`` on GPU). Defaults to float32.
        local_files_only (bool | None): never contact the Hub (``None`` follows ``HF_HUB_OFFLINE``).
        attention_slicing (bool): trade speed for memory. Defaults to ``False``.
        **kwargs: prompt, mask and resolution options of
            :class:`~anomalib_synth.synthesizers.diffusion.common.DiffusionSynthesizer`.

    Raises:
        ModelNotFoundError: when the weights are neither local nor reachable.
    """

    description = "Stable Diffusion inpainting of a drawn defect mask with a defect prompt (baseline)"
    cost = (
        "`2 x num_inference_steps x strength` UNet evaluations per image (classifier-free guidance), "
        "plus one VAE encode and decode. SD 1.5 at 512 px in fp16 needs about 4 GB of GPU memory."
    )
    _param_keys = ("prompt", "seed")

    def __init__(
        self,
        model: str | Path = SD15_INPAINTING,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        negative_prompt: str | None = "smooth, plain, flawless",
        torch_dtype: str | torch.dtype | None = None,
        local_files_only: bool | None = None,
        attention_slicing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from diffusers import StableDiffusionInpaintPipeline

        if num_inference_steps < 1 or not 0.0 < strength <= 1.0:
            msg = f"need num_inference_steps >= 1 and 0 < strength <= 1, got {num_inference_steps}, {strength}"
            raise ValueError(msg)
        self.model = str(model)
        self.num_inference_steps, self.guidance_scale, self.strength = (
            int(num_inference_steps),
            guidance_scale,
            strength,
        )
        self.negative_prompt = negative_prompt
        self.torch_dtype = resolve_dtype(torch_dtype)
        self.pipeline = load_pretrained(StableDiffusionInpaintPipeline, self.model, "InpaintingSynthesizer: "
                                        "Stable Diffusion inpainting", local_files_only, dtype=self.torch_dtype,
                                        safety_checker=None, requires_safety_checker=False)  # fmt: skip
        if self.pipeline.unet.config.in_channels != 9:
            msg = f"{self.model!r} is not an inpainting model (UNet has {self.pipeline.unet.config.in_channels} input channels, need 9)"
            raise ValueError(msg)
        if attention_slicing:
            self.pipeline.enable_attention_slicing()
        self.pipeline.set_progress_bar_config(disable=not self.progress)
        self.unet, self.vae, self.text_encoder = self.pipeline.unet, self.pipeline.vae, self.pipeline.text_encoder
        self._loaded()

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        size = self.resolution
        masks = params["mask"]
        prompts = self.prompt_texts(params)
        device = self.model_device
        generated = self.pipeline(
            prompt=[p.anomaly_text for p in prompts],
            negative_prompt=None if self.negative_prompt is None else [self.negative_prompt] * len(prompts),
            image=to_model_size(images, size).to(device),
            mask_image=F.interpolate(masks.float(), size=(size, size), mode="nearest").to(device),
            height=size,
            width=size,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            strength=self.strength,
            generator=[torch.Generator().manual_seed(int(s)) for s in params["seed"].tolist()],
            output_type="pt",
        ).images
        out = composite(images, generated.to(images.device), masks)
        return self._result(images, out, masks, params, self._param_keys)
