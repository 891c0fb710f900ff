"""AnomalyXFusion: multi-modal anomaly synthesis with diffusion (Hu et al., arXiv 2404.19444).

No complete official code exists (the public repository has the MVTec-Caption scripts and a partial LDM
embedding manager), so this is our implementation of the paper, on Stable Diffusion 1.5.

- :class:`MultiModalInFusion` (MIF, Sec. 4.2) fuses three embeddings of ``k`` tokens of width ``d`` (the UNet's
  cross-attention width) into the X-embedding:

  - semantic (Eq. 1): the pooled frozen CLIP text embedding of the caption, replicated ``k`` times and
    L2-normalised;
  - location (Eq. 2): a mask encoder followed by a one-layer CNN. *Departure:* the paper uses a pre-trained ISTR mask
    encoder, which is not available; ours is a small convolutional encoder trained with the rest;
  - textural (Eq. 3): the frozen CLIP image encoder on ``image * mask``, projected to ``k x d``;
  - concatenation (Eq. 4), then self-attention + MLP with residuals (Eq. 5).

- :class:`DynamicDifFusion` (DDF, Sec. 4.3, Eq. 14): ``e_t = f_phi(e_X, t)``, an MLP on the sinusoidal timestep
  embedding concatenated with ``e_X`` (residual), applied at every denoising step. The partial public code omits it.
- Conditioning: ``[caption tokens ; e_t]`` goes to the UNet's cross-attention. *Departure:* the paper's code base is
  the older LDM (``txt2img-f8-large``, BERT context); we use SD 1.5, frozen, with optional LoRA on the
  cross-attention projections (peft).
- Blended training and sampling (Eq. 16): inside the mask the model denoises; outside it the noised original
  ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` is kept. The loss (Eq. 17) is the noise-prediction error in the
  **L2** norm (the simplified DDPM objective SD was trained with; L1 would change the frozen UNet's optimum),
  weighted ``1`` inside the (latent) mask and ``background_weight`` (0.1) outside, because outside the mask the
  sampler discards the prediction anyway.
- Latent mask and label: the latent mask is the set of latent cells that hold any mask pixel (an adaptive max-pool,
  :func:`covering_latent_mask`), in training and in sampling, so that no mask pixel is left out of the regenerated
  region. The synthesizer's output mask is exactly the regenerated region (those cells mapped back to the pixel
  grid, :func:`regenerated_pixels`), and the composite pastes generated pixels there only: every pixel the label
  claims was regenerated, and every regenerated pixel is labelled.
- Texture at inference: as in training (Eq. 3), the CLIP embedding of a real defect image times *its own* defect
  mask (``references``; by default the adapter's training images, whose paths its config records), while the
  location embedding takes the target mask.
- Guidance: classifier-free guidance with scale 5 by default, the value of the LDM/AnomalyDiffusion sampler the
  paper builds on (the paper does not state its own); the unconditional branch is the empty caption in the caption
  tokens and in ``e_X`` (mask and texture kept), which is what training's caption dropout (10 %) prepares for.
- Adapter folder: :class:`XFusionAdapter` is a diffusers model, so ``save_pretrained`` / ``from_pretrained``
  write and read ``config.json`` + ``diffusion_pytorch_model.safetensors``; the LoRA goes next to it in diffusers'
  LoRA file (``pytorch_lora_weights.safetensors``). Folders of the earlier format (``adapter_config.json`` +
  ``adapter.safetensors``) still load, with a ``DeprecationWarning``.
- Leakage: the adapter config records the training images (``training_data``); ``anomalib-synth train xfusion``
  can exclude categories, images or a split file, and the evaluation harness refuses a synthesizer that has seen
  its test images (:mod:`anomalib_synth.training.leakage`).

Layout (as anomalib's ``models/image/<method>/``):

- :mod:`.modules`: the paper's components (``MaskEncoder``, ``MultiModalInFusion``, ``DynamicDifFusion``) and the
  trained ``XFusionAdapter``; :mod:`.lora` its optional LoRA; :mod:`.legacy` the earlier folder format;
- :mod:`.masks`: the regenerated region (latent cells of a mask, and back to pixels);
- :mod:`.torch_model`: ``XFusionModel``, the frozen SD/CLIP parts + the adapter, and the Eq. 17 loss;
- :mod:`.sampling`: the Eq. 16 sampler with guidance;
- :mod:`.synthesizer`: ``XFusionSynthesizer`` (registered as ``xfusion``) and its references;
- :mod:`.lightning_model`: ``XFusionTraining``, the Lightning module (imported only on demand: the synthesizer does
  not need Lightning).
"""

from __future__ import annotations

from typing import Any

from .masks import covering_latent_mask, regenerated_pixels
from .modules import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DynamicDifFusion, MaskEncoder, MultiModalInFusion, XFusionAdapter
from .sampling import DEFAULT_GUIDANCE
from .synthesizer import XFusionSynthesizer
from .torch_model import XFusionModel

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_GUIDANCE",
    "DynamicDifFusion",
    "MaskEncoder",
    "MultiModalInFusion",
    "XFusionAdapter",
    "XFusionModel",
    "XFusionSynthesizer",
    "covering_latent_mask",
    "regenerated_pixels",
]


def __getattr__(name: str) -> Any:
    """``XFusionTraining`` on demand (not in ``__all__``): importing the synthesizer does not import Lightning."""
    if name == "XFusionTraining":
        from .lightning_model import XFusionTraining

        return XFusionTraining
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
