"""Whether a synthesizer can run here: weights-free ones always; the diffusion ones when their weights are reachable.

"Reachable" means on this machine, never a download: the explorer builds synthesizers with ``local_files_only=True``
(multi-gigabyte downloads do not start from a web page), so a Hub id counts when the Hugging Face cache holds it and
a folder when it exists. The answer is a one-line reason, or ``None`` when the synthesizer can run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import USER_ERRORS
from ..synthesizers import Synthesizer
from ..synthesizers.registry import constructor_arguments

__all__ = ["HUB_ID", "offline_arguments", "unavailable_reason", "weights_cached"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""What a Hugging Face Hub model id looks like (``owner/name``)."""

WEIGHT_FILES = ("model_index.json", "config.json", "adapter_config.json")
"""A cached snapshot of a diffusers pipeline, a transformers/diffusers model or an adapter holds one of these."""


def weights_cached(model: str) -> bool:
    """Whether ``model`` (a Hub id) is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return False
    return any(isinstance(try_to_load_from_cache(model, name), str) for name in WEIGHT_FILES)


def offline_arguments(cls: type[Synthesizer]) -> dict[str, Any]:
    """``{"local_files_only": True}`` for synthesizers that take it (never download from the explorer)."""
    accepted = constructor_arguments(cls)
    return {"local_files_only": True} if accepted is not None and "local_files_only" in accepted else {}


def unavailable_reason(
    cls: type[Synthesizer], defaults: Mapping[str, Any], arguments: Mapping[str, Any] | None = None
) -> str | None:
    """Why ``cls`` cannot run with ``arguments`` over ``defaults`` here (one line), or ``None`` when it can.

    A synthesizer without weights can always run. For one with weights, every argument that names a Hub id must be
    cached and every one that names a path must exist; when no argument names weights (adapters that must be given),
    the constructor is tried offline and its own error is the reason.
    """
    if not cls.requires_weights:
        return None
    values = {**defaults, **(arguments or {})}
    named = {k: str(v) for k, v in values.items() if isinstance(v, (str, Path)) and _names_weights(str(v))}
    for key, model in named.items():
        if Path(model).expanduser().exists():
            continue
        if HUB_ID.match(model) and weights_cached(model):
            continue
        where = "the folder does not exist" if not HUB_ID.match(model) else "not in the Hugging Face cache"
        return (f"weights {key}={model!r} are not reachable offline ({where}); download them with "
                f"`hf download {model} --local-dir DIR` and set {key} to DIR")  # fmt: skip
    if named:
        return None
    from ..errors import one_line

    try:
        cls(**{**(arguments or {}), **offline_arguments(cls)})
    except (*USER_ERRORS, ImportError) as err:
        return one_line(err)
    return None


def _names_weights(value: str) -> bool:
    return bool(HUB_ID.match(value)) or value.startswith(("/", "./", "../", "~"))
