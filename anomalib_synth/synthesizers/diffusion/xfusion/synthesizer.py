"""AnomalyXFusion inference: a normal image, a mask and a caption in, an anomalous image and its exact label out.

- References (Eq. 3 at inference): the textural embedding is, as in training, the CLIP embedding of a real defect
  image times *its own* defect mask. By default the references are the adapter's training images, whose paths its
  config records (``training_data``); ``references=`` gives others.
- Label: the output mask is exactly the regenerated region, the latent cells that hold any mask pixel
  (:func:`.masks.covering_latent_mask`) mapped back to the pixel grid (:func:`.masks.regenerated_pixels`), and the
  composite pastes generated pixels there only: every pixel the label claims was regenerated, and every regenerated
  pixel is labelled. The cells reach past the drawn mask by up to a cell, so the label is cut to the foreground (the
  input is pasted back on the background): defects stay on the object, as every synthesizer's do.
- Leakage: :attr:`XFusionSynthesizer.source_images` lists the adapter's training images and the references, which
  the evaluation harness checks against its test images (:mod:`anomalib_synth.training.leakage`).

This module imports no Lightning: training lives in :mod:`.lightning_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...base import Params, SynthesisResult
from ...registry import register
from ..common import ReferenceDefectSynthesizer, composite, to_model_size
from ..loading import resolve_dtype
from .masks import regenerated_pixels
from .modules import XFusionAdapter
from .sampling import DEFAULT_GUIDANCE
from .torch_model import XFusionModel

__all__ = ["XFusionSynthesizer"]


def _reference_entries(references: str | Path | None, adapter: XFusionAdapter, category: str | None) -> list[dict]:
    """``[{"image", "masks"}]`` references: from ``references`` (see ``load_references``), else the adapter's training
    images (those of ``category`` when it has some). Every reference needs its defect mask."""
    from ..common import load_references

    if references is not None:
        entries = [{"image": e["image"], "masks": [e["mask"]] if e["mask"] else []}
                   for e in load_references(references)]  # fmt: skip
        missing = [e["image"] for e in entries if not e["masks"]]
        if missing:
            msg = (f"AnomalyXFusion embeds a reference defect times its own mask, as in training (Eq. 3); no mask for "
                   f"{missing[:3]} (give <stem>_mask.png next to <stem>.png, or 'mask' in the JSON list)")  # fmt: skip
            raise ValueError(msg)
        return entries
    images = (adapter.training_data or {}).get("images", [])
    if category is not None and any(e["category"] == Path(category).name for e in images):
        images = [e for e in images if e["category"] == Path(category).name]
    entries = [{"image": e["image"], "masks": list(e["masks"])} for e in images]
    if not entries or not all(Path(p).is_file() for e in entries for p in [e["image"], *e["masks"]]):
        msg = ("XFusionSynthesizer needs references=PATH (defect images with their masks, see load_references): "
               + ("the adapter's training images are not on this machine" if entries
                  else "the adapter's config records no training images"))  # fmt: skip
        raise ValueError(msg)
    return entries


@register("xfusion")
class XFusionSynthesizer(ReferenceDefectSynthesizer):
    """AnomalyXFusion inference (arXiv 2404.19444): a normal image, a mask, a caption -> an anomalous image.

    Args:
        adapter (str | Path): folder of a trained adapter (``anomalib-synth train xfusion``).
        base_model (str | Path | None): Stable Diffusion; defaults to the one in the adapter's config.
        clip_model (str | Path | None): CLIP image encoder; defaults to the one in the adapter's config.
        references (str | Path | None): defect images with their masks for the textural embedding, one drawn per
            sample: a folder (``<stem>_mask.png`` next to ``<stem>.png``) or a JSON list (see
            :func:`~anomalib_synth.synthesizers.diffusion.common.load_references`). As in training (Eq. 3), the
            CLIP embedding of ``reference * its mask`` is used. ``None`` takes the adapter's training images (those
            of ``category`` if it has some), whose paths its config records. Defaults to ``None``.
        num_inference_steps (int): Defaults to ``50``.
        strength (float): 1 starts the masked region from pure noise. Defaults to ``1.0``.
        guidance_scale (float): classifier-free guidance on the caption (training drops it 10 % of the time); 5 as
            the LDM / AnomalyDiffusion sampler the paper builds on, 1 turns guidance off. Defaults to ``5.0``.
        reference_dir (str | Path | None): alias of ``references`` (a folder).
        model (str | Path | None): alias of ``adapter`` (so ``--model-path`` works on the command line).
        **kwargs: prompt, mask and resolution options of
            :class:`~anomalib_synth.synthesizers.diffusion.common.DiffusionSynthesizer`; the caption is the
            prompt's description (or an MVTec-Caption sentence with ``captions=``).

    The output mask is the regenerated region: the latent cells (8x8 pixels at SD 1.5's resolution) that hold any
    pixel of the drawn mask, mapped back to the image and cut to the foreground, so it covers the drawn mask and may
    exceed it by up to a cell, never onto the background. Outside it, pixels are the input's own.
    :attr:`source_images` lists the images the synthesizer has seen (the adapter's training images and the
    references), for the evaluation's leakage check.
    """

    description = "AnomalyXFusion: text + mask + texture X-embedding with timestep-adaptive fusion (trained adapter)"
    cost = (
        "`2 x num_inference_steps x strength` UNet evaluations per image (classifier-free guidance, on by "
        "default; half that with `guidance_scale=1`), plus one CLIP image pass per reference (cached per synthesizer). "
        "Training updates only the adapter (MIF + DDF [+ LoRA])."
    )

    def __init__(
        self,
        adapter: str | Path | None = None,
        base_model: str | Path | None = None,
        clip_model: str | Path | None = None,
        references: str | Path | None = None,
        num_inference_steps: int = 50,
        strength: float = 1.0,
        guidance_scale: float = DEFAULT_GUIDANCE,
        torch_dtype: str | torch.dtype | None = None,
        local_files_only: bool | None = None,
        reference_dir: str | Path | None = None,
        model: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        adapter = adapter or model
        references = references if references is not None else reference_dir
        if adapter is None:
            msg = "XFusionSynthesizer needs adapter=DIR (from `anomalib-synth train xfusion`)"
            raise ValueError(msg)
        if num_inference_steps < 1 or not 0 < strength <= 1:
            msg = f"need num_inference_steps >= 1 and 0 < strength <= 1, got {num_inference_steps}, {strength}"
            raise ValueError(msg)
        self.adapter_path = str(adapter)
        self.references_path = None if references is None else str(references)
        self.num_inference_steps, self.strength, self.guidance_scale = (
            int(num_inference_steps),
            strength,
            guidance_scale,
        )
        self.torch_dtype = str(resolve_dtype(torch_dtype)).removeprefix("torch.")
        self.core = XFusionModel(
            base_model, clip_model, adapter, torch_dtype=torch_dtype, local_files_only=local_files_only
        )
        self.core.eval()
        self.references = _reference_entries(references, self.core.adapter, self.category)
        self._textures: dict[int, Tensor] = {}
        self._loaded()

    def _unet_and_vae(self) -> tuple[Any, Any]:
        return self.core.unet, self.core.vae

    @property
    def training_data(self) -> dict[str, Any] | None:
        return self.core.adapter.training_data

    def reference_textures(self, indices: list[int]) -> Tensor:
        """CLIP embeddings of ``reference * its mask`` (Eq. 3), computed once per reference and kept."""
        from ....io import read_image, read_mask, resize

        size = (self.resolution, self.resolution)
        for i in sorted(set(indices) - set(self._textures)):
            ref = self.references[i]
            image = resize(read_image(ref["image"], channels=3), size)[None]
            mask = read_mask([Path(m) for m in ref["masks"]], size)[None, None].float()
            self._textures[i] = self.core.encode_texture(image.to(self.model_device), mask.to(self.model_device))[0]
        return torch.stack([self._textures[i] for i in indices])

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        size = self.resolution
        masks = params["mask"]
        model_masks = F.adaptive_max_pool2d(masks.float(), (size, size))  # no mask pixel is lost in the resize
        label = regenerated_pixels(self.core.regenerated_cells(model_masks), images.shape[-2:]).to(images.device)
        # the latent cells covering the mask reach past its edge: never onto the background (input pasted back there)
        label = label & params["fg"]
        generated = self.core.sample(
            to_model_size(images, size),
            model_masks,
            [p.detailed_text for p in self.prompt_texts(params)],
            params["seed"],
            textures=self.reference_textures(params["reference"].tolist()),
            num_inference_steps=self.num_inference_steps,
            strength=self.strength,
            guidance_scale=self.guidance_scale,
            progress=self.progress,
        )
        out = composite(images, generated.to(images.device), label)
        return self._result(images, out, label, params, self._param_keys)
