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


def _register_offline_backbones() -> None:
    """The plugin import registers the built-in offline ImageNet backbones (``efficientnet_lite0.local``) with timm,
    so that configs run through ``anomalib-synth train --config ...`` can name them."""
    import logging

    try:
        from ..backbones import register_builtin

        register_builtin()
    except Exception as err:  # noqa: BLE001  (never break the import over an optional backbone)
        logging.getLogger(__name__).warning("built-in offline backbones not registered: %s", err)


_register_offline_backbones()
