"""AnomalyAny: training-free anomaly generation with attention-guided Stable Diffusion (Sun et al., CVPR 2025,
"Unseen Visual Anomaly Generation", arXiv 2406.01078; official code EPFL-IMOS/AnomalyAny).

Per image, with frozen Stable Diffusion 1.5 and CLIP ViT-L/14, from one normal image and text prompts. One module
per part of the paper, laid out like anomalib's ``models/image/draem/``:

- :mod:`.sampling`: the guided DDIM loop, in named steps. **Test-time normal-sample conditioning** (Sec. 3.1):
  start from the normal image noised to about ``gamma T`` and denoise only the last ``int(N gamma)`` steps,
  blending the noised normal latent back outside the foreground after every step. Always DDIM, whatever scheduler
  the checkpoint ships.
- :mod:`.anomaly_map`: the cross-attention map of the defect words (Sec. 3.2), its ``n_t``, and the output mask it
  becomes (Sec. 3.4).
- :mod:`.losses`: ``L_att`` (**attention-guided anomaly optimisation**, Sec. 3.2, Eq. 3-4), ``L_prompt`` and
  ``L_img`` (**prompt-guided anomaly refinement**, Sec. 3.3, Eq. 6-7).
- :mod:`.schedule`: which executed steps are guided, the step sizes, and the weight ``alpha_t`` of ``L_att``
  (**localization-aware scheduler**, Sec. 3.2, Eq. 5) with its opt-in stop rule.
- :mod:`.synthesizer`: :class:`AnomalyAnySynthesizer` (registered as ``"anomalyany"``): options, models, ``apply``,
  output mask and paste-back, cost counts.

AnomalyAny is training-free: nothing is fitted, so unlike ``xfusion`` and ``anomalycontrol`` there is no adapter
and no Lightning module here. Each module's docstring says where we depart from the paper or the official code,
and why; docs/diffusion.md gives the overview and the measured cost.

Example:
    >>> from anomalib_synth.synthesizers import get
    >>> synth = get("anomalyany", category="bottle")  # doctest: +SKIP
    >>> result = synth(images, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
"""

from .anomaly_map import attention_resolution
from .sampling import GuidedSampling
from .synthesizer import AnomalyAnySynthesizer

__all__ = ["AnomalyAnySynthesizer", "GuidedSampling", "attention_resolution"]
