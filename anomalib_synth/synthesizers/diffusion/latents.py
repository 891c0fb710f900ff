"""Latent-space helpers shared by the diffusion synthesizers: VAE round trip, noising to a timestep, mask blending."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "blend_latents",
    "clip_pixels",
    "decode",
    "encode",
    "generators_for",
    "latent_mask",
    "noise_like",
    "noise_to_timestep",
    "predicted_original",
    "training_noise",
    "vae_scale_factor",
]


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell (8 for Stable Diffusion)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def generators_for(seeds: Tensor) -> list[torch.Generator]:
    """One CPU generator per sample: an image's noise does not depend on what else is in its batch."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]


def noise_like(latents: Tensor, generators: list[torch.Generator]) -> Tensor:
    """Gaussian noise shaped like ``latents``; sample ``i`` is drawn from ``generators[i]`` (which advances)."""
    noise = [torch.randn(latents.shape[1:], generator=g) for g in generators]
    return torch.stack(noise).to(latents)


def encode(vae: Any, images: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
    """Images in ``[0, 1]`` -> scaled latents (a posterior sample when ``generators`` are given, else its mean)."""
    x = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
    dist = vae.encode(x).latent_dist
    latents = dist.mean if generators is None else dist.mean + dist.std * noise_like(dist.mean, generators)
    return latents * vae.config.scaling_factor


def decode(vae: Any, latents: Tensor) -> Tensor:
    """Scaled latents -> images in ``[0, 1]`` (float32). Differentiable."""
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


def clip_pixels(images: Tensor, size: int, dtype: torch.dtype, mode: str = "bilinear") -> Tensor:
    """Images in ``[0, 1]`` -> CLIP-normalised ``pixel_values`` at ``size`` (differentiable; CLIP, BLIP-2)."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    x = F.interpolate(images.float(), size=(size, size), mode=mode, align_corners=False)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def noise_to_timestep(scheduler: Any, latents: Tensor, timestep: Tensor | int, noise: Tensor) -> Tensor:
    """``sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``: a clean latent noised to ``timestep`` (the scheduler's ``add_noise``)."""
    t = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
    return scheduler.add_noise(latents, noise.to(latents), t)


def training_noise(scheduler: Any, z0: Tensor, generator: torch.Generator | None = None,
                   timesteps: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Uniform training timesteps and Gaussian noise for a batch of clean latents (either may be fixed, for tests)."""
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator)
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator)
    return timesteps.to(z0.device), noise.to(z0)


def predicted_original(scheduler: Any, latents: Tensor, noise_pred: Tensor, timestep: Tensor | int) -> Tensor:
    """``z0_hat = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)`` for an epsilon-predicting model."""
    abar = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)[int(timestep)]
    return (latents - (1 - abar).sqrt() * noise_pred) / abar.sqrt()


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A ``[B, 1, H, W]`` pixel mask at latent resolution (nearest, as AnomalyAny resizes its foreground mask)."""
    return F.interpolate(mask.float(), size=size, mode="nearest")


def blend_latents(latents: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """``m * z + (1 - m) * z_ref``: keep ``latents`` inside ``mask`` and the reference elsewhere."""
    mask = mask.to(latents)
    return mask * latents + (1 - mask) * reference.to(latents)
