"""What the diffusion synthesizers share: prompt choice, mask drawing, seeds, model resolution and paste-back.

``sample_params`` draws, for the whole batch and from the caller's generator only: a defect mask (a Perlin blob of
:class:`~anomalib_synth.synthesizers.perlin.PerlinSynthesizer`, on the object when ``foreground="auto"``), a prompt
index and a noise seed per sample. ``apply`` is then deterministic: each sample's diffusion noise comes from its own
generator seeded with its seed, so a sample does not depend on the rest of its batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Params, Synthesizer
from ..ops import randint
from ..perlin import PerlinSynthesizer
from ..placement import DEFAULT_FOREGROUND, check_foreground_mode, resolve_foreground
from ..validation import check_range
from .latents import vae_scale_factor
from .prompts import AnomalyPrompt, prompts_for

__all__ = ["DiffusionSynthesizer", "composite", "load_references", "restartable_scheduler", "to_model_size"]

SEED_HIGH = 2**31 - 1


def to_model_size(images: Tensor, size: int) -> Tensor:
    """Resize ``[B, C, H, W]`` images (1 or 3 channels) to the model's square ``size`` as RGB float32."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return x


def restartable_scheduler(config: Any) -> Any:
    """A ``DDIMScheduler`` built from any Stable Diffusion scheduler config: stateless, so correct when sampling
    starts partway into the schedule or the latent is edited between steps.

    Checkpoints ship other schedulers (SD 1.5: ``PNDMScheduler``, whose PLMS step is stateful: its second call
    steps from the sample it stored on the first call, so an edit made in between is lost and the latent lags the
    schedule by one step). The noise schedule (betas, ``steps_offset``, ``timestep_spacing`` ...) is kept;
    ``clip_sample`` defaults to ``False`` (latents are not in ``[-1, 1]``) when the config does not say.
    """
    from diffusers import DDIMScheduler

    overrides = {} if "clip_sample" in config else {"clip_sample": False}
    return DDIMScheduler.from_config(config, **overrides)


def composite(images: Tensor, generated: Tensor, masks: Tensor) -> Tensor:
    """Generated pixels (model size, RGB) inside ``masks`` (input size), the input's own pixels elsewhere."""
    out = F.interpolate(generated.float(), size=images.shape[-2:], mode="bicubic", antialias=True, align_corners=False)
    out = out.clamp(0, 1)
    if images.shape[1] == 1:
        out = out.mean(1, keepdim=True)
    return torch.where(masks, out.to(images.dtype), images)


def load_references(references: str | Path) -> list[dict[str, Any]]:
    """Reference defects from a JSON list (``[{"image": path, "text": str, "mask": path?}, ...]``, paths relative
    to the file) or a folder of images (text = file stem with ``_`` as spaces; ``<stem>_mask.png`` is the mask of
    ``<stem>.png``). Used by ``anomalycontrol`` and ``xfusion`` (which needs the masks).

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


class DiffusionSynthesizer(Synthesizer):
    """Base of the diffusion synthesizers (not registered itself).

    Args:
        category (str | None): MVTec AD / VisA category for the prompt vocabulary (see
            :mod:`~anomalib_synth.synthesizers.diffusion.prompts`). Defaults to ``None`` (a generic object).
        object_name (str | None): the object's name in prompts. Defaults to the vocabulary's.
        defects (list[str] | None): defect words to draw from. Defaults to the vocabulary's.
        captions (str | Path | None): MVTec-Caption-style JSON for detailed descriptions. Defaults to ``None``.
        prompts (list[AnomalyPrompt] | None): explicit prompts; override the four options above.
        foreground (str): ``"none"`` or ``"auto"`` (defects on the object). Defaults to ``"auto"``.
        mask_area (tuple[float, float]): fraction of the foreground each drawn mask covers. Defaults to
            ``(0.02, 0.1)``.
        resolution (int | None): side the model runs at. Defaults to the UNet's native size (512 for SD 1.5).
        progress (bool): show the per-call denoising progress bar. Defaults to ``False``.
        device (str | torch.device | None): where the models go once loaded. Defaults to ``None`` (stay on the CPU
            until ``.to(device)``; ``anomalib-synth generate`` and the datamodule move synthesizers themselves).
    """

    requires_weights = True
    kind = "diffusion"
    draws_masks: bool = True
    """Whether :meth:`sample_params` draws a defect mask (methods whose mask comes from the model set ``False``)."""

    def __init__(
        self,
        category: str | None = None,
        object_name: str | None = None,
        defects: list[str] | None = None,
        captions: str | Path | None = None,
        prompts: list[AnomalyPrompt] | None = None,
        foreground: str = DEFAULT_FOREGROUND,
        mask_area: tuple[float, float] = (0.02, 0.1),
        resolution: int | None = None,
        progress: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.category, self.object_name = category, object_name
        self.defects = None if defects is None else list(defects)
        self.captions = None if captions is None else str(captions)
        self._explicit_prompts = bool(prompts)
        self.prompts = list(prompts) if prompts else prompts_for(category, object_name, self.defects, captions)
        if not self.prompts:
            msg = "no prompts: give a category, defects or prompts"
            raise ValueError(msg)
        self.foreground = check_foreground_mode(foreground)
        self.mask_area = check_range("mask_area", mask_area, 1e-4, 1.0)
        self.masker = PerlinSynthesizer(area_range=self.mask_area, scale_range=(0, 3), foreground="none")
        self._resolution = resolution
        self.progress = progress
        self.device = device

    def _loaded(self) -> None:
        """Freeze the loaded models and move them to ``device`` (subclasses call this at the end of ``__init__``)."""
        for module in self.children():
            module.requires_grad_(False).eval()
        if self.device is not None:
            self.to(self.device)

    @property
    def resolution(self) -> int:
        """Side length the model runs at: ``resolution`` if given, else the UNet's native size."""
        unet, vae = self._unet_and_vae()
        return self._resolution or unet.config.sample_size * vae_scale_factor(vae)

    def _unet_and_vae(self) -> tuple[Any, Any]:
        return self.unet, self.vae

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        b, device = images.shape[0], images.device
        fg = resolve_foreground(images, fg_masks, self.foreground)
        params = {
            "fg": torch.ones_like(images[:, :1], dtype=torch.bool) if fg is None else fg,
            "prompt": randint(0, len(self.prompts) - 1, (b,), generator, device),
            "seed": randint(0, SEED_HIGH, (b,), generator, device),
        }
        if self.draws_masks:
            params["mask"] = self.masker.sample_masks(images, fg, generator)
        return params

    def prompt_texts(self, params: Params) -> list[AnomalyPrompt]:
        return [self.prompts[i] for i in params["prompt"].tolist()]

    @property
    def model_device(self) -> torch.device:
        return next(self.parameters()).device


class ReferenceDefectSynthesizer(DiffusionSynthesizer):
    """Base of the methods steered by reference defects (AnomalyXFusion, AnomalyControl): each sample draws one of
    ``self.references`` (recorded as the ``reference`` param), and :attr:`source_images` lists the images the
    synthesizer has seen, its adapter's training images (:attr:`training_data`) and the references, for the
    evaluation's leakage check."""

    references: list[dict[str, Any]]
    _param_keys = ("prompt", "seed", "reference")

    @property
    def training_data(self) -> dict[str, Any] | None:
        """The training images recorded with the adapter (``None`` when unknown)."""
        raise NotImplementedError

    @property
    def source_images(self) -> list[str]:
        """Images this synthesizer has seen: its adapter's training images and its references."""
        trained = [entry["image"] for entry in (self.training_data or {}).get("images", [])]
        return list(dict.fromkeys([*trained, *(reference["image"] for reference in self.references)]))

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        params = super().sample_params(images, fg_masks, generator)
        params["reference"] = randint(0, len(self.references) - 1, (images.shape[0],), generator, images.device)
        return params
