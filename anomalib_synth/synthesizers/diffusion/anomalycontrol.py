"""AnomalyControl: cross-modal semantic features for controllable anomaly synthesis (He et al., arXiv 2412.06510).

A reference defect (image + text [+ mask]) steers Stable Diffusion 1.5 inpainting of a target mask on a normal image:

- :class:`CrossModalSemanticModeling` (CSM, Sec. 3.2): a frozen BLIP-2 (vision tower + Q-Former, transformers'
  ``Blip2ForImageTextRetrieval``) encodes the reference image (224 px for the real model) and its text in the
  Q-Former's multimodal mode; the query tokens are averaged to one vector (as the official code does).
- :class:`AnomalySemanticEnhancedAttention` (ASEA, Sec. 3.3): an attention guidance variable ``e_g``,
  zero-initialised and added to the frozen vision patch embeddings, optimised per sample (official: 5 Adam steps,
  lr 0.1) with ``(1 - sum(A M) / sum(A))^2``, ``A`` the Q-Former cross-attention (averaged over layers, heads and
  queries, without the CLS patch) and ``M`` the reference mask on the patch grid. *As in the official code* this is
  test-time optimisation inside the frozen VLM (the paper calls ``e_g`` trainable).
- :class:`SemanticGuidedAdapter` (SGA, Sec. 3.4): ``Linear(d_qformer -> 1024)`` (the official ``BlipProjModel``), then
  diffusers' IP-Adapter ``ImageProjection`` (1024 -> 4 tokens) as the UNet's ``encoder_hid_proj``, and diffusers'
  ``IPAdapterAttnProcessor2_0`` on the cross-attention layers only: ``Attn(Q, K_txt, V_txt) + s Attn(Q, K_ip,
  V_ip)``, with ``K_ip``/``V_ip`` initialised from the text ``K``/``V``. *Departure:* the official code starts from
  the IP-Adapter SD 1.5 checkpoint; ours starts from the text projections (no such checkpoint offline).

Training (Sec. 3.5) updates only the SGA (projection, image projection, new K/V) with the noise-prediction MSE of the
9-channel inpainting UNet, dropping the image / text / both conditions 5 % of the time each (for classifier-free
guidance); SGA scale 0.5 in training and 1.0 at inference, as the official code. Inference uses diffusers'
``StableDiffusionInpaintPipeline`` (50 steps, guidance 7, strength 0.7) with the SGA tokens as
``ip_adapter_image_embeds`` and composites the result back through the target mask blurred with ``sigma = 5`` px
(at 512 px; scaled with the resolution).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn

from ..base import Params, SynthesisResult
from ..ops import randint
from ..registry import register
from .common import DiffusionSynthesizer, to_model_size
from .latents import clip_pixels, encode, latent_mask, noise_to_timestep, training_noise
from .loading import SD15_INPAINTING, ModelNotFoundError, load_pretrained, resolve_dtype

__all__ = [
    "BLIP2_ITM",
    "AnomalyControlModel",
    "AnomalyControlSynthesizer",
    "AnomalySemanticEnhancedAttention",
    "CrossModalSemanticModeling",
    "SemanticGuidedAdapter",
    "load_references",
]

BLIP2_ITM = "Salesforce/blip2-itm-vit-g"
"""BLIP-2 (EVA ViT-g + Q-Former) image-text model in transformers format: the default VLM of the CSM."""
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "sga.safetensors", "sga_config.json"


class AnomalySemanticEnhancedAttention(nn.Module):
    """ASEA (Sec. 3.3): test-time optimisation of ``e_g`` so the Q-Former looks at the reference anomaly region."""

    def __init__(self, steps: int = 5, lr: float = 0.1) -> None:
        super().__init__()
        self.steps, self.lr = int(steps), float(lr)

    @staticmethod
    def loss(attention: Tensor, masks: Tensor) -> Tensor:
        """``(1 - sum(A M) / sum(A))^2`` per sample; ``attention`` and ``masks`` are ``[B, g, g]``."""
        inside = (attention * masks).flatten(1).sum(1) / attention.flatten(1).sum(1).clamp_min(1e-12)
        return (1 - inside) ** 2

    def optimise(self, csm: CrossModalSemanticModeling, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor,
                 masks: Tensor) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
        """Return ``e_g`` and the per-step attention fraction inside the mask (``[B]`` each, first = before)."""
        with torch.no_grad():
            shape = csm.patch_embeddings(pixels).shape
        e_g = torch.zeros(shape, device=pixels.device, dtype=torch.float32, requires_grad=True)  # fp32 for Adam
        optimizer = torch.optim.Adam([e_g], lr=self.lr)
        fractions = []
        with torch.enable_grad():
            for _ in range(self.steps):
                _, attention = csm.encode(pixels, input_ids, attention_mask, e_g)
                grid = F.interpolate(masks.float(), size=attention.shape[-2:], mode="nearest")[:, 0]
                loss = self.loss(attention, grid)
                fractions.append(1 - loss.detach().sqrt())
                optimizer.zero_grad()
                loss.sum().backward()
                optimizer.step()
        with torch.no_grad():
            _, attention = csm.encode(pixels, input_ids, attention_mask, e_g)
            grid = F.interpolate(masks.float(), size=attention.shape[-2:], mode="nearest")[:, 0]
            fractions.append(1 - self.loss(attention, grid).sqrt())
        return e_g.detach(), fractions


class CrossModalSemanticModeling(nn.Module):
    """CSM (Sec. 3.2): frozen BLIP-2 Q-Former features of a text-image reference, ``[B, d_qformer]``.

    Args:
        vlm (str | Path): a ``Blip2ForImageTextRetrieval`` checkpoint with its tokenizer. Defaults to
            ``Salesforce/blip2-itm-vit-g``.
        asea_steps (int), asea_lr (float): ASEA's test-time optimisation (0 steps disables it). Defaults 5, 0.1.
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
        self._attention: list[Tensor] = []
        for name, module in self.vlm.qformer.named_modules():
            if name.endswith("crossattention.attention"):
                module.register_forward_hook(self._keep_attention)

    @property
    def dim(self) -> int:
        return self.vlm.config.qformer_config.hidden_size

    def _keep_attention(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            self._attention.append(output[1])

    def pixels(self, images: Tensor) -> Tensor:
        size = self.vlm.config.vision_config.image_size
        return clip_pixels(images.to(self.vlm.device), size, self.vlm.dtype)

    def tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return out.input_ids.to(self.vlm.device), out.attention_mask.to(self.vlm.device)

    def patch_embeddings(self, pixels: Tensor) -> Tensor:
        return self.vlm.vision_model.embeddings(pixels)

    def encode(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor,
               e_g: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Averaged query features ``[B, d]`` and the cross-attention on the patch grid ``[B, g, g]``."""
        vision = self.vlm.vision_model
        hidden = self.patch_embeddings(pixels)
        if e_g is not None:
            hidden = hidden + e_g.to(hidden.dtype)
        image_embeds = vision.post_layernorm(vision.encoder(inputs_embeds=hidden).last_hidden_state)
        b = pixels.shape[0]
        queries = self.vlm.query_tokens.expand(b, -1, -1)
        n_query = queries.shape[1]
        embeds = self.vlm.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones(b, n_query, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], 1)  # fmt: skip
        self._attention = []
        out = self.vlm.qformer(query_embeds=embeds, query_length=n_query, attention_mask=mask,
                               encoder_hidden_states=image_embeds,
                               encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long,
                                                                 device=image_embeds.device))  # fmt: skip
        features = out.last_hidden_state[:, :n_query].mean(1)
        attention = torch.stack(self._attention).mean(0).mean(1)  # layers, heads -> [B, tokens, 1 + patches]
        attention = attention[:, :n_query].mean(1)[:, 1:]  # queries; drop the CLS patch
        side = int(attention.shape[-1] ** 0.5)
        return features.float(), attention.float().reshape(b, side, side)

    def forward(self, images: Tensor, texts: list[str], masks: Tensor | None = None) -> Tensor:
        """Reference features ``[B, d]``; with ``masks`` (and ASEA steps > 0), ``e_g`` is optimised first."""
        pixels = self.pixels(images)
        input_ids, attention_mask = self.tokens(texts)
        e_g = None
        if masks is not None and self.asea.steps > 0:
            e_g, _ = self.asea.optimise(self, pixels, input_ids, attention_mask, masks.to(pixels.device))
        with torch.no_grad():
            return self.encode(pixels, input_ids, attention_mask, e_g)[0]


class SemanticGuidedAdapter(nn.Module):
    """SGA (Sec. 3.4): CSM feature -> ``Linear`` -> diffusers ``ImageProjection`` -> decoupled cross-attention.

    :meth:`install` puts the image projection into ``unet.encoder_hid_proj`` (diffusers' IP-Adapter route) and an
    ``IPAdapterAttnProcessor2_0`` on every ``attn2`` layer; self-attention keeps its processor.
    """

    def __init__(self, feature_dim: int, cross_attention_dim: int, image_embed_dim: int = 1024,
                 num_tokens: int = 4) -> None:  # fmt: skip
        super().__init__()
        from diffusers.models.embeddings import ImageProjection

        self.settings = {"feature_dim": feature_dim, "cross_attention_dim": cross_attention_dim,
                         "image_embed_dim": image_embed_dim, "num_tokens": num_tokens}  # fmt: skip
        self.blip_proj = nn.Linear(feature_dim, image_embed_dim)
        self.image_proj = ImageProjection(image_embed_dim, cross_attention_dim, num_tokens)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, feature_dim]`` -> ``[B, 1, image_embed_dim]`` (the ``image_embeds`` the UNet projects to tokens)."""
        return self.blip_proj(features).unsqueeze(1)

    def install(self, unet: Any, scale: float = 1.0) -> None:
        from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        processors = dict(unet.attn_processors)
        for name, module in unet.named_modules():
            if isinstance(module, Attention) and name.endswith("attn2"):
                proc = IPAdapterAttnProcessor2_0(module.to_k.out_features, module.to_k.in_features,
                                                 num_tokens=(self.settings["num_tokens"],), scale=scale)  # fmt: skip
                proc.to_k_ip[0].weight.data.copy_(module.to_k.weight.data)
                proc.to_v_ip[0].weight.data.copy_(module.to_v.weight.data)
                processors[f"{name}.processor"] = proc.to(module.to_k.weight)
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.image_proj])
        unet.config.encoder_hid_dim_type = "ip_image_proj"

    @staticmethod
    def set_scale(unet: Any, scale: float) -> None:
        for proc in unet.attn_processors.values():
            if hasattr(proc, "scale") and isinstance(proc.scale, list):
                proc.scale = [scale] * len(proc.scale)

    @staticmethod
    def ip_state(unet: Any) -> dict[str, Tensor]:
        """The new K/V weights of the decoupled cross-attention."""
        return {k: v for k, v in unet.state_dict().items() if "to_k_ip" in k or "to_v_ip" in k}


class AnomalyControlModel(nn.Module):
    """Torch core: frozen SD 1.5 inpainting + CSM, trainable SGA.

    Args:
        base_model (str | Path | None): SD inpainting pipeline; default from the adapter config, else SD 1.5 inpainting.
        vlm (str | Path | None): BLIP-2 for the CSM; default from the adapter config, else ``BLIP2_ITM``.
        adapter (str | Path | None): a trained SGA folder; ``None`` builds a new SGA.
        num_tokens (int): SGA image tokens. Defaults to ``4``.
        image_embed_dim (int): width between the BLIP projection and the image projection. Defaults to ``1024``.
        asea_steps (int), asea_lr (float): ASEA settings. Defaults ``5``, ``0.1``.
        dropout (float): probability of each of image-only, text-only and both dropped in training. Defaults 0.05.
        train_scale (float): SGA scale in training. Defaults to ``0.5``.
    """

    def __init__(self, base_model: str | Path | None = None, vlm: str | Path | None = None,
                 adapter: str | Path | None = None, num_tokens: int = 4, image_embed_dim: int = 1024,
                 asea_steps: int = 5, asea_lr: float = 0.1, dropout: float = 0.05, train_scale: float = 0.5,
                 torch_dtype: str | torch.dtype | None = None, local_files_only: bool | None = None) -> None:  # fmt: skip
        super().__init__()
        from diffusers import StableDiffusionInpaintPipeline

        settings, state = {}, None
        if adapter is not None:
            settings, state = load_sga(adapter)
        self.base_model = str(base_model or settings.get("base_model", SD15_INPAINTING))
        self.vlm_name = str(vlm or settings.get("vlm", BLIP2_ITM))
        dtype = resolve_dtype(torch_dtype)
        self.pipeline = load_pretrained(StableDiffusionInpaintPipeline, self.base_model,
                                        "AnomalyControl: Stable Diffusion inpainting", local_files_only, dtype=dtype,
                                        safety_checker=None, requires_safety_checker=False)  # fmt: skip
        self.pipeline.set_progress_bar_config(disable=True)
        self.unet, self.vae, self.text_encoder = self.pipeline.unet, self.pipeline.vae, self.pipeline.text_encoder
        if self.unet.config.in_channels != 9:
            msg = f"{self.base_model!r} is not an inpainting model (UNet has {self.unet.config.in_channels} input channels, need 9)"
            raise ValueError(msg)
        self.csm = CrossModalSemanticModeling(self.vlm_name, asea_steps, asea_lr, torch_dtype, local_files_only)
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        sga_settings = {"feature_dim": self.csm.dim, "cross_attention_dim": self.unet.config.cross_attention_dim,
                        "image_embed_dim": image_embed_dim, "num_tokens": num_tokens}  # fmt: skip
        sga_settings.update({k: settings[k] for k in sga_settings if k in settings})
        self.sga = SemanticGuidedAdapter(**sga_settings).to(self.unet.dtype)
        self.sga.install(self.unet, scale=train_scale)
        if state is not None:
            self.sga.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("sga.")})
            kv = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
            result = self.unet.load_state_dict(kv, strict=False)
            missing = set(SemanticGuidedAdapter.ip_state(self.unet)) - set(kv)
            if result.unexpected_keys or missing:
                msg = (f"AnomalyControl adapter {str(adapter)!r} does not fit {self.base_model!r}: unexpected "
                       f"{result.unexpected_keys[:3]}, missing {sorted(missing)[:3]}")  # fmt: skip
                raise ValueError(msg)
        self.dropout, self.train_scale = dropout, train_scale

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_adapter(self, folder: str | Path) -> Path:
        """``sga.safetensors`` (BLIP projection, image projection, new K/V) + ``sga_config.json``."""
        from ...io import write_safetensors, write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {f"sga.{k}": v for k, v in self.sga.state_dict().items()}
        state.update({f"unet.{k}": v for k, v in SemanticGuidedAdapter.ip_state(self.unet).items()})
        write_safetensors(folder / ADAPTER_WEIGHTS, state)
        config = {"type": "anomalycontrol", "base_model": self.base_model, "vlm": self.vlm_name, **self.sga.settings}
        write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2))
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
        scheduler = self.pipeline.scheduler.__class__.from_config(self.pipeline.scheduler.config)
        timesteps, noise = training_noise(scheduler, z0, generator, timesteps, noise)
        SemanticGuidedAdapter.set_scale(self.unet, self.train_scale)
        image_embeds = self.sga(features.to(self.sga.blip_proj.weight.dtype))
        if self.training and self.dropout > 0:
            u = torch.rand(b, generator=generator)
            drop_image = (u < self.dropout) | ((u >= 2 * self.dropout) & (u < 3 * self.dropout))
            drop_text = (u >= self.dropout) & (u < 3 * self.dropout)
            image_embeds = image_embeds * (~drop_image).to(image_embeds).view(-1, 1, 1)
            captions = ["" if d else c for c, d in zip(captions, drop_text.tolist(), strict=True)]
        zt = noise_to_timestep(scheduler, z0, timesteps, noise)
        unet_in = torch.cat([zt, latent_mask(masks, z0.shape[-2:]), masked], 1).to(self.unet.dtype)
        eps = self.unet(unet_in, timesteps, encoder_hidden_states=self._text(captions),
                        added_cond_kwargs={"image_embeds": [image_embeds.to(self.unet.dtype)]}).sample  # fmt: skip
        return F.mse_loss(eps.float(), noise)

    @torch.no_grad()
    def sample(self, images: Tensor, masks: Tensor, captions: list[str], features: Tensor, seeds: Tensor,
               num_inference_steps: int = 50, guidance_scale: float = 7.0, strength: float = 0.7,
               scale: float = 1.0) -> Tensor:  # fmt: skip
        """Inpaint ``masks`` of model-size ``images`` with diffusers' pipeline; returns model-size images."""
        SemanticGuidedAdapter.set_scale(self.unet, scale)
        weight = self.sga.blip_proj.weight
        embeds = self.sga(features.to(device=weight.device, dtype=weight.dtype)).to(self.unet.dtype)
        if guidance_scale > 1:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])  # negative = dropped image condition
        size = images.shape[-1]
        return self.pipeline(
            prompt=captions, image=images.to(self.unet.device), mask_image=masks.float().to(self.unet.device),
            height=size, width=size, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            strength=strength, generator=[torch.Generator().manual_seed(int(s)) for s in seeds.tolist()],
            ip_adapter_image_embeds=[embeds.unsqueeze(1) if embeds.ndim == 2 else embeds], output_type="pt",
        ).images  # fmt: skip


def load_sga(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Settings and weights of a saved SGA; :class:`ModelNotFoundError` when missing."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        msg = (f"AnomalyControl adapter: {str(folder)!r} has no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}; train one with "
               "`anomalib-synth train control ... --output DIR` and pass DIR/adapter")  # fmt: skip
        raise ModelNotFoundError(msg)
    return json.loads((folder / ADAPTER_CONFIG).read_text()), load_file(str(folder / ADAPTER_WEIGHTS))


def load_references(references: str | Path) -> list[dict[str, Any]]:
    """Reference defects from a JSON list (``[{"image": path, "text": str, "mask": path?}, ...]``, paths relative
    to the file) or a folder of images (text = file stem with ``_`` as spaces; ``<stem>_mask.png`` is the mask of
    ``<stem>.png``).

    Raises:
        FileNotFoundError: for a missing file or folder. ValueError: for an empty or malformed list.
    """
    from ...io import list_images

    path = Path(references)
    if not path.exists():
        msg = f"references {str(path)!r} do not exist"
        raise FileNotFoundError(msg)
    if path.is_dir():
        files = list_images(path)
        masks = {p.stem[: -len("_mask")]: p for p in files if p.stem.endswith("_mask")}
        entries = [{"image": str(p), "text": p.stem.replace("_", " "), "mask": str(masks[p.stem]) if p.stem in masks
                    else None} for p in files if not p.stem.endswith("_mask")]  # fmt: skip
    else:
        raw = json.loads(path.read_text())
        if not isinstance(raw, list) or not all(isinstance(r, dict) and "image" in r and "text" in r for r in raw):
            msg = f"{str(path)!r} must be a JSON list of {{'image': path, 'text': str, 'mask': path (optional)}}"
            raise ValueError(msg)
        entries = [{"image": str(path.parent / r["image"]), "text": r["text"],
                    "mask": None if not r.get("mask") else str(path.parent / r["mask"])} for r in raw]  # fmt: skip
    if not entries:
        msg = f"no reference images in {str(path)!r}"
        raise ValueError(msg)
    return entries


@register("anomalycontrol")
class AnomalyControlSynthesizer(DiffusionSynthesizer):
    """AnomalyControl inference: a normal image, a target mask and text, steered by a text-image reference defect.

    Args:
        references (str | Path): a JSON list or a folder of reference defects (see :func:`load_references`); the
            reference may be another object or material (the paper's generalisation).
        adapter (str | Path): a trained SGA folder (``anomalib-synth train control``). ``model`` is an alias.
        base_model (str | Path | None), vlm (str | Path | None): default to the adapter config's.
        num_inference_steps (int), guidance_scale (float), strength (float): official 50, 7, 0.7.
        scale (float): SGA scale ``s`` at inference. Defaults to ``1.0``.
        blur_sigma (float): sigma of the composite mask at 512 px (scaled with the resolution). Defaults to ``5``.
        asea_steps (int), asea_lr (float): ASEA on references that have a mask. Defaults ``5``, ``0.1``.
        **kwargs: prompt, mask and resolution options of
            :class:`~anomalib_synth.synthesizers.diffusion.common.DiffusionSynthesizer`; the target text is the
            prompt's description.

    The returned mask is the target mask (as the official code); the blurred composite also softens a halo of
    ``~2 sigma`` px around it. Pixels where the blurred mask is 0 are the input's own.
    """

    description = "AnomalyControl: text-image reference defect -> BLIP-2 features -> IP-Adapter-style SD inpainting"
    _param_keys = ("prompt", "seed", "reference")

    def __init__(self, references: str | Path | None = None, adapter: str | Path | None = None,
                 base_model: str | Path | None = None, vlm: str | Path | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.0, strength: float = 0.7, scale: float = 1.0, blur_sigma: float = 5.0,
                 asea_steps: int = 5, asea_lr: float = 0.1, torch_dtype: str | torch.dtype | None = None,
                 local_files_only: bool | None = None, model: str | Path | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        adapter = adapter or model
        if adapter is None or references is None:
            msg = "AnomalyControlSynthesizer needs adapter=DIR (from `anomalib-synth train control`) and references="
            raise ValueError(msg)
        self.adapter_path, self.references_path = str(adapter), str(references)
        self.references = load_references(references)
        self.num_inference_steps, self.guidance_scale, self.strength = (
            int(num_inference_steps),
            guidance_scale,
            strength,
        )
        self.scale, self.blur_sigma, self.torch_dtype = scale, blur_sigma, torch_dtype
        self.core = AnomalyControlModel(base_model, vlm, adapter, asea_steps=asea_steps, asea_lr=asea_lr,
                                        torch_dtype=torch_dtype, local_files_only=local_files_only)  # fmt: skip
        self._loaded()
        self._features: dict[int, Tensor] = {}

    def _unet_and_vae(self) -> tuple[Any, Any]:
        return self.core.unet, self.core.vae

    def config(self) -> dict[str, Any]:
        return {"adapter": self.adapter_path, "references": self.references_path, "base_model": self.core.base_model,
                "vlm": self.core.vlm_name, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "strength": self.strength, "scale": self.scale,
                "blur_sigma": self.blur_sigma, "asea_steps": self.core.csm.asea.steps, "asea_lr": self.core.csm.asea.lr,
                "torch_dtype": str(resolve_dtype(self.torch_dtype)).removeprefix("torch."),
                **self._base_config()}  # fmt: skip

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        params = super().sample_params(images, fg_masks, generator)
        params["reference"] = randint(0, len(self.references) - 1, (images.shape[0],), generator, images.device)
        return params

    def reference_features(self, indices: list[int]) -> Tensor:
        """CSM (+ ASEA) features of the references, computed once per reference and kept."""
        from ...evaluation.data import read_mask
        from ...io import read_image, resize

        size = self.core.csm.vlm.config.vision_config.image_size
        for i in sorted(set(indices) - set(self._features)):  # one by one: a feature never depends on the others
            ref = self.references[i]
            image = resize(read_image(ref["image"]), (size, size))[None]
            mask = read_mask([Path(ref["mask"])], (size, size))[None, None] if ref["mask"] else None
            self._features[i] = self.core.reference_features(image, [ref["text"]], mask)[0].cpu()
        return torch.stack([self._features[i] for i in indices])

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        size = self.resolution
        masks = params["mask"]
        model_masks = F.interpolate(masks.float(), size=(size, size), mode="nearest")
        generated = self.core.sample(to_model_size(images, size), model_masks,
                                     [p.detailed_text for p in self.prompt_texts(params)],
                                     self.reference_features(params["reference"].tolist()), params["seed"],
                                     self.num_inference_steps, self.guidance_scale, self.strength, self.scale)  # fmt: skip
        out = F.interpolate(generated.float().to(images.device), size=images.shape[-2:], mode="bicubic",
                            antialias=True, align_corners=False).clamp(0, 1)  # fmt: skip
        if images.shape[1] == 1:
            out = out.mean(1, keepdim=True)
        sigma = max(self.blur_sigma * images.shape[-1] / 512, 1e-3)
        k = 2 * int(3 * sigma) + 1
        soft = gaussian_blur2d(masks.float(), (k, k), (sigma, sigma)) if k > 1 else masks.float()
        soft = torch.where(soft > 1e-3, soft, torch.zeros_like(soft))  # exactly the input where the blur is ~0
        result = torch.where(soft > 0, torch.lerp(images.float(), out, soft).to(images.dtype), images)
        return self._result(images, result, masks, params, self._param_keys)
