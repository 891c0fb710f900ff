"""AnomalyXFusion's sampler: Eq. 16 blending with classifier-free guidance, on an :class:`~.torch_model.XFusionModel`.

- Blending (Eq. 16): inside the mask the model denoises; outside it the noised original
  ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` is kept, on the latent cells that hold any mask pixel
  (:func:`.masks.covering_latent_mask`), as in training.
- Texture (Eq. 3): as in training, the CLIP embedding of a defect image times *its own* defect mask, while the
  location embedding takes the target mask.
- Guidance: classifier-free, scale 5 by default, the value of the LDM / AnomalyDiffusion sampler the paper builds
  on (the paper does not state its own). The unconditional branch is the empty caption in the caption tokens and in
  ``e_X`` (mask and texture kept), which is what training's caption dropout (10 %) prepares for.
- Scheduler: a restartable one (DDIM) whatever the checkpoint ships, because the latent is blended with the
  re-noised input between steps and a stateful scheduler (SD 1.5's PNDM) would drop the blend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..common import restartable_scheduler
from ..latents import decode, encode, generators_for, noise_like, noise_to_timestep, vae_scale_factor
from .masks import covering_latent_mask

if TYPE_CHECKING:
    from .torch_model import XFusionModel

__all__ = ["DEFAULT_GUIDANCE", "regenerated_cells", "sample"]

DEFAULT_GUIDANCE = 5.0
"""Classifier-free guidance scale: LDM / AnomalyDiffusion's sampler (``scale 5.0``), the code base of the paper."""


def regenerated_cells(model: XFusionModel, masks: Tensor) -> Tensor:
    """The latent cells that :func:`sample` regenerates for model-size pixel ``masks``, ``[B, 1, h, w]``."""
    factor = vae_scale_factor(model.vae)
    return covering_latent_mask(masks, (masks.shape[-2] // factor, masks.shape[-1] // factor))


@torch.no_grad()
def sample(model: XFusionModel, images: Tensor, masks: Tensor, captions: list[str], seeds: Tensor,
           references: Tensor | None = None, reference_masks: Tensor | None = None, num_inference_steps: int = 50,
           strength: float = 1.0, guidance_scale: float = DEFAULT_GUIDANCE, progress: bool = False,
           textures: Tensor | None = None) -> Tensor:  # fmt: skip
    """Eq. 16 sampling at model size: denoise the latent cells of ``masks``, keep the noised input elsewhere.

    ``images``/``masks`` are model-size ``[B,3,S,S]``/``[B,1,S,S]``; the regenerated cells are
    :func:`regenerated_cells` of ``masks`` (``masks`` themselves drive the location embedding). The textural
    embedding is, as in training, the CLIP embedding of a defect image times its own defect mask: ``textures``
    (``[B, D]`` from ``model.encode_texture``), else ``references * reference_masks``, else ``images * masks`` (only
    meaningful when ``images`` are themselves anomalous: on normal images, give references). ``seeds`` (one per
    image) fix the VAE sample and the noise. Returns decoded images in [0, 1].
    """
    from tqdm.auto import tqdm

    device = model.unet.device
    images, masks = images.to(device), masks.to(device)
    gens = generators_for(seeds)
    z0 = encode(model.vae, images, gens).float()
    m = covering_latent_mask(masks, z0.shape[-2:])
    tokens, pooled = model.encode_text(captions)
    if textures is not None:
        texture = textures.to(device).float()
    elif references is not None:
        if reference_masks is None:
            msg = "references need their defect masks: the texture is reference * mask, as in training (Eq. 3)"
            raise ValueError(msg)
        texture = model.encode_texture(references.to(device), reference_masks.to(device))
    else:
        texture = model.encode_texture(images, masks)
    x_embedding = model.x_embedding(pooled, masks, texture)
    if guidance_scale != 1.0:  # the unconditional branch as trained: the empty caption in tokens and in e_X
        empty_tokens, empty_pooled = model.encode_text([""] * len(captions))
        empty_x_embedding = model.x_embedding(empty_pooled, masks, texture)
    scheduler = restartable_scheduler(model.scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    start = min(int(num_inference_steps * strength), num_inference_steps)
    timesteps = scheduler.timesteps[num_inference_steps - start :]
    noise = noise_like(z0, gens)
    z = noise_to_timestep(scheduler, z0, timesteps[0], noise)
    if start == num_inference_steps:  # strength 1: the masked region starts from pure noise
        z = m * noise * scheduler.init_noise_sigma + (1 - m) * z
    unet = model.unet
    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="xfusion", leave=False)):
        context = model.condition(tokens, x_embedding, t)
        eps = unet(z.to(unet.dtype), t, encoder_hidden_states=context).sample.float()
        if guidance_scale != 1.0:
            uncond = model.condition(empty_tokens, empty_x_embedding, t)
            eps_u = unet(z.to(unet.dtype), t, encoder_hidden_states=uncond).sample.float()
            eps = eps_u + guidance_scale * (eps - eps_u)
        z = scheduler.step(eps, t, z).prev_sample.float()
        known = (
            noise_to_timestep(scheduler, z0, timesteps[i + 1], noise_like(z0, gens)) if i + 1 < len(timesteps) else z0
        )
        z = m * z + (1 - m) * known  # Eq. 16
    return decode(model.vae, z)
