"""AnomalyControl: cross-modal semantic features for controllable anomaly synthesis (He et al., arXiv 2412.06510).

A reference defect (image + text [+ mask]) steers Stable Diffusion 1.5 inpainting of a target mask on a normal image.
The method is a folder laid out as anomalib's models (``anomalib_synth.synthesizers.diffusion.anomalycontrol``):

- ``modules.py``: :class:`~.modules.CrossModalSemanticModeling` (CSM, Sec. 3.2), frozen BLIP-2 Q-Former features of
  the reference (image at 224 px for the real model + text, multimodal mode), the query tokens averaged to one
  vector as the official code; and :class:`~.modules.AnomalySemanticEnhancedAttention` (ASEA, Sec. 3.3), the
  attention guidance ``e_g`` added to the detached output of the frozen vision tower and optimised per reference
  (5 Adam steps, lr 0.1) with ``(1 - sum(A M) / sum(A))^2``: test-time optimisation inside the frozen VLM, as the
  official code (the paper calls ``e_g`` trainable). The ViT-g runs once per reference; each step runs the
  Q-Former only.
- ``adapter.py``: :class:`~.adapter.SemanticGuidedAdapter` (SGA, Sec. 3.4), ``Linear(d_qformer -> 1024)`` then
  diffusers' IP-Adapter ``ImageProjection`` (4 tokens) and ``IPAdapterAttnProcessor2_0`` on the cross-attention
  layers only, ``Attn(Q, K_txt, V_txt) + s Attn(Q, K_ip, V_ip)``, a diffusers model (``save_pretrained`` /
  ``from_pretrained``). The official training starts it from the IP-Adapter SD 1.5 checkpoint;
  ``anomalib-synth train control --init-adapter FILE|OWNER/REPO/PATH`` does the same. *Without it* (our default,
  since it needs a download) the image projection starts random and ``K_ip``/``V_ip`` from the text projections,
  so training starts from scratch rather than from an adapter that already maps image features to the UNet.
- ``torch_model.py``: :class:`~.torch_model.AnomalyControlModel`, the frozen models + SGA and the training loss
  (Sec. 3.5): noise-prediction MSE of the 9-channel inpainting UNet, only the SGA trained, the image (a zero CSM
  feature) / text / both conditions dropped 5 % of the time each. The reference of each target is, by default,
  the target itself, as the official training; its CSM feature is computed once per image and cached. The SGA
  scale is ``s = 1`` in training and at inference (the official ``cross_attention_kwargs={"scale": 0.5}`` is a LoRA
  scale that its SGA processors ignore).
- ``sampling.py``: inference as the official code, diffusers' ``StableDiffusionInpaintPipeline`` (50 steps,
  guidance 7, strength 0.7) with the SGA tokens as ``ip_adapter_image_embeds``, the official negative prompt
  (``"monochrome, lowres, bad anatomy, worst quality, low quality"``) and the zero-feature SGA tokens in the
  negative branch. *Departure*: DDIM on the checkpoint's noise schedule instead of the PNDM that SD 1.5 ships,
  because PNDM is wrong when sampling starts partway (``strength < 1``): the latent lags the schedule by one step.
- ``synthesizer.py`` (this module): :class:`AnomalyControlSynthesizer`, which composites the result back through
  the target mask blurred with ``sigma = 5`` px (at 512 px; scaled with the resolution), as the official code.
- ``lightning_model.py``: ``ControlTraining``, the Lightning module (``anomalib-synth train control``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor

from ...base import Params, SynthesisResult
from ...registry import register
from ..common import ReferenceDefectSynthesizer, load_references, to_model_size
from .sampling import NEGATIVE_PROMPT
from .torch_model import AnomalyControlModel

__all__ = ["AnomalyControlSynthesizer"]


@register("anomalycontrol")
class AnomalyControlSynthesizer(ReferenceDefectSynthesizer):
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
    up to ``3 sigma`` px around it. Pixels where the blurred mask is 0 are the input's own. :attr:`source_images`
    lists the images the synthesizer has seen (the adapter's training images and the references), for the
    evaluation's leakage check.
    """

    description = "AnomalyControl: text-image reference defect -> BLIP-2 features -> IP-Adapter-style SD inpainting"
    cost = (
        "`2 x num_inference_steps x strength` UNet evaluations per image, plus, per reference (cached "
        "per synthesizer; in training, per image), one BLIP-2 vision pass and `asea_steps` Q-Former forward/backward "
        "passes (ASEA never backpropagates through the ViT-g)."
    )
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
            msg = ("AnomalyControlSynthesizer needs adapter=DIR (from `anomalib-synth train control`) and "
                   "references=PATH (a JSON list or a folder of reference defects)")  # fmt: skip
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
    def training_data(self) -> dict[str, Any] | None:
        return self.core.training_data

    def reference_features(self, indices: list[int]) -> Tensor:
        """CSM (+ ASEA) features of the references, computed once per reference and kept."""
        from ....io import read_image, read_mask, resize

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
