"""AnomalyControl: cross-modal semantic features for controllable anomaly synthesis (He et al., arXiv 2412.06510).

A reference defect (image + text [+ mask]) steers Stable Diffusion 1.5 inpainting of a target mask on a normal image:

- :class:`CrossModalSemanticModeling` (CSM, Sec. 3.2): a frozen BLIP-2 (vision tower + Q-Former, transformers'
  ``Blip2ForImageTextRetrieval``) encodes the reference image (224 px for the real model) and its text in the
  Q-Former's multimodal mode; the query tokens are averaged to one vector (as the official code does).
- :class:`AnomalySemanticEnhancedAttention` (ASEA, Sec. 3.3): an attention guidance variable ``e_g``,
  zero-initialised and, as in the official code, added to the detached output of the frozen vision tower
  (``ln_vision(visual_encoder(image))``; transformers: ``vision_model(...).last_hidden_state``), optimised per
  sample (official: 5 Adam steps, lr 0.1) with ``(1 - sum(A M) / sum(A))^2``, ``A`` the Q-Former cross-attention
  (averaged over layers, heads and queries, without the CLS patch) and ``M`` the reference mask on the patch grid.
  Each step runs the Q-Former only: the vision tower (EVA ViT-g, about 1B parameters) runs once and gets no
  gradient. The features are those of the last optimisation forward, as the official code. This is test-time
  optimisation inside the frozen VLM, as the official code (the paper calls ``e_g`` trainable).
- :class:`SemanticGuidedAdapter` (SGA, Sec. 3.4): ``Linear(d_qformer -> 1024)`` (the official ``BlipProjModel``), then
  diffusers' IP-Adapter ``ImageProjection`` (1024 -> 4 tokens) as the UNet's ``encoder_hid_proj``, and diffusers'
  ``IPAdapterAttnProcessor2_0`` on the cross-attention layers only: ``Attn(Q, K_txt, V_txt) + s Attn(Q, K_ip,
  V_ip)``, with ``K_ip``/``V_ip`` initialised from the text ``K``/``V``. The official training then loads the
  IP-Adapter SD 1.5 checkpoint (image projection and ``K_ip``/``V_ip``); ``init_adapter`` (``anomalib-synth train
  control --init-adapter FILE|OWNER/REPO/PATH``) does the same. *Without it* (our default, since it needs a
  download) the image projection starts random and ``K_ip``/``V_ip`` from the text projections, so training starts
  from scratch rather than from an adapter that already maps image features to the UNet.

Training (Sec. 3.5) updates only the SGA (projection, image projection, new K/V) with the noise-prediction MSE of the
9-channel inpainting UNet, dropping the image (a zero CSM feature) / text / both conditions 5 % of the time each
(for classifier-free guidance). The reference of each target is, by default, the target itself (image, caption and
mask), as the official training; its CSM feature is computed once per image and cached. The SGA scale is ``s = 1``
in training and at inference: the official training passes ``cross_attention_kwargs={"scale": 0.5}``, which
diffusers' UNet consumes as a LoRA scale and its SGA processors ignore, so they train at their own scale 1.0, and
its inference uses 1.0. Inference uses diffusers' ``StableDiffusionInpaintPipeline`` (50 steps, guidance 7,
strength 0.7) with the SGA tokens as ``ip_adapter_image_embeds``, the official negative prompt (``"monochrome,
lowres, bad anatomy, worst quality, low quality"``) and the zero-feature SGA tokens in the negative branch, and
composites the result back through the target mask blurred with ``sigma = 5`` px (at 512 px; scaled with the
resolution).
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
from .common import DiffusionSynthesizer, load_references, to_model_size
from .latents import clip_pixels, encode, latent_mask, noise_to_timestep, training_noise
from .loading import SD15_INPAINTING, ModelNotFoundError, load_pretrained, resolve_dtype

__all__ = [
    "BLIP2_ITM",
    "NEGATIVE_PROMPT",
    "AnomalyControlModel",
    "AnomalyControlSynthesizer",
    "AnomalySemanticEnhancedAttention",
    "CrossModalSemanticModeling",
    "SemanticGuidedAdapter",
    "load_references",
    "read_ip_adapter",
]

BLIP2_ITM = "Salesforce/blip2-itm-vit-g"
"""BLIP-2 (EVA ViT-g + Q-Former) image-text model in transformers format: the default VLM of the CSM."""
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "sga.safetensors", "sga_config.json"
NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
"""The official inference's default negative prompt."""


class AnomalySemanticEnhancedAttention(nn.Module):
    """ASEA (Sec. 3.3): test-time optimisation of ``e_g`` so the Q-Former looks at the reference anomaly region.

    As in the official code, ``e_g`` is added to the *detached* output of the frozen vision tower,
    ``ln_vision(visual_encoder(image))`` (transformers: ``vision_model(...).last_hidden_state``, post-layernorm
    included), so each step runs the Q-Former only and no gradient reaches the vision tower.
    """

    def __init__(self, steps: int = 5, lr: float = 0.1) -> None:
        super().__init__()
        self.steps, self.lr = int(steps), float(lr)

    @staticmethod
    def loss(attention: Tensor, masks: Tensor) -> Tensor:
        """``(1 - sum(A M) / sum(A))^2`` per sample; ``attention`` and ``masks`` are ``[B, g, g]``."""
        inside = (attention * masks).flatten(1).sum(1) / attention.flatten(1).sum(1).clamp_min(1e-12)
        return (1 - inside) ** 2

    def optimise(self, csm: CrossModalSemanticModeling, image_embeds: Tensor, input_ids: Tensor,
                 attention_mask: Tensor, masks: Tensor) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
        """Optimise ``e_g`` on the vision features ``image_embeds`` (from :meth:`CrossModalSemanticModeling.vision`).

        Returns the reference features ``[B, d]`` and the attention fraction inside the mask at each step (``[B]``
        each). As the official code, the features are those of the last optimisation forward, i.e. after
        ``steps - 1`` updates of ``e_g`` (one step leaves them unchanged).
        """
        image_embeds = image_embeds.detach()
        e_g = torch.zeros(image_embeds.shape, device=image_embeds.device, dtype=torch.float32, requires_grad=True)
        optimizer = torch.optim.Adam([e_g], lr=self.lr)  # fp32 for Adam, as the official code
        features, fractions = None, []
        with torch.enable_grad():
            for _ in range(self.steps):
                features, attention = csm.encode(image_embeds, input_ids, attention_mask, e_g)
                grid = F.interpolate(masks.float(), size=attention.shape[-2:], mode="nearest")[:, 0]
                loss = self.loss(attention, grid)
                fractions.append(1 - loss.detach().sqrt())
                optimizer.zero_grad()
                loss.sum().backward()
                optimizer.step()
        if features is None:
            with torch.no_grad():
                features = csm.encode(image_embeds, input_ids, attention_mask)[0]
        return features.detach(), fractions


class CrossModalSemanticModeling(nn.Module):
    """CSM (Sec. 3.2): frozen BLIP-2 Q-Former features of a text-image reference, ``[B, d_qformer]``.

    Args:
        vlm (str | Path): a ``Blip2ForImageTextRetrieval`` checkpoint with its tokenizer. Defaults to
            ``Salesforce/blip2-itm-vit-g``.
        asea_steps (int), asea_lr (float): ASEA's test-time optimisation (0 steps disables it). Defaults 5, 0.1.

    The Q-Former's cross-attention is read from its ``cross_attentions`` output (``output_attentions=True``, eager
    attention), which transformers returns in every version that has ``Blip2ForImageTextRetrieval``.
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

    @property
    def dim(self) -> int:
        return self.vlm.config.qformer_config.hidden_size

    def pixels(self, images: Tensor) -> Tensor:
        size = self.vlm.config.vision_config.image_size
        return clip_pixels(images.to(self.vlm.device), size, self.vlm.dtype)

    def tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        return out.input_ids.to(self.vlm.device), out.attention_mask.to(self.vlm.device)

    @torch.no_grad()
    def vision(self, pixels: Tensor) -> Tensor:
        """``ln_vision(visual_encoder(image))``: the frozen vision tower's output ``[B, 1 + patches, d]``, detached."""
        return self.vlm.vision_model(pixel_values=pixels).last_hidden_state.detach()

    def encode(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor,
               e_g: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Q-Former in multimodal mode on the vision features (plus ``e_g``): averaged query features ``[B, d]`` and
        the cross-attention on the patch grid ``[B, g, g]`` (averaged over layers, heads and queries; CLS dropped)."""
        qformer_dtype = next(self.vlm.qformer.parameters()).dtype
        hidden = image_embeds.float() if e_g is None else image_embeds.float() + e_g
        hidden = hidden.to(qformer_dtype)
        b = hidden.shape[0]
        queries = self.vlm.query_tokens.expand(b, -1, -1)
        n_query = queries.shape[1]
        embeds = self.vlm.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones(b, n_query, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], 1)  # fmt: skip
        out = self.vlm.qformer(query_embeds=embeds, query_length=n_query, attention_mask=mask,
                               encoder_hidden_states=hidden,
                               encoder_attention_mask=torch.ones(hidden.shape[:2], dtype=torch.long,
                                                                 device=hidden.device),
                               output_attentions=True, return_dict=True)  # fmt: skip
        maps = [a for a in (out.cross_attentions or ()) if torch.is_tensor(a)]
        if not maps:
            msg = ("the Q-Former returned no cross-attention maps (output_attentions=True); load BLIP-2 with "
                   "attn_implementation='eager' and a transformers version this package supports")  # fmt: skip
            raise RuntimeError(msg)
        features = out.last_hidden_state[:, :n_query].mean(1)
        attention = torch.stack(maps).mean(0).mean(1)  # layers, heads -> [B, queries, 1 + patches]
        attention = attention[:, :n_query].mean(1)[:, 1:]  # queries; drop the CLS patch
        side = int(attention.shape[-1] ** 0.5)
        return features.float(), attention.float().reshape(b, side, side)

    def forward(self, images: Tensor, texts: list[str], masks: Tensor | None = None) -> Tensor:
        """Reference features ``[B, d]``; with ``masks`` (and ASEA steps > 0), ``e_g`` is optimised first.

        The vision tower runs once, without gradient; ASEA's steps run the Q-Former only.
        """
        image_embeds = self.vision(self.pixels(images))
        input_ids, attention_mask = self.tokens(texts)
        if masks is not None and self.asea.steps > 0:
            return self.asea.optimise(self, image_embeds, input_ids, attention_mask, masks.to(image_embeds.device))[0]
        with torch.no_grad():
            return self.encode(image_embeds, input_ids, attention_mask)[0]


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

    def load_ip_adapter(self, unet: Any, state: dict[str, Any]) -> None:
        """Start from an IP-Adapter checkpoint (``ip-adapter_sd15``), as the official training does.

        ``state`` is IP-Adapter's ``{"image_proj": {proj.*, norm.*}, "ip_adapter": {"<i>.to_k_ip.weight", ...}}``,
        ``i`` the index of the layer in ``unet.attn_processors`` (1, 3, ..., 31 on SD 1.5). The image projection and
        the new K/V are loaded; the BLIP projection stays freshly initialised (it is not part of IP-Adapter).

        Raises:
            ValueError: when the checkpoint does not fit this UNet (another base model, more tokens ...).
        """
        proj, layers = state.get("image_proj"), state.get("ip_adapter")
        if not isinstance(proj, dict) or not isinstance(layers, dict):
            msg = f"not an IP-Adapter checkpoint: expected 'image_proj' and 'ip_adapter' entries, got {sorted(state)}"
            raise ValueError(msg)  # noqa: TRY004 - a wrong file, not a wrong argument type
        renamed = {k.replace("proj.", "image_embeds.", 1) if k.startswith("proj.") else k: v for k, v in proj.items()}
        own = self.image_proj.state_dict()
        if set(renamed) != set(own) or any(renamed[k].shape != own[k].shape for k in own):
            msg = (f"IP-Adapter image projection {[(k, tuple(v.shape)) for k, v in proj.items()]} does not fit this SGA "
                   f"({[(k, tuple(v.shape)) for k, v in own.items()]}): another base model or number of tokens?")  # fmt: skip
            raise ValueError(msg)
        kv = {}
        for index, name in enumerate(unet.attn_processors):
            if name.endswith("attn2.processor"):
                for which in ("to_k_ip", "to_v_ip"):
                    key = f"{index}.{which}.weight"
                    if key not in layers:
                        msg = f"IP-Adapter checkpoint has no {key!r} for {name} (a checkpoint for another UNet?)"
                        raise ValueError(msg)
                    kv[f"{name.removesuffix('.processor')}.processor.{which}.0.weight"] = layers[key]
        own_kv = SemanticGuidedAdapter.ip_state(unet)
        bad = [k for k in own_kv if k not in kv or kv[k].shape != own_kv[k].shape]
        if bad:
            msg = f"IP-Adapter K/V do not fit this UNet: {bad[:3]}"
            raise ValueError(msg)
        self.image_proj.load_state_dict({k: v.to(own[k]) for k, v in renamed.items()})
        unet.load_state_dict({k: v.to(own_kv[k]) for k, v in kv.items()}, strict=False)


def read_ip_adapter(source: str | Path, local_files_only: bool | None = None) -> dict[str, Any]:
    """An IP-Adapter checkpoint from a local ``.bin``/``.safetensors`` file or a Hub file ``OWNER/REPO/PATH``
    (e.g. ``h94/IP-Adapter/models/ip-adapter_sd15.safetensors``), as ``{"image_proj": {...}, "ip_adapter": {...}}``.

    Raises:
        ModelNotFoundError: when the file is neither local nor downloadable (or cached).
    """
    from .loading import hub_file

    path = hub_file(source, "AnomalyControl: IP-Adapter initialisation (--init-adapter)", local_files_only)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        nested: dict[str, dict[str, Tensor]] = {}
        for key, value in load_file(str(path)).items():
            group, _, rest = key.partition(".")
            nested.setdefault(group, {})[rest] = value
        return nested
    return torch.load(path, map_location="cpu", weights_only=True)


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
        scale (float): SGA scale ``s`` in training, recorded in the adapter config as the default for sampling.
            Defaults to ``1.0`` (the official training's ``cross_attention_kwargs={"scale": 0.5}`` is a LoRA scale
            that its SGA processors ignore: they train at their own scale, 1.0).
        init_adapter (str | Path | None): for a new SGA, an IP-Adapter SD 1.5 checkpoint to start from (a local
            file or a Hub file ``OWNER/REPO/PATH``), as the official training; ``None`` starts the new K/V from the
            text K/V and the projections from random. Defaults to ``None``.
    """

    def __init__(self, base_model: str | Path | None = None, vlm: str | Path | None = None,
                 adapter: str | Path | None = None, num_tokens: int = 4, image_embed_dim: int = 1024,
                 asea_steps: int = 5, asea_lr: float = 0.1, dropout: float = 0.05, scale: float = 1.0,
                 init_adapter: str | Path | None = None, torch_dtype: str | torch.dtype | None = None,
                 local_files_only: bool | None = None) -> None:  # fmt: skip
        super().__init__()
        from diffusers import StableDiffusionInpaintPipeline

        settings, state = {}, None
        if adapter is not None:
            settings, state = load_sga(adapter)
            scale = float(settings.get("scale", 0.5))  # adapters saved before the scale was recorded trained at 0.5
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
        self.sga.install(self.unet, scale=scale)
        self.init_adapter = None if init_adapter is None or state is not None else str(init_adapter)
        if self.init_adapter is not None:
            self.sga.load_ip_adapter(self.unet, read_ip_adapter(self.init_adapter, local_files_only))
        if state is not None:
            self.sga.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("sga.")})
            kv = {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
            result = self.unet.load_state_dict(kv, strict=False)
            missing = set(SemanticGuidedAdapter.ip_state(self.unet)) - set(kv)
            if result.unexpected_keys or missing:
                msg = (f"AnomalyControl adapter {str(adapter)!r} does not fit {self.base_model!r}: unexpected "
                       f"{result.unexpected_keys[:3]}, missing {sorted(missing)[:3]}")  # fmt: skip
                raise ValueError(msg)
        self.dropout, self.scale = dropout, float(scale)
        self.training_data: dict[str, Any] | None = settings.get("training_data")
        """The training images (``anomalib_synth.training.leakage.training_data``), recorded in the config."""

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
        config = {"type": "anomalycontrol", "base_model": self.base_model, "vlm": self.vlm_name, **self.sga.settings,
                  "scale": self.scale, "init_adapter": self.init_adapter}  # fmt: skip
        if self.training_data is not None:
            config["training_data"] = self.training_data
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

    @torch.no_grad()
    def sample(self, images: Tensor, masks: Tensor, captions: list[str], features: Tensor, seeds: Tensor,
               num_inference_steps: int = 50, guidance_scale: float = 7.0, strength: float = 0.7,
               scale: float | None = None, negative_prompt: str | None = NEGATIVE_PROMPT) -> Tensor:  # fmt: skip
        """Inpaint ``masks`` of model-size ``images`` with diffusers' pipeline; returns model-size images.

        ``scale`` defaults to the scale the SGA was trained at. With guidance, the negative branch is
        ``negative_prompt`` with the SGA tokens of a zero CSM feature (the dropped image condition of training),
        as the official inference.
        """
        SemanticGuidedAdapter.set_scale(self.unet, self.scale if scale is None else scale)
        weight = self.sga.blip_proj.weight
        features = features.to(device=weight.device, dtype=weight.dtype)
        embeds = self.sga(features).to(self.unet.dtype)
        if guidance_scale > 1:
            embeds = torch.cat([self.sga(torch.zeros_like(features)).to(self.unet.dtype), embeds])
        size = images.shape[-1]
        negative = None if negative_prompt is None or guidance_scale <= 1 else [negative_prompt] * len(captions)
        return self.pipeline(
            prompt=captions, negative_prompt=negative, image=images.to(self.unet.device),
            mask_image=masks.float().to(self.unet.device),
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


@register("anomalycontrol")
class AnomalyControlSynthesizer(DiffusionSynthesizer):
    """AnomalyControl inference: a normal image, a target mask and text, steered by a text-image reference defect.

    Args:
        references (str | Path): a JSON list or a folder of reference defects (see :func:`load_references`); the
            reference may be another object or material (the paper's generalisation).
        adapter (str | Path): a trained SGA folder (``anomalib-synth train control``). ``model`` is an alias.
        base_model (str | Path | None), vlm (str | Path | None): default to the adapter config's.
        num_inference_steps (int), guidance_scale (float), strength (float): official 50, 7, 0.7.
        scale (float | None): SGA scale ``s`` at inference. Defaults to ``None``: the scale the adapter was trained
            at (recorded in its config; 1.0), so that the image branch has the weight it had in training.
        negative_prompt (str | None): the negative text of classifier-free guidance. Defaults to the official
            ``"monochrome, lowres, bad anatomy, worst quality, low quality"``.
        blur_sigma (float): sigma of the composite mask at 512 px (scaled with the resolution). Defaults to ``5``.
        asea_steps (int), asea_lr (float): ASEA on references that have a mask. Defaults ``5``, ``0.1``.
        **kwargs: prompt, mask and resolution options of
            :class:`~anomalib_synth.synthesizers.diffusion.common.DiffusionSynthesizer`; the target text is the
            prompt's description.

    The returned mask is the target mask (as the official code); the blurred composite also softens a halo of
    ``~2 sigma`` px around it. Pixels where the blurred mask is 0 are the input's own. :attr:`source_images` lists
    the images the synthesizer has seen (the adapter's training images and the references), for the evaluation's
    leakage check.
    """

    description = "AnomalyControl: text-image reference defect -> BLIP-2 features -> IP-Adapter-style SD inpainting"
    cost = (
        "`2 x num_inference_steps x strength` UNet evaluations per image, plus, per reference (cached "
        "per synthesizer; in training, per image), one BLIP-2 vision pass and `asea_steps` Q-Former forward/backward "
        "passes (ASEA never backpropagates through the ViT-g)."
    )
    _param_keys = ("prompt", "seed", "reference")
    keeps_pixels_outside_mask = False  # the paper's blurred composite softens a halo around the mask

    def composite_weights(self, masks: Tensor) -> Tensor:
        """The blurred target mask the output is composited through: 0 (the input, bit-exact) where the blur is
        ~0, so at most ``3 sigma`` px outside the mask."""
        sigma = max(self.blur_sigma * masks.shape[-1] / 512, 1e-3)
        k = 2 * int(3 * sigma) + 1
        soft = gaussian_blur2d(masks.float(), (k, k), (sigma, sigma)) if k > 1 else masks.float()
        return torch.where(soft > 1e-3, soft, torch.zeros_like(soft))

    def affected_region(self, masks: Tensor) -> Tensor:
        return self.composite_weights(masks) > 0

    def __init__(self, references: str | Path | None = None, adapter: str | Path | None = None,
                 base_model: str | Path | None = None, vlm: str | Path | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.0, strength: float = 0.7, scale: float | None = None,
                 blur_sigma: float = 5.0, asea_steps: int = 5, asea_lr: float = 0.1,
                 negative_prompt: str | None = NEGATIVE_PROMPT, torch_dtype: str | torch.dtype | None = None,
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
        self.blur_sigma, self.torch_dtype, self.negative_prompt = blur_sigma, torch_dtype, negative_prompt
        self.core = AnomalyControlModel(base_model, vlm, adapter, asea_steps=asea_steps, asea_lr=asea_lr,
                                        torch_dtype=torch_dtype, local_files_only=local_files_only)  # fmt: skip
        self.scale = self.core.scale if scale is None else float(scale)
        self._loaded()
        self._features: dict[int, Tensor] = {}

    def _unet_and_vae(self) -> tuple[Any, Any]:
        return self.core.unet, self.core.vae

    @property
    def source_images(self) -> list[str]:
        """Images this synthesizer has seen: its adapter's training images and its references."""
        trained = [e["image"] for e in (self.core.training_data or {}).get("images", [])]
        return list(dict.fromkeys([*trained, *(r["image"] for r in self.references)]))

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        params = super().sample_params(images, fg_masks, generator)
        params["reference"] = randint(0, len(self.references) - 1, (images.shape[0],), generator, images.device)
        return params

    def reference_features(self, indices: list[int]) -> Tensor:
        """CSM (+ ASEA) features of the references, computed once per reference and kept."""
        from ...io import read_image, read_mask, resize

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
                                     self.num_inference_steps, self.guidance_scale, self.strength, self.scale,
                                     self.negative_prompt)  # fmt: skip
        out = F.interpolate(generated.float().to(images.device), size=images.shape[-2:], mode="bicubic",
                            antialias=True, align_corners=False).clamp(0, 1)  # fmt: skip
        if images.shape[1] == 1:
            out = out.mean(1, keepdim=True)
        soft = self.composite_weights(masks)
        result = torch.where(soft > 0, torch.lerp(images.float(), out, soft).to(images.dtype), images)
        return self._result(images, result, masks, params, self._param_keys)
