"""What the anomalib modules of :mod:`anomalib_synth.models` share: they learn from normal images in one epoch
(like PatchCore: collect the images, then fit), optimise nothing through Lightning, and normalise their inputs
themselves, so their pre-processor only resizes."""

from __future__ import annotations

from typing import Any

from anomalib import LearningType
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Resize


class OneEpochOneClassMixin:
    """Put before ``AnomalibModule`` in the bases: resize-only pre-processor (default 256 x 256), anomalib's
    one-class post-processor, no Lightning optimiser, one epoch without sanity validation, ``ONE_CLASS``."""

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 256 x 256) only: the model normalises images itself."""
        return PreProcessor(transform=Resize(image_size or (256, 256), antialias=True))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's one-class post-processor (thresholds and normalisation from the validation scores)."""
        return PostProcessor()

    @staticmethod
    def configure_optimizers() -> None:
        """None: nothing is optimised by Lightning (the model fits itself at the end of the epoch, or was
        pretrained)."""
        return

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One epoch (it only collects images), no gradient clipping, no sanity validation, one device."""
        return {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0, "devices": 1}

    @property
    def learning_type(self) -> LearningType:
        """``ONE_CLASS``: it learns from normal images (any anomalies it trains on are its own)."""
        return LearningType.ONE_CLASS
