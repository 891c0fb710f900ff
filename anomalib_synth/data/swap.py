"""Make detectors that synthesize their own training anomalies (DRAEM, DSR) use any of our synthesizers.

DRAEM calls ``self.augmenter(batch.image)`` and DSR ``self.perlin_generator(image)`` inside ``training_step``; both
expect anomalib's ``PerlinAnomalyGenerator`` contract: images ``[B, C, H, W]`` in ``[0, 1]`` in, ``(augmented images,
float masks [B, 1, H, W])`` out. :class:`SynthesizerAugmenter` offers that contract around a :class:`Synthesizer`,
:func:`swap_augmenter` puts it in place of the model's generator, and the :class:`SynthesizerSwap` callback does the
swap at ``setup``, so that it works from YAML (``trainer.callbacks``) without forking anomalib.

GLASS (``model.augmentor``, called on de-normalised images with probability 1) takes the same contract; its
``dual_mask`` option only shapes anomalib's own Perlin masks. GLASS itself cannot be trained offline here (its
``pre_trained=False`` path fails in anomalib 2.7's ``configure_optimizers``), so only the swap is tested for it.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from ..io import ON_ERROR
from ..seeding import derive_seed
from ..synthesizers import Synthesizer, get
from ..synthesizers.base import make_generator
from ..transforms import synthesize_batch
from .checks import drop_unreadable

AUGMENTER_ATTRIBUTES = ("augmenter", "perlin_generator", "model.augmentor")
"""Attributes holding a model's own anomaly generator: DRAEM ``augmenter``, DSR ``perlin_generator``, GLASS
``model.augmentor`` (GLASS calls its generator with probability 1: pass ``probability=1.0``)."""


class SynthesizerAugmenter(nn.Module):
    """anomalib ``PerlinAnomalyGenerator`` contract around a :class:`Synthesizer`.

    Args:
        synthesizer (Synthesizer | str): the synthesizer or its registry name.
        probability (float): chance that an image is made anomalous (DRAEM's generator: 0.5). Defaults to ``0.5``.
        seed (int | None): seed of the augmenter's own generator. Defaults to ``None`` (OS entropy).
    """

    def __init__(self, synthesizer: Synthesizer | str, probability: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        self.synthesizer = get(synthesizer) if isinstance(synthesizer, str) else synthesizer
        self.probability = float(probability)
        self.generator = make_generator(seed=seed)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        single = images.ndim == 3
        batch = images.unsqueeze(0) if single else images
        self.synthesizer.to(batch.device)
        out, masks, _ = synthesize_batch(self.synthesizer, batch, None, None, self.probability, self.generator)
        masks = masks.to(batch.dtype)
        return (out[0], masks[0]) if single else (out, masks)


def swap_augmenter(
    model: nn.Module, synthesizer: Synthesizer | str, probability: float = 0.5, seed: int | None = None
) -> str:
    """Replace ``model``'s own anomaly generator by ``synthesizer``; returns the attribute that was replaced.

    Raises:
        ValueError: if the model has none of :data:`AUGMENTER_ATTRIBUTES`.
    """
    for attribute in AUGMENTER_ATTRIBUTES:
        *parents, name = attribute.split(".")
        owner = model
        for parent in parents:
            owner = getattr(owner, parent, None)
        if isinstance(getattr(owner, name, None), nn.Module):
            setattr(owner, name, SynthesizerAugmenter(synthesizer, probability, seed))
            return attribute
    msg = (
        f"{type(model).__name__} has no anomaly generator to replace (looked for {', '.join(AUGMENTER_ATTRIBUTES)}); "
        "models that consume labelled anomalies (e.g. Supersimplenet) take them from SyntheticAnomalyDataModule"
    )
    raise ValueError(msg)


class SynthesizerSwap(Callback):
    """Lightning callback: at ``setup``, make the model's own anomaly generator one of our synthesizers.

    It also checks the datamodule's image and mask files first (``on_bad_file``: ``"skip"`` unreadable ones with a
    warning naming each, or ``"raise"``), as :class:`~anomalib_synth.data.SyntheticAnomalyDataModule` does.

    Example (YAML, under ``trainer:``)::

        callbacks:
          - class_path: anomalib_synth.data.SynthesizerSwap
            init_args: {synthesizer: cutpaste, probability: 0.5, seed: 0}
    """

    def __init__(self, synthesizer: Synthesizer | str, probability: float = 0.5, seed: int | None = 0,
                 on_bad_file: str = "skip") -> None:  # fmt: skip
        super().__init__()
        if on_bad_file not in ON_ERROR:
            msg = f"on_bad_file must be one of {ON_ERROR}, got {on_bad_file!r}"
            raise ValueError(msg)
        self.synthesizer = synthesizer
        self.probability = probability
        self.seed = seed
        self.on_bad_file = on_bad_file
        self.replaced: str | None = None
        self.augmenter: SynthesizerAugmenter | None = None
        self.skipped_files: list[str] = []
        self._checked: set[int] = set()

    def _check_files(self, trainer: Trainer) -> None:
        """The datamodule's files, checked once per dataset after its ``setup`` (which Lightning runs before the
        callbacks'): unreadable ones are dropped with a warning (``on_bad_file="raise"`` stops), as
        :class:`~anomalib_synth.data.SyntheticAnomalyDataModule` does, so that a plain anomalib datamodule with a
        corrupt file does not fail mid-epoch inside a DataLoader worker."""
        datamodule = getattr(trainer, "datamodule", None)
        for split in ("train", "val", "test"):
            dataset = getattr(datamodule, f"{split}_data", None)
            if dataset is not None and hasattr(dataset, "samples") and id(dataset) not in self._checked:
                self.skipped_files += drop_unreadable(dataset, split, self.on_bad_file)
                self._checked.add(id(dataset))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        del stage
        self._check_files(trainer)
        current = pl_module
        for part in (self.replaced or "").split("."):
            current = getattr(current, part, None) if part else None
        if not isinstance(current, SynthesizerAugmenter):
            # each DDP rank draws its own anomalies
            seed = None if self.seed is None else derive_seed(self.seed, "rank", trainer.global_rank)
            self.replaced = swap_augmenter(pl_module, self.synthesizer, self.probability, seed)
            current = pl_module
            for part in self.replaced.split("."):
                current = getattr(current, part)
        self.augmenter = current

    def state_dict(self) -> dict[str, Any]:
        """The replaced attribute and the augmenter's generator state, so that a resumed fit draws the anomalies
        an uninterrupted one would."""
        state: dict[str, Any] = {"replaced": self.replaced}
        if self.augmenter is not None:
            state["generator"] = self.augmenter.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback states after ``setup``, so the augmenter is in place
        if self.augmenter is not None and "generator" in state_dict:
            self.augmenter.generator.set_state(state_dict["generator"])


class UseSynthesizer(SynthesizerSwap):
    """Deprecated name of :class:`SynthesizerSwap` (Lightning names callbacks with nouns)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn("UseSynthesizer is deprecated; use SynthesizerSwap", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


__all__ = ["AUGMENTER_ATTRIBUTES", "SynthesizerAugmenter", "SynthesizerSwap", "UseSynthesizer", "swap_augmenter"]
