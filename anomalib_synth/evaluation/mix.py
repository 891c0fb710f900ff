"""The per-sample mix of synthesizers now lives in :mod:`anomalib_synth.synthesizers.mix` (the models use it too);
re-exported here for the harness."""

from __future__ import annotations

from ..synthesizers.mix import SEPARATOR, MixSynthesizer, build

__all__ = ["SEPARATOR", "MixSynthesizer", "build"]
