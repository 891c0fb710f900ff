"""Anomaly detectors that learn from synthetic anomalies, laid out as anomalib's ``models/image/<name>/``.

Each folder holds a plain-torch core (``torch_model.py``, no Lightning) and an anomalib model
(``lightning_model.py``, an ``AnomalibModule``) that ``Engine().fit/test`` and ``anomalib-synth train --model``
run. The Lightning modules are imported lazily, so importing a torch core does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LIGHTNING = {
    "PatchcoreRefiner": "anomalib_synth.models.patchcore_refiner.lightning_model",
    "OnePromptSegmenter": "anomalib_synth.models.one_prompt_segmenter.lightning_model",
}

__all__ = sorted(_LIGHTNING)


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        return getattr(importlib.import_module(_LIGHTNING[name]), name)
    raise AttributeError(name)
