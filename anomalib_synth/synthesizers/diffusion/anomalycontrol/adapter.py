"""AnomalyControl's Semantic Guided Adapter (SGA, Sec. 3.4 of He et al., arXiv 2412.06510): the only trained part.

CSM feature -> ``Linear(d_qformer -> 1024)`` (the official ``BlipProjModel``) -> diffusers' IP-Adapter
``ImageProjection`` (1024 -> 4 tokens, the UNet's ``encoder_hid_proj``) -> diffusers' ``IPAdapterAttnProcessor2_0``
on the cross-attention layers only: ``Attn(Q, K_txt, V_txt) + s Attn(Q, K_ip, V_ip)``. The new ``K_ip``/``V_ip``
start from the text ``K``/``V`` (:meth:`SemanticGuidedAdapter.for_unet`), or from the IP-Adapter SD 1.5
checkpoint as the official training (:meth:`SemanticGuidedAdapter.load_ip_adapter`, ``--init-adapter``).

The adapter is a diffusers ``ModelMixin`` + ``ConfigMixin``: it owns the projections *and* the new K/V (the
processors it installs in the UNet are its own modules, shared), so ``save_pretrained`` / ``from_pretrained`` write
and read the whole adapter (``config.json`` + ``diffusion_pytorch_model.safetensors``). The config also records the
UNet layers the K/V belong to, the scale ``s`` it was trained at, the base model and VLM it was trained with, the
IP-Adapter it started from and the training images (``training_data``, read by the leakage check of
``anomalib_synth.training.leakage``).

The folders written before (``sga_config.json`` + ``sga.safetensors``) still load, with a ``DeprecationWarning``
(:func:`read_old_format`); saving again writes the diffusers format.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from ..loading import ModelNotFoundError

__all__ = [
    "CONFIG_NAME",
    "OLD_CONFIG",
    "OLD_WEIGHTS",
    "SemanticGuidedAdapter",
    "adapter_format",
    "cross_attention_layers",
    "read_ip_adapter",
    "read_old_format",
]

CONFIG_NAME = "config.json"
"""diffusers' config file of a saved adapter (the weights are ``diffusion_pytorch_model.safetensors``)."""
OLD_CONFIG, OLD_WEIGHTS = "sga_config.json", "sga.safetensors"
"""The adapter folder format before the SGA was a diffusers model (read with a ``DeprecationWarning``)."""
OLD_DEFAULT_SCALE = 0.5
"""The scale of old-format adapters saved before the scale was recorded (they trained at 0.5)."""


def cross_attention_layers(unet: Any) -> dict[str, tuple[int, int]]:
    """The UNet's cross-attention layers (``attn2``), in the UNet's order: name -> (hidden size, context width)."""
    from diffusers.models.attention_processor import Attention

    return {name: (module.to_k.out_features, module.to_k.in_features) for name, module in unet.named_modules()
            if isinstance(module, Attention) and name.endswith("attn2")}  # fmt: skip


class SemanticGuidedAdapter(ModelMixin, ConfigMixin):
    """SGA (Sec. 3.4): CSM feature -> ``Linear`` -> ``ImageProjection`` tokens -> decoupled cross-attention.

    Args:
        feature_dim (int): width of the CSM feature (the Q-Former's hidden size, 768 for BLIP-2).
        cross_attention_dim (int): the UNet's context width (768 for SD 1.5).
        image_embed_dim (int): width between the BLIP projection and the image projection. Defaults to ``1024``.
        num_tokens (int): image tokens. Defaults to ``4``.
        layers (list[str]): the UNet's cross-attention layers that get new K/V (:func:`cross_attention_layers`).
        hidden_sizes (list[int]): the hidden size of each of ``layers``.
        scale (float): ``s``, the scale it trains at, and so the default at inference. Defaults to ``1.0``.
        base_model (str | None), vlm (str | None): what it was trained with (the defaults for loading).
        init_adapter (str | None): the IP-Adapter checkpoint the training started from, if any.
        training_data (dict | None): the training images (``anomalib_synth.training.leakage.training_data``).

    Build one for a UNet with :meth:`for_unet`; :meth:`install` puts its image projection into
    ``unet.encoder_hid_proj`` (diffusers' IP-Adapter route) and its processors on the ``attn2`` layers.
    """

    @register_to_config
    def __init__(self, feature_dim: int, cross_attention_dim: int, image_embed_dim: int = 1024, num_tokens: int = 4,
                 layers: list[str] | tuple[str, ...] = (), hidden_sizes: list[int] | tuple[int, ...] = (),
                 scale: float = 1.0, base_model: str | None = None, vlm: str | None = None,
                 init_adapter: str | None = None, training_data: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__()
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
        from diffusers.models.embeddings import ImageProjection

        if len(layers) != len(hidden_sizes):
            msg = f"SGA: {len(layers)} layers but {len(hidden_sizes)} hidden sizes"
            raise ValueError(msg)
        self.blip_proj = nn.Linear(feature_dim, image_embed_dim)
        self.image_proj = ImageProjection(image_embed_dim, cross_attention_dim, num_tokens)
        self.ip_attention = nn.ModuleList(
            IPAdapterAttnProcessor2_0(size, cross_attention_dim, num_tokens=(num_tokens,), scale=scale)
            for size in hidden_sizes
        )

    @classmethod
    def for_unet(cls, unet: Any, feature_dim: int, image_embed_dim: int = 1024, num_tokens: int = 4,
                 **config: Any) -> SemanticGuidedAdapter:  # fmt: skip
        """A new SGA for ``unet``: K/V on every ``attn2`` layer, initialised from its text K/V (as the official
        code, before it loads IP-Adapter); random projections. ``config``: ``scale``, ``base_model`` ..."""
        layers = cross_attention_layers(unet)
        sga = cls(feature_dim, unet.config.cross_attention_dim, image_embed_dim, num_tokens, list(layers),
                  [size for size, _ in layers.values()], **config)  # fmt: skip
        for name, proc in zip(layers, sga.ip_attention, strict=True):
            module = unet.get_submodule(name)
            proc.to_k_ip[0].weight.data.copy_(module.to_k.weight.data)
            proc.to_v_ip[0].weight.data.copy_(module.to_v.weight.data)
        return sga

    def forward(self, features: Tensor) -> Tensor:
        """``[B, feature_dim]`` -> ``[B, 1, image_embed_dim]`` (the ``image_embeds`` the UNet projects to tokens)."""
        return self.blip_proj(features).unsqueeze(1)

    def processors(self) -> dict[str, nn.Module]:
        """The decoupled cross-attention processors, by UNet attention layer name."""
        return dict(zip(self.config.layers, self.ip_attention, strict=True))

    def install(self, unet: Any, scale: float | None = None) -> None:
        """Put this adapter's own modules into ``unet`` (shared, not copied), at ``scale`` (default: the config's).

        Raises:
            ValueError: when the adapter's layers or widths do not fit ``unet`` (another base model).
        """
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        if not self.config.layers:
            msg = ("this SGA was built without UNet layers: build a new one with SemanticGuidedAdapter.for_unet(unet, "
                   "feature_dim, ...), which creates the K/V of every cross-attention layer of that UNet")  # fmt: skip
            raise ValueError(msg)
        layers = cross_attention_layers(unet)
        wanted = {name: (size, self.config.cross_attention_dim)
                  for name, size in zip(self.config.layers, self.config.hidden_sizes, strict=True)}  # fmt: skip
        if layers != wanted:
            wrong = sorted(set(layers.items()) ^ set(wanted.items()))[:3]
            msg = f"SGA layers do not fit this UNet (another base model?): first differences {wrong}"
            raise ValueError(msg)
        processors = dict(unet.attn_processors)
        processors.update({f"{name}.processor": proc for name, proc in self.processors().items()})
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([self.image_proj])
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        self.set_scale(unet, self.config.scale if scale is None else scale)

    @staticmethod
    def set_scale(unet: Any, scale: float) -> None:
        for proc in unet.attn_processors.values():
            if hasattr(proc, "scale") and isinstance(proc.scale, list):
                proc.scale = [scale] * len(proc.scale)

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
        index = {name.removesuffix(".processor"): i for i, name in enumerate(unet.attn_processors)}
        kv = {}
        for j, name in enumerate(self.config.layers):
            for which in ("to_k_ip", "to_v_ip"):
                key = f"{index.get(name)}.{which}.weight"
                if key not in layers:
                    msg = f"IP-Adapter checkpoint has no {key!r} for {name} (a checkpoint for another UNet?)"
                    raise ValueError(msg)
                kv[f"ip_attention.{j}.{which}.0.weight"] = layers[key]
        own_kv = {k: v for k, v in self.state_dict().items() if k.startswith("ip_attention.")}
        bad = [k for k in own_kv if kv[k].shape != own_kv[k].shape]
        if bad:
            msg = f"IP-Adapter K/V do not fit this UNet: {bad[:3]}"
            raise ValueError(msg)
        self.image_proj.load_state_dict({k: v.to(own[k]) for k, v in renamed.items()})
        self.load_state_dict({k: v.to(own_kv[k]) for k, v in kv.items()}, strict=False)


def adapter_format(folder: str | Path) -> str | None:
    """``"diffusers"`` (``config.json``), ``"old"`` (``sga_config.json`` + ``sga.safetensors``) or ``None``."""
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():
        return "diffusers"
    if (folder / OLD_CONFIG).is_file() and (folder / OLD_WEIGHTS).is_file():
        return "old"
    return None


def read_old_format(folder: str | Path, unet: Any) -> SemanticGuidedAdapter:
    """An SGA from a folder in the format written before it was a diffusers model, with a ``DeprecationWarning``.

    That format held the projections under ``sga.*`` and the new K/V under the UNet's own names
    (``unet.<layer>.processor.to_k_ip.0.weight``) in ``sga.safetensors``, and the settings (and, once recorded, the
    scale) in ``sga_config.json``. Re-save with ``save_pretrained`` (or ``AnomalyControlModel.save_adapter``).

    Raises:
        ModelNotFoundError: when the folder holds no old-format adapter. ValueError: when it does not fit ``unet``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if adapter_format(folder) != "old":
        msg = f"AnomalyControl adapter: {str(folder)!r} has no {OLD_CONFIG} + {OLD_WEIGHTS}"
        raise ModelNotFoundError(msg)
    warnings.warn(f"AnomalyControl adapter {str(folder)!r} is in the old format ({OLD_CONFIG} + {OLD_WEIGHTS}); "
                  "re-save it with AnomalyControlModel(adapter=...).save_adapter(DIR) (diffusers' config.json + "
                  "safetensors); the old format will not be read in a later release",
                  DeprecationWarning, stacklevel=3)  # fmt: skip
    settings = json.loads((folder / OLD_CONFIG).read_text())
    state = load_file(str(folder / OLD_WEIGHTS))
    provenance = {key: settings.get(key) for key in ("base_model", "vlm", "init_adapter", "training_data")}
    sga = SemanticGuidedAdapter.for_unet(unet, settings["feature_dim"], settings.get("image_embed_dim", 1024),
                                         settings.get("num_tokens", 4),
                                         scale=float(settings.get("scale", OLD_DEFAULT_SCALE)), **provenance)  # fmt: skip
    if settings.get("cross_attention_dim", sga.config.cross_attention_dim) != sga.config.cross_attention_dim:
        msg = f"AnomalyControl adapter {str(folder)!r} does not fit this UNet (context width)"
        raise ValueError(msg)
    converted = {key[len("sga.") :]: value for key, value in state.items() if key.startswith("sga.")}
    position = {name: j for j, name in enumerate(sga.config.layers)}
    unexpected = []
    for key, value in state.items():
        layer, _, rest = key[len("unet.") :].partition(".processor.")
        if key.startswith("unet.") and layer in position and rest in ("to_k_ip.0.weight", "to_v_ip.0.weight"):
            converted[f"ip_attention.{position[layer]}.{rest}"] = value
        elif not key.startswith("sga."):
            unexpected.append(key)
    own = sga.state_dict()
    missing = sorted(set(own) - set(converted))
    if unexpected or missing or any(converted[k].shape != own[k].shape for k in own):
        msg = (f"AnomalyControl adapter {str(folder)!r} does not fit this base model: unexpected {unexpected[:3]}, "
               f"missing {missing[:3]}")  # fmt: skip
        raise ValueError(msg)
    sga.load_state_dict(converted)
    return sga


def read_ip_adapter(source: str | Path, local_files_only: bool | None = None) -> dict[str, Any]:
    """An IP-Adapter checkpoint from a local ``.bin``/``.safetensors`` file or a Hub file ``OWNER/REPO/PATH``
    (e.g. ``h94/IP-Adapter/models/ip-adapter_sd15.safetensors``), as ``{"image_proj": {...}, "ip_adapter": {...}}``.

    Raises:
        ModelNotFoundError: when the file is neither local nor downloadable (or cached).
    """
    from ..loading import hub_file

    path = hub_file(source, "AnomalyControl: IP-Adapter initialisation (--init-adapter)", local_files_only)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        nested: dict[str, dict[str, Tensor]] = {}
        for key, value in load_file(str(path)).items():
            group, _, rest = key.partition(".")
            nested.setdefault(group, {})[rest] = value
        return nested
    return torch.load(path, map_location="cpu", weights_only=True)
