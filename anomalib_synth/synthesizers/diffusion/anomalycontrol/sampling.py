"""AnomalyControl's sampling (inference of He et al., arXiv 2412.06510): SGA-steered SD inpainting from ``strength``.

As the official inference: diffusers' ``StableDiffusionInpaintPipeline`` (50 steps, guidance 7, strength 0.7) with
the SGA tokens as ``ip_adapter_image_embeds``, the official negative prompt (:data:`NEGATIVE_PROMPT`) and the SGA
tokens of a zero CSM feature (the image condition dropped in training) in the negative branch.

**Departure: the scheduler.** The official inference samples with the scheduler the checkpoint ships, PNDM for SD 1.5
inpainting. With ``strength < 1`` diffusers' pipeline starts partway into PNDM's timesteps, and that is wrong for
PNDM: its PLMS timesteps repeat the second step (``[t1, t2, t2, t3, ...]``, diffusers issue #9090) for its stateful
warm-up (the second call steps again from the sample stored by the first), so a schedule cut after the repeat
runs ``int(N * strength) + 1`` steps from one step earlier, and from its third call on the UNet is told a
timestep one step below the latent's noise level: the latent lags the schedule by one step, to the end. The model
therefore samples, as AnomalyAny and AnomalyXFusion do, with a DDIM scheduler on the checkpoint's own noise
schedule (:func:`~anomalib_synth.synthesizers.diffusion.common.restartable_scheduler`), which is stateless and so
correct from any starting step: ``int(N * strength)`` steps, each at the latent's own noise level
(``tests/test_anomalycontrol.py`` checks this with an exact noise predictor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .adapter import SemanticGuidedAdapter

if TYPE_CHECKING:
    from .torch_model import AnomalyControlModel

__all__ = ["NEGATIVE_PROMPT", "sample"]

NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
"""The official inference's default negative prompt."""


@torch.no_grad()
def sample(model: AnomalyControlModel, images: Tensor, masks: Tensor, captions: list[str], features: Tensor,
           seeds: Tensor, num_inference_steps: int = 50, guidance_scale: float = 7.0, strength: float = 0.7,
           scale: float | None = None, negative_prompt: str | None = NEGATIVE_PROMPT) -> Tensor:  # fmt: skip
    """Inpaint ``masks`` of model-size ``images`` with ``model.pipeline`` (DDIM); returns model-size images.

    ``features`` are the reference CSM features ``[B, d]``; sample ``i``'s noise comes from its own generator seeded
    with ``seeds[i]``. ``scale`` defaults to the scale the SGA was trained at. With guidance, the negative branch is
    ``negative_prompt`` with the SGA tokens of a zero CSM feature (the dropped image condition of training), as the
    official inference.
    """
    SemanticGuidedAdapter.set_scale(model.unet, model.scale if scale is None else scale)
    weight = model.sga.blip_proj.weight
    features = features.to(device=weight.device, dtype=weight.dtype)
    embeds = model.sga(features).to(model.unet.dtype)
    if guidance_scale > 1:
        embeds = torch.cat([model.sga(torch.zeros_like(features)).to(model.unet.dtype), embeds])
    size = images.shape[-1]
    negative = None if negative_prompt is None or guidance_scale <= 1 else [negative_prompt] * len(captions)
    return model.pipeline(
        prompt=captions, negative_prompt=negative, image=images.to(model.unet.device),
        mask_image=masks.float().to(model.unet.device),
        height=size, width=size, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        strength=strength, generator=[torch.Generator().manual_seed(int(s)) for s in seeds.tolist()],
        ip_adapter_image_embeds=[embeds.unsqueeze(1) if embeds.ndim == 2 else embeds], output_type="pt",
    ).images  # fmt: skip
