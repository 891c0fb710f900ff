"""anomalib-synth: synthetic, labelled defects (image + mask + label) for anomalib."""

from .synthesizers import SynthesisResult, Synthesizer, available, get

__version__ = "0.1.0"

__all__ = ["SynthesisResult", "Synthesizer", "__version__", "available", "get"]
