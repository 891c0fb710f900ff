"""The optional LoRA on the UNet's cross-attention (peft), saved in diffusers' LoRA format.

*Departure* (Sec. 4.2-4.3): the paper fine-tunes the conditioning of its LDM; we keep SD 1.5 frozen and can add a
LoRA (rank ``lora_rank``, ``alpha = rank``) on the cross-attention projections, which read the new X-embedding
tokens. The LoRA is saved as ``pytorch_lora_weights.safetensors`` with ``unet.``-prefixed keys, the file
``StableDiffusionPipeline.save_lora_weights`` writes (so ``pipe.load_lora_weights(adapter_folder)`` reads it too).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from torch import Tensor, nn

from ..loading import ModelNotFoundError
from .legacy import legacy_lora_state

__all__ = ["LORA_TARGETS", "LORA_WEIGHTS", "add_lora", "load_lora", "lora_state", "save_lora"]

LORA_TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""diffusers' LoRA file name (``LORA_WEIGHT_NAME_SAFE``)."""
PREFIX = "unet."


def add_lora(unet: nn.Module, rank: int, state: dict[str, Tensor] | None = None) -> None:
    """Add a LoRA of ``rank`` to ``unet``'s cross-attention projections; load peft's ``state`` (unprefixed) if given.

    Raises:
        ImportError: without peft.
    """
    try:
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
    except ImportError as error:
        msg = "LoRA needs peft: pip install peft (or use lora_rank=0)"
        raise ImportError(msg) from error
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    if state is not None:
        set_peft_model_state_dict(unet, state)


def lora_state(unet: nn.Module) -> dict[str, Tensor]:
    """peft's state dict of ``unet``'s LoRA (keys without prefix or adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(unet: nn.Module | None, folder: str | Path, state: dict[str, Tensor] | None = None) -> Path:
    """Write ``unet``'s LoRA (or a peft ``state`` dict) to ``folder/pytorch_lora_weights.safetensors`` (diffusers'
    LoRA format)."""
    from diffusers import StableDiffusionPipeline

    options = {}
    supports_metadata = (
        "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters
    )
    if supports_metadata and unet is not None:
        options["unet_lora_adapter_metadata"] = unet.peft_config["default"].to_dict()  # diffusers >= 0.35
    layers = lora_state(unet) if state is None else state
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_WEIGHTS, **options)
    return Path(folder) / LORA_WEIGHTS


def load_lora(unet: nn.Module, rank: int, folder: str | Path) -> None:
    """Add the LoRA saved in adapter ``folder`` (diffusers' format, or ``lora.safetensors`` of the old format).

    Raises:
        ModelNotFoundError: when the folder holds no LoRA although its config has ``lora_rank > 0``.
    """
    from safetensors.torch import load_file

    path = Path(folder) / LORA_WEIGHTS
    if path.is_file():
        state = {k.removeprefix(PREFIX): v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)}
    else:
        state = legacy_lora_state(folder)
    if not state:
        msg = f"AnomalyXFusion adapter: {str(folder)!r} has lora_rank={rank} in its config but no {LORA_WEIGHTS}"
        raise ModelNotFoundError(msg)
    add_lora(unet, rank, state)
