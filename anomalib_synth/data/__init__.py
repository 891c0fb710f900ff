"""anomalib integration: the datamodule wrapper, the disk cache, and generator swapping for DRAEM/DSR."""

from .cache import build_cache, cache_key
from .datamodule import SyntheticAnomalyDataModule
from .swap import SynthesizerAugmenter, SynthesizerSwap, UseSynthesizer, swap_augmenter

__all__ = [
    "SynthesizerAugmenter",
    "SyntheticAnomalyDataModule",
    "SynthesizerSwap",
    "UseSynthesizer",
    "build_cache",
    "cache_key",
    "swap_augmenter",
]
