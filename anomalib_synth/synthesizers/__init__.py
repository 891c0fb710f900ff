"""Synthesizers: one API (:class:`Synthesizer`), a registry of short names, and the classical methods.

>>> from anomalib_synth import synthesizers
>>> sorted(synthesizers.available())
['anomalib-perlin', 'cutpaste', 'nsa', 'perlin', 'scar']
"""

from .anomalib_perlin import AnomalibPerlinSynthesizer
from .base import Params, SynthesisResult, Synthesizer, make_generator
from .cutpaste import CutPasteSynthesizer
from .nsa import NSASynthesizer
from .perlin import PerlinSynthesizer
from .registry import available, get, get_class, register


@register("scar")
class ScarSynthesizer(CutPasteSynthesizer):
    """CutPaste in ``scar`` mode: thin, long, rotated patches (a short name for ``cutpaste`` with ``mode="scar"``)."""

    description = "CutPaste-scar: a thin, long, rotated patch pasted elsewhere"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("mode", "scar")
        super().__init__(**kwargs)


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
