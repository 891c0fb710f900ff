"""Loading of diffusion and CLIP components: a hub id or a local folder, through the ordinary ``from_pretrained``.

Every component of every diffusion synthesizer goes through :func:`load_pretrained`, which calls the class's own
``from_pretrained`` (diffusers pipelines and models, transformers models and tokenizers) and turns "the weights are
not there" into one :class:`ModelNotFoundError` that says which model, where it looked and how to fix it. There is
no silent fallback to random weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelNotFoundError

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"""Stable Diffusion 1.5 (the ``runwayml`` repository was deleted from the Hub in 2024; this is its mirror)."""
SD15_INPAINTING = "stable-diffusion-v1-5/stable-diffusion-inpainting"
"""Stable Diffusion 1.5 inpainting (9-channel UNet)."""
CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
"""OpenAI CLIP ViT-L/14 (AnomalyAny's image loss)."""

__all__ = [
    "CLIP_VIT_L14",
    "SD15",
    "SD15_INPAINTING",
    "ModelNotFoundError",
    "hub_file",
    "load_pretrained",
    "resolve_dtype",
]


def _missing_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        errors += [HfHubHTTPError, HFValidationError]
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass
    return tuple(errors)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"float16"``/``"fp16"``/``torch.float16`` ... -> a torch dtype (``None`` -> float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        msg = f"unknown torch dtype {dtype!r}; use float32, float16 or bfloat16"
        raise ValueError(msg)
    return value


def _dtype_keyword(cls: Any) -> str:
    """``dtype`` where the library takes it (diffusers and transformers renamed ``torch_dtype``), else ``torch_dtype``."""
    library = cls.__module__.split(".")[0]
    if library == "transformers":
        import transformers

        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    if library == "diffusers":
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    return "dtype"


def load_pretrained(
    cls: Any,
    model: str | os.PathLike,
    what: str,
    local_files_only: bool | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(model, **kwargs)``, with one clear error when the weights cannot be found.

    Args:
        cls: a class with ``from_pretrained`` (a diffusers pipeline or model, a transformers model or tokenizer).
        model (str | os.PathLike): a Hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``) or a local folder
            written by ``save_pretrained``.
        what (str): what the component is for, named in the error (e.g. ``"AnomalyAny: Stable Diffusion 1.5"``).
        local_files_only (bool | None, optional): never contact the Hub. ``None`` follows ``HF_HUB_OFFLINE``.
            Defaults to ``None``.
        dtype (torch.dtype | None, optional): weights dtype, passed under the name the library expects.
        **kwargs: passed to ``from_pretrained`` (``subfolder`` ...).

    Returns:
        The loaded object.

    Raises:
        ModelNotFoundError: when the folder does not exist and the id is neither cached nor downloadable.
    """
    model = str(model)
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}
    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith((".", "~")) or path.exists() or model.count("/") > 1
    if looks_local and not path.exists():
        msg = (
            f"{what}: the folder {model!r} does not exist. Pass a Hub id (e.g. {SD15!r}) or a folder written by "
            "`save_pretrained` / `hf download <id> --local-dir <folder>`."
        )
        raise ModelNotFoundError(msg)
    if dtype is not None:
        kwargs[_dtype_keyword(cls)] = dtype
    try:
        return cls.from_pretrained(str(path) if path.exists() else model, local_files_only=local_files_only, **kwargs)
    except _missing_errors() as error:
        where = f"the local folder {str(path)!r}" if path.exists() else f"the Hugging Face cache ({_hub_cache()})"
        if not path.exists() and not local_files_only:
            where += " and the Hugging Face Hub"
        fix = (
            f"on a machine with internet run `hf download {model} --local-dir DIR`, copy DIR here and "
            "pass its path instead of the id"
        )
        if not local_files_only:
            fix += "; or check the id and your network / HF_TOKEN"
        msg = (
            f"{what}: could not load {cls.__name__} from {model!r}; looked in {where}. Fix: {fix}. "
            f"Cause: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        )
        raise ModelNotFoundError(msg) from error


def hub_file(source: str | os.PathLike, what: str, local_files_only: bool | None = None) -> Path:
    """A single weights file: a local path, else a Hub file ``OWNER/REPO/PATH/IN/REPO`` (downloaded or cached).

    Raises:
        ModelNotFoundError: when it is neither a local file nor a reachable (or cached) Hub file.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}
    parts = str(source).split("/")
    if path.is_absolute() or str(source).startswith((".", "~")) or len(parts) < 3:
        msg = f"{what}: {str(source)!r} is neither a file nor a Hub file OWNER/REPO/PATH"
        raise ModelNotFoundError(msg)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), local_files_only=local_files_only))
    except _missing_errors() as error:
        msg = (f"{what}: could not get {str(source)!r} from the Hugging Face cache ({_hub_cache()})"
               f"{'' if local_files_only else ' or the Hub'}; download it on a machine with internet and pass the "
               f"local file. Cause: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")  # fmt: skip
        raise ModelNotFoundError(msg) from error


def _hub_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"
