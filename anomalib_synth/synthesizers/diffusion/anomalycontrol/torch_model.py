"""AnomalyControl's torch core: frozen SD 1.5 inpainting + frozen BLIP-2 (CSM, ASEA) + the trainable SGA.

Training (Sec. 3.5) updates only the SGA (projection, image projection, new K/V) with the noise-prediction MSE of the
9-channel inpainting UNet, dropping the image (a zero CSM feature) / text / both conditions 5 % of the time each
(for classifier-free guidance). The SGA scale is ``s = 1`` in training and at inference: the official training
passes ``cross_attention_kwargs={"scale": 0.5}``, which diffusers' UNet consumes as a LoRA scale and its SGA
processors ignore, so they train at their own scale 1.0, and its inference uses 1.0.

Sampling is :func:`~anomalib_synth.synthesizers.diffusion.anomalycontrol.sampling.sample` (see there for the
scheduler).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....io import atomic_files
from ..common import restartable_scheduler
from ..latents import encode, latent_mask, noise_to_timestep, training_noise
from ..loading import SD15_INPAINTING, ModelNotFoundError, load_pretrained, resolve_dtype
from . import sampling
from .adapter import OLD_CONFIG, SemanticGuidedAdapter, adapter_format, read_ip_adapter, read_old_format
from .modules import BLIP2_ITM, CrossModalSemanticModeling
from .sampling import NEGATIVE_PROMPT

__all__ = ["AnomalyControlModel", "load_adapter"]


def load_adapter(adapter: str | Path, local_files_only: bool | None = None) -> SemanticGuidedAdapter | Path:
    """A saved SGA (``save_pretrained`` folder or Hub id), or the path of an old-format folder (read once the UNet is
    loaded, by :func:`~anomalib_synth.synthesizers.diffusion.anomalycontrol.adapter.read_old_format`).

    Raises:
        ModelNotFoundError: for a missing or empty folder, or a Hub id that is neither cached nor downloadable.
    """
    path = Path(adapter).expanduser()
    kind = adapter_format(path) if path.is_dir() else None
    if kind == "old":
        return path
    # a local path: it exists, or looks like one (absolute, ./, ~), or its parent folder exists (control_run/adapter)
    local = path.exists() or path.is_absolute() or str(adapter).startswith((".", "~")) or path.parent.is_dir()
    if kind is None and local:
        problem = "has no config.json (not a saved adapter)" if path.exists() else "does not exist"
        msg = (f"AnomalyControl adapter: {str(adapter)!r} {problem}; train one with `anomalib-synth train control ... "
               "--output DIR` and pass DIR/adapter")  # fmt: skip
        raise ModelNotFoundError(msg)
    if kind == "diffusers":
        saved_class = json.loads((path / "config.json").read_text()).get("_class_name")
        if saved_class != SemanticGuidedAdapter.__name__:
            msg = (f"AnomalyControl adapter: {str(adapter)!r} holds a {saved_class or 'model without a class name'}, "
                   "not an AnomalyControl adapter (SemanticGuidedAdapter); pass the folder `anomalib-synth train "
                   "control` wrote (DIR/adapter)")  # fmt: skip
            raise ModelNotFoundError(msg)
        adapter = path
    what = "AnomalyControl: adapter (SGA, from `anomalib-synth train control`)"
    return load_pretrained(SemanticGuidedAdapter, adapter, what, local_files_only)


class AnomalyControlModel(nn.Module):
    """Torch core: frozen SD 1.5 inpainting + CSM, trainable SGA.

    Args:
        base_model (str | Path | None): SD inpainting pipeline; default from the adapter config, else SD 1.5 inpainting.
        vlm (str | Path | None): BLIP-2 for the CSM; default from the adapter config, else ``BLIP2_ITM``.
        adapter (str | Path | None): a trained SGA (a folder written by :meth:`save_adapter`, i.e. the SGA's
            ``save_pretrained``, or a Hub id); ``None`` builds a new SGA. Old-format folders (``sga_config.json``)
            load with a ``DeprecationWarning``.
        num_tokens (int): SGA image tokens (new SGA). Defaults to ``4``.
        image_embed_dim (int): width between the BLIP projection and the image projection (new SGA). Defaults
            to ``1024``.
        asea_steps (int), asea_lr (float): ASEA settings. Defaults ``5``, ``0.1``.
        dropout (float): probability of each of image-only, text-only and both dropped in training. Defaults 0.05.
        scale (float): SGA scale ``s`` of a new SGA in training, recorded in its config as the default for sampling.
            Defaults to ``1.0`` (the official training's ``cross_attention_kwargs={"scale": 0.5}`` is a LoRA scale
            that its SGA processors ignore: they train at their own scale, 1.0). A loaded adapter keeps its own.
        init_adapter (str | Path | None): for a new SGA, an IP-Adapter SD 1.5 checkpoint to start from (a local
            file or a Hub file ``OWNER/REPO/PATH``), as the official training; ``None`` starts the new K/V from the
            text K/V and the projections from random. Defaults to ``None``.

    The pipeline samples with a DDIM scheduler on the checkpoint's noise schedule (see
    :mod:`~anomalib_synth.synthesizers.diffusion.anomalycontrol.sampling`); :attr:`shipped_scheduler` names the one
    the checkpoint ships.
    """

    def __init__(self, base_model: str | Path | None = None, vlm: str | Path | None = None,
                 adapter: str | Path | None = None, num_tokens: int = 4, image_embed_dim: int = 1024,
                 asea_steps: int = 5, asea_lr: float = 0.1, dropout: float = 0.05, scale: float = 1.0,
                 init_adapter: str | Path | None = None, torch_dtype: str | torch.dtype | None = None,
                 local_files_only: bool | None = None) -> None:  # fmt: skip
        super().__init__()
        from diffusers import StableDiffusionInpaintPipeline

        loaded = None if adapter is None else load_adapter(adapter, local_files_only)
        if isinstance(loaded, Path):
            defaults = json.loads((loaded / OLD_CONFIG).read_text())
        else:
            defaults = {} if loaded is None else dict(loaded.config)
        self.base_model = str(base_model or defaults.get("base_model") or SD15_INPAINTING)
        self.vlm_name = str(vlm or defaults.get("vlm") or BLIP2_ITM)
        dtype = resolve_dtype(torch_dtype)
        self.pipeline = load_pretrained(StableDiffusionInpaintPipeline, self.base_model,
                                        "AnomalyControl: Stable Diffusion inpainting", local_files_only, dtype=dtype,
                                        safety_checker=None, requires_safety_checker=False)  # fmt: skip
        self.pipeline.set_progress_bar_config(disable=True)
        self.shipped_scheduler = type(self.pipeline.scheduler).__name__
        self.pipeline.scheduler = restartable_scheduler(self.pipeline.scheduler.config)
        self.unet, self.vae, self.text_encoder = self.pipeline.unet, self.pipeline.vae, self.pipeline.text_encoder
        if self.unet.config.in_channels != 9:
            msg = f"{self.base_model!r} is not an inpainting model (UNet has {self.unet.config.in_channels} input channels, need 9)"
            raise ValueError(msg)
        self.csm = CrossModalSemanticModeling(self.vlm_name, asea_steps, asea_lr, torch_dtype, local_files_only)
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        if isinstance(loaded, Path):
            loaded = read_old_format(loaded, self.unet)
        if loaded is None:
            loaded = SemanticGuidedAdapter.for_unet(self.unet, self.csm.dim, image_embed_dim, num_tokens,
                                                    scale=float(scale), base_model=self.base_model, vlm=self.vlm_name,
                                                    init_adapter=None if init_adapter is None else str(init_adapter))  # fmt: skip
            if init_adapter is not None:
                loaded.load_ip_adapter(self.unet, read_ip_adapter(init_adapter, local_files_only))
        if loaded.config.feature_dim != self.csm.dim:
            msg = (f"AnomalyControl adapter {str(adapter)!r} takes {loaded.config.feature_dim}-d features, but the VLM "
                   f"{self.vlm_name!r} gives {self.csm.dim}-d ones")  # fmt: skip
            raise ValueError(msg)
        self.sga = nn.Module.to(loaded, self.unet.dtype)  # ModelMixin.to warns on any dtype cast (diffusers 0.42)
        self.sga.requires_grad_(True).train(self.training)
        self.sga.install(self.unet)
        self.dropout = dropout

    @property
    def scale(self) -> float:
        """The SGA scale ``s`` it trains at (recorded in its config): the default at sampling."""
        return float(self.sga.config.scale)

    @property
    def init_adapter(self) -> str | None:
        return self.sga.config.init_adapter

    @property
    def training_data(self) -> dict[str, Any] | None:
        """The training images (``anomalib_synth.training.leakage.training_data``), recorded in the SGA config."""
        return self.sga.config.training_data

    @training_data.setter
    def training_data(self, value: dict[str, Any] | None) -> None:
        self.sga.register_to_config(training_data=value)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_adapter(self, folder: str | Path) -> Path:
        """The SGA's ``save_pretrained``: ``config.json`` (sizes, layers, scale, base model, VLM, IP-Adapter
        initialisation, training images) + ``diffusion_pytorch_model.safetensors`` (projections and new K/V)."""
        folder = Path(folder)
        self.sga.register_to_config(base_model=self.base_model, vlm=self.vlm_name)
        with atomic_files(folder) as tmp:  # an interrupted save leaves the previous adapter as it was
            self.sga.save_pretrained(tmp)
        return folder

    def reference_features(self, images: Tensor, texts: list[str], masks: Tensor | None) -> Tensor:
        return self.csm(images, texts, masks)

    def _text(self, captions: list[str]) -> Tensor:
        tok = self.pipeline.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.text_encoder.device)  # fmt: skip
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def training_loss(self, images: Tensor, masks: Tensor, captions: list[str], features: Tensor,
                      generator: torch.Generator | None = None, timesteps: Tensor | None = None,
                      noise: Tensor | None = None) -> Tensor:  # fmt: skip
        """Noise-prediction MSE of the inpainting UNet on (target image, target mask, target text, reference
        features); image / text / both conditions are dropped ``dropout`` of the time each."""
        device = self.unet.device
        images, masks, features = images.to(device), masks.to(device).float(), features.to(device)
        b = images.shape[0]
        with torch.no_grad():
            z0 = encode(self.vae, images).float()
            masked = encode(self.vae, images * (1 - masks) + 0.5 * masks).float()  # hole at 0 in [-1, 1], as diffusers
        scheduler = self.pipeline.scheduler  # add_noise only: stateless, the checkpoint's noise schedule
        timesteps, noise = training_noise(scheduler, z0, generator, timesteps, noise)
        SemanticGuidedAdapter.set_scale(self.unet, self.scale)
        features = features.to(self.sga.blip_proj.weight.dtype)
        if self.training and self.dropout > 0:  # a dropped image condition is a zero CSM feature, as officially
            u = torch.rand(b, generator=generator)
            drop_image = (u < self.dropout) | ((u >= 2 * self.dropout) & (u < 3 * self.dropout))
            drop_text = (u >= self.dropout) & (u < 3 * self.dropout)
            features = features * (~drop_image).to(features).view(-1, 1)
            captions = ["" if d else c for c, d in zip(captions, drop_text.tolist(), strict=True)]
        image_embeds = self.sga(features)
        zt = noise_to_timestep(scheduler, z0, timesteps, noise)
        unet_in = torch.cat([zt, latent_mask(masks, z0.shape[-2:]), masked], 1).to(self.unet.dtype)
        eps = self.unet(unet_in, timesteps, encoder_hidden_states=self._text(captions),
                        added_cond_kwargs={"image_embeds": [image_embeds.to(self.unet.dtype)]}).sample  # fmt: skip
        return F.mse_loss(eps.float(), noise)

    def sample(self, images: Tensor, masks: Tensor, captions: list[str], features: Tensor, seeds: Tensor,
               num_inference_steps: int = 50, guidance_scale: float = 7.0, strength: float = 0.7,
               scale: float | None = None, negative_prompt: str | None = NEGATIVE_PROMPT) -> Tensor:  # fmt: skip
        """:func:`~anomalib_synth.synthesizers.diffusion.anomalycontrol.sampling.sample` with this model."""
        return sampling.sample(self, images, masks, captions, features, seeds, num_inference_steps, guidance_scale,
                               strength, scale, negative_prompt)  # fmt: skip
