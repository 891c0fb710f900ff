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
from .registry import available, get, get_class, register, register_lazy


@register("scar")
class ScarSynthesizer(CutPasteSynthesizer):
    """CutPaste in ``scar`` mode: thin, long, rotated patches (``cutpaste`` with ``mode="scar"``, longer scars).

    Departure from the CutPaste paper (Li et al., CVPR 2021, Sec. 3.1), on purpose: the paper's scars (2-16 x 10-25 px
    at 256 px) cover 0.1-0.4 % of the image and are hard to see; real scratches in inspection images (MVTec AD) run
    over much more of the part. Here they default to 4-16 x 32-96 px at 256 px (about 0.9 % of the image). The paper's
    sizes remain ``cutpaste`` with ``mode="scar"``, or ``scar_width=(2, 16), scar_height=(10, 25)``.
    """

    description = "CutPaste-scar: a thin, long, rotated patch pasted elsewhere (scratch-sized)"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("mode", "scar")
        kwargs.setdefault("scar_width", (4.0, 16.0))
        kwargs.setdefault("scar_height", (32.0, 96.0))
        super().__init__(**kwargs)


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
    "register",
]
