"""torchvision-v2 transform that adds synthetic anomalies: :class:`SynthesizeAnomaly`."""

from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from .synthesizers import Synthesizer, get
from .synthesizers.base import make_generator


def _wrap_like(value: Tensor, like: Any) -> Tensor:
    return tv_tensors.wrap(value, like=like) if isinstance(like, tv_tensors.TVTensor) else value


def _plain(value: Tensor) -> Tensor:
    return value.as_subclass(Tensor) if isinstance(value, tv_tensors.TVTensor) else value


def synthesize_batch(
    synthesizer: Synthesizer,
    images: Tensor,
    masks: Tensor | None,
    labels: Tensor | None,
    p: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Make each normal sample of a batch anomalous with probability ``p``.

    Args:
        synthesizer: the synthesizer.
        images: ``[B, C, H, W]`` in ``[0, 1]``.
        masks: bool ``[B, 1, H, W]`` of existing (real) anomalies, or ``None``.
        labels: bool ``[B]`` of existing anomalies, or ``None`` (then derived from ``masks``).
        p: probability per sample.
        generator: the source of randomness (one ``[B]`` draw for the gate, then the synthesizer's draws).

    Returns:
        New ``(images, masks, labels)``; samples not drawn, and samples already anomalous, are unchanged.
    """
    b, _, h, w = images.shape
    masks = torch.zeros(b, 1, h, w, dtype=torch.bool, device=images.device) if masks is None else masks.clone()
    labels = masks.flatten(1).any(1) if labels is None else labels.to(torch.bool).clone()
    draw = torch.rand(b, generator=generator, device=generator.device).to(images.device) < p
    index = (draw & ~labels).nonzero().flatten()
    if index.numel() == 0:
        return images, masks, labels
    synthesizer.to(images.device)  # a no-op when it is already there
    result = synthesizer(images[index], generator=generator)  # it clamps resampling overshoot itself
    images = images.clone()
    images[index] = result.images
    masks[index] |= result.masks.bool()
    labels[index] |= result.labels
    return images, masks, labels


class SynthesizeAnomaly(v2.Transform):
    """Turn each sample into a synthetic anomaly with probability ``p``, and say so in its mask and label.

    Accepts, with or without a batch dimension:

    - a plain image tensor ``[C, H, W]`` / ``[B, C, H, W]`` -> the image;
    - an ``(image, mask)`` pair (mask ``[H, W]``, ``[1, H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``) -> the pair, with
      the synthetic mask set (same shape and type as given);
    - an anomalib ``ImageItem`` / ``ImageBatch`` -> a new one whose ``image``, ``gt_mask`` and ``gt_label`` are set
      for the changed samples.

    Samples that are already anomalous (``gt_label`` true, or a non-empty given mask) are left as they are, so real
    defects are never painted over.

    Images must be float in ``[0, 1]`` and not yet normalised, as anomalib's augmentations receive them.

    Args:
        synthesizer (Synthesizer | str): a synthesizer, or a registry name such as ``"perlin"``.
        p (float, optional): probability that a sample is made anomalous. Defaults to ``0.5``.
        seed (int | None, optional): seed of the transform's own generator (``None``: OS entropy). The global RNG is
            never used. Defaults to ``None``.
        **kwargs: arguments for the synthesizer when it is given by name.

    Note:
        Inside an anomalib dataset the label comes from the sample table, not from the transform, so a plain
        dataset augmentation cannot turn a normal sample into a labelled anomaly: the image and mask change but
        ``gt_label`` is recomputed from the table. Use the transform on ``ImageBatch`` objects (e.g. in a callback or
        ``on_after_batch_transfer``), or :class:`anomalib_synth.data.SyntheticAnomalyDataModule`.

    Example:
        >>> import torch
        >>> t = SynthesizeAnomaly("cutpaste", p=1.0, seed=0)
        >>> image, mask = t(torch.rand(3, 64, 64), torch.zeros(64, 64, dtype=torch.bool))
        >>> bool(mask.any())
        True
    """

    def __init__(self, synthesizer: Synthesizer | str, p: float = 0.5, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            msg = f"p must be in [0, 1], got {p}"
            raise ValueError(msg)
        if isinstance(synthesizer, str):
            synthesizer = get(synthesizer, **kwargs)
        elif kwargs:
            msg = f"keyword arguments {sorted(kwargs)} are only accepted with a synthesizer name"
            raise ValueError(msg)
        if not isinstance(synthesizer, Synthesizer):
            msg = f"synthesizer must be a Synthesizer or a registry name, got {type(synthesizer).__name__}"
            raise TypeError(msg)
        self.synthesizer = synthesizer
        self.p = float(p)
        self.generator = make_generator(seed=seed)

    def forward(self, *inputs: Any) -> Any:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and getattr(self, "_worker", None) != worker.id:
            # each DataLoader worker holds a copy of the generator: give each its own stream
            self.generator.manual_seed(worker.seed % (2**63))
            self._worker = worker.id
        sample = inputs[0] if len(inputs) == 1 else inputs
        if is_dataclass(sample) and hasattr(sample, "image") and hasattr(sample, "gt_mask"):
            return self._item(sample)
        if isinstance(sample, Tensor):
            return self._tensors(sample, None)[0]
        if isinstance(sample, (tuple, list)) and len(sample) == 2 and all(isinstance(s, Tensor) for s in sample):
            return self._tensors(*sample)
        msg = (
            "SynthesizeAnomaly expects an image tensor, an (image, mask) pair, or an anomalib ImageItem/ImageBatch; "
            f"got {type(sample).__name__}"
        )
        raise TypeError(msg)

    def synthesize(
        self, images: Tensor, masks: Tensor | None = None, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Batch core, see :func:`synthesize_batch` (with this transform's synthesizer, ``p`` and generator)."""
        return synthesize_batch(self.synthesizer, images, masks, labels, self.p, self.generator)

    def _tensors(self, image: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        batched = image.ndim == 4
        images = _plain(image) if batched else _plain(image).unsqueeze(0)
        masks = None
        if mask is not None:
            masks = _plain(mask).bool()
            if masks.ndim == 2 or (masks.ndim == 3 and not batched):
                masks = masks.reshape(1, 1, *masks.shape[-2:])
            elif masks.ndim == 3:
                masks = masks.unsqueeze(1)
            if masks.shape != (images.shape[0], 1, *images.shape[-2:]):
                msg = f"mask of shape {tuple(mask.shape)} does not match image of shape {tuple(image.shape)}"
                raise ValueError(msg)
        new_images, new_masks, _ = self.synthesize(images, masks)
        new_image = _wrap_like(new_images if batched else new_images[0], image)
        if mask is None:
            return new_image, None
        new_mask = new_masks.reshape(mask.shape).to(mask.dtype)
        return new_image, _wrap_like(new_mask, mask)

    def _item(self, sample: Any) -> Any:
        image = sample.image
        batched = image.ndim == 4
        images = _plain(image) if batched else _plain(image).unsqueeze(0)
        b, _, h, w = images.shape
        masks = sample.gt_mask
        if masks is not None:
            masks = _plain(masks).bool().reshape(b, 1, h, w)
        labels = sample.gt_label
        if labels is not None:
            labels = _plain(labels).reshape(b).bool().to(images.device)
        new_images, new_masks, new_labels = self.synthesize(images, masks, labels)
        if not batched:
            new_images, new_masks, new_labels = new_images[0], new_masks[0, 0], new_labels[0]
        else:
            new_masks = new_masks[:, 0]
        return sample.update(
            in_place=False,
            image=_wrap_like(new_images, image),
            gt_mask=tv_tensors.Mask(new_masks),
            gt_label=new_labels,
        )
