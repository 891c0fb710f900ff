"""AnomalyControl (He et al., arXiv 2412.06510), one module per job, as anomalib's ``models/image/<method>/``.

- :mod:`.modules`: the frozen-VLM components, CSM (Sec. 3.2) and ASEA (Sec. 3.3).
- :mod:`.adapter`: the Semantic Guided Adapter (SGA, Sec. 3.4), a diffusers model; IP-Adapter import.
- :mod:`.torch_model`: :class:`AnomalyControlModel`, frozen SD inpainting + BLIP-2 + SGA, and the training loss.
- :mod:`.sampling`: the sampling loop (SGA-steered inpainting from ``strength``).
- :mod:`.synthesizer`: :class:`AnomalyControlSynthesizer` (registered as ``anomalycontrol``); its module docstring
  describes the method and where it departs from the paper.
- :mod:`.lightning_model`: ``ControlTraining``, the Lightning module. Not imported here: using the synthesizer does
  not import Lightning.
"""

from ..common import load_references
from .adapter import SemanticGuidedAdapter, read_ip_adapter
from .modules import BLIP2_ITM, AnomalySemanticEnhancedAttention, CrossModalSemanticModeling
from .sampling import NEGATIVE_PROMPT
from .synthesizer import AnomalyControlSynthesizer
from .torch_model import AnomalyControlModel

__all__ = [
    "BLIP2_ITM",
    "NEGATIVE_PROMPT",
    "AnomalyControlModel",
    "AnomalyControlSynthesizer",
    "AnomalySemanticEnhancedAttention",
    "CrossModalSemanticModeling",
    "SemanticGuidedAdapter",
    "load_references",
    "read_ip_adapter",
]
