"""A class-agnostic one-prompt anomaly segmenter after MetaUAS (Gao, NeurIPS 2024) on a frozen EfficientNet-Lite0.

- :mod:`.torch_model`: :class:`OnePromptSegmenterModel` (plain torch): soft alignment of the prompt's features to
  the query's, a small decoder, ``segment``/``set_prompts``, ``save_pretrained``/``from_pretrained``.
- :mod:`.pairs`: the normal images pretraining may use (the evaluated category left out by name), the change-pair
  batches, and :func:`check_segmenter_leakage`.
- :mod:`.pretrain`: the pretraining loop (``anomalib-synth pretrain-segmenter``), resumable.
- :mod:`.lightning_model`: :class:`OnePromptSegmenter`, the anomalib model (imported lazily: it needs Lightning).
"""

from __future__ import annotations

from typing import Any

from .pairs import DEFAULT_SYNTHESIZERS, PairMaker, check_segmenter_leakage, pair_sources
from .torch_model import OnePromptSegmenterModel

__all__ = [
    "DEFAULT_SYNTHESIZERS",
    "OnePromptSegmenter",
    "OnePromptSegmenterModel",
    "PairMaker",
    "check_segmenter_leakage",
    "pair_sources",
    "pretrain_segmenter",
]


def __getattr__(name: str) -> Any:
    if name == "OnePromptSegmenter":
        from .lightning_model import OnePromptSegmenter

        return OnePromptSegmenter
    if name == "pretrain_segmenter":
        from .pretrain import pretrain_segmenter

        return pretrain_segmenter
    raise AttributeError(name)
