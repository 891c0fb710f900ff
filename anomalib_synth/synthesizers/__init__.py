"""Synthesizers: one API (:class:`Synthesizer`), a registry of short names, and the classical methods.

>>> from anomalib_synth import synthesizers
>>> sorted(synthesizers.available())
['anomalib-perlin', 'anomalyany', 'anomalycontrol', 'cutpaste', 'inpainting', 'nsa', 'perlin', 'scar', 'xfusion']
"""

from .anomalib_perlin import AnomalibPerlinSynthesizer
from .base import Params, SynthesisResult, Synthesizer, make_generator
from .cutpaste import CutPasteSynthesizer
from .nsa import NSASynthesizer
from .perlin import PerlinSynthesizer
from .registry import available, get, get_class, names, register, register_lazy
from .scar import ScarSynthesizer

# diffusion synthesizers import diffusers only when first asked for
register_lazy("inpainting", "anomalib_synth.synthesizers.diffusion.inpainting:InpaintingSynthesizer",
              "Stable Diffusion inpainting of a drawn defect mask with a defect prompt (baseline)")  # fmt: skip
register_lazy("anomalyany", "anomalib_synth.synthesizers.diffusion.anomalyany:AnomalyAnySynthesizer",
              "AnomalyAny: training-free, attention-guided Stable Diffusion from one normal image")  # fmt: skip
register_lazy("anomalycontrol", "anomalib_synth.synthesizers.diffusion.anomalycontrol:AnomalyControlSynthesizer",
              "AnomalyControl: text-image reference defect -> BLIP-2 features -> IP-Adapter-style SD inpainting")  # fmt: skip
register_lazy("xfusion", "anomalib_synth.synthesizers.diffusion.xfusion:XFusionSynthesizer",
              "AnomalyXFusion: text + mask + texture X-embedding with timestep-adaptive fusion (trained adapter)")  # fmt: skip

__all__ = [
    "AnomalibPerlinSynthesizer",
    "CutPasteSynthesizer",
    "NSASynthesizer",
    "Params",
    "PerlinSynthesizer",
    "ScarSynthesizer",
    "SynthesisResult",
    "Synthesizer",
    "available",
    "get",
    "get_class",
    "make_generator",
    "names",
    "register",
]
