"""Adapter folders in the format before diffusers' (``adapter_config.json`` + ``adapter.safetensors``
[+ ``lora.safetensors``]): still loaded, with a ``DeprecationWarning``.

Re-save such an adapter in the current format with
``XFusionModel(adapter=OLD).save_adapter(NEW)``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .modules import XFusionAdapter

__all__ = ["LEGACY_ADAPTER_CONFIG", "LEGACY_ADAPTER_WEIGHTS", "LEGACY_LORA_WEIGHTS", "is_legacy_folder",
           "legacy_lora_state", "load_legacy_adapter"]  # fmt: skip

LEGACY_ADAPTER_CONFIG = "adapter_config.json"
LEGACY_ADAPTER_WEIGHTS = "adapter.safetensors"
LEGACY_LORA_WEIGHTS = "lora.safetensors"
"""peft's state dict of the UNet's LoRA (``get_peft_model_state_dict``), without a prefix."""


def is_legacy_folder(folder: str | Path) -> bool:
    """``folder`` holds an adapter in the old format (and none in the current one)."""
    folder = Path(folder)
    return (folder / LEGACY_ADAPTER_CONFIG).is_file() and (folder / LEGACY_ADAPTER_WEIGHTS).is_file()


def load_legacy_adapter(cls: type[XFusionAdapter], folder: str | Path) -> XFusionAdapter:
    """The adapter of an old-format ``folder``: its config entries become the diffusers config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    warnings.warn(
        f"{str(folder)!r} is an AnomalyXFusion adapter in the old format ({LEGACY_ADAPTER_CONFIG} + "
        f"{LEGACY_ADAPTER_WEIGHTS}); re-save it with XFusionModel(adapter=OLD).save_adapter(NEW) (diffusers' "
        "config.json + safetensors). The old format will not be read in a future release.",
        DeprecationWarning,
        stacklevel=3,
    )
    settings = json.loads((folder / LEGACY_ADAPTER_CONFIG).read_text())
    settings.pop("type", None)
    adapter = cls(**settings)
    adapter.load_state_dict(load_file(str(folder / LEGACY_ADAPTER_WEIGHTS)))
    return adapter


def legacy_lora_state(folder: str | Path) -> dict[str, Tensor] | None:
    """The LoRA state of an old-format ``folder`` (``None`` when it has none)."""
    from safetensors.torch import load_file

    path = Path(folder) / LEGACY_LORA_WEIGHTS
    return load_file(str(path)) if path.is_file() else None
