"""An albumentations transform that applies any synthesizer to an ``image`` + ``mask`` pair: :class:`SynthesizeAnomaly`.

Many inspection pipelines are built on albumentations (numpy ``HxWxC`` images, ``mask`` as a target that geometric
transforms move with the image). This is a ``DualTransform``: placed in an ``A.Compose``, the synthetic defect is
drawn on the image, its pixels are set in the mask, and the transforms after it move image and mask together.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import torch

from .synthesizers import Synthesizer, get

__all__ = ["SynthesizeAnomaly"]


class SynthesizeAnomaly(A.DualTransform):
    """Make the sample a synthetic anomaly (with probability ``p``), and say so in its mask and label.

    Inputs are the usual albumentations targets: ``image`` as ``HxW`` or ``HxWxC`` (C = 1 or 3), uint8 or float in
    ``[0, 1]``; ``mask`` (optional) ``HxW``. The image keeps its dtype and shape. The mask gets ``mask_value`` where the
    defect is (other values are kept); without a ``mask`` in the call, one is added. If the call carries
    ``label_key`` (``label=...``), it becomes 1 for an anomalous result. A sample whose mask already marks a defect
    (a real one) is left as it is.

    Randomness comes from albumentations' own generator, so ``A.Compose(..., seed=s)`` makes runs reproducible.

    Args:
        synthesizer (Synthesizer | str): a synthesizer, or a registry name such as ``"cutpaste"``.
        p (float, optional): probability of applying it. Defaults to ``0.5``.
        mask_value (int, optional): the mask value of defect pixels. Defaults to ``1``.
        label_key (str, optional): the name of the label in the call, if the pipeline carries one. Defaults to
            ``"label"``.
        **kwargs: synthesizer arguments when it is given by name.

    Example:
        >>> import albumentations as A, numpy as np
        >>> pipeline = A.Compose([SynthesizeAnomaly("cutpaste", p=1.0), A.HorizontalFlip(p=1.0)], seed=0)
        >>> out = pipeline(image=np.full((64, 64, 3), 128, np.uint8), mask=np.zeros((64, 64), np.uint8), label=0)
        >>> bool(out["mask"].any()), out["label"]
        (True, 1)
    """

    def __init__(
        self,
        synthesizer: Synthesizer | str,
        p: float = 0.5,
        mask_value: int = 1,
        label_key: str = "label",
        **kwargs: Any,
    ) -> None:
        super().__init__(p=p)
        self.synthesizer = get(synthesizer, **kwargs) if isinstance(synthesizer, str) else synthesizer
        self.mask_value = mask_value
        self.label_key = label_key

    @property
    def targets_as_params(self) -> list[str]:
        return ["image"]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"]
        existing = data.get("mask")
        if existing is not None and np.any(existing):
            return {"synthetic": None}  # a real defect: leave it
        x = _to_tensor(image)
        seed = int(self.random_generator.integers(0, 2**62))
        result = self.synthesizer(x, generator=torch.Generator().manual_seed(seed))
        return {
            "synthetic": _from_tensor(result.images[0], image),
            "synthetic_mask": result.masks[0, 0].bool().numpy(),
            "synthetic_label": bool(result.labels[0]),
        }

    def apply(self, img: np.ndarray, synthetic: np.ndarray | None = None, **params: Any) -> np.ndarray:
        return img if synthetic is None else synthetic

    def apply_to_mask(self, mask: np.ndarray, synthetic_mask: np.ndarray | None = None, **params: Any) -> np.ndarray:
        if synthetic_mask is None:
            return mask
        return np.where(synthetic_mask.reshape(mask.shape[:2] + (1,) * (mask.ndim - 2)), self.mask_value, mask).astype(
            mask.dtype
        )

    def __call__(self, *args: Any, force_apply: bool = False, **data: Any) -> dict[str, Any]:
        out = super().__call__(*args, force_apply=force_apply, **data)
        synthetic_mask = self.params.get("synthetic_mask")
        if synthetic_mask is None:
            return out
        if data.get("mask") is None:
            out["mask"] = synthetic_mask.astype(np.uint8) * self.mask_value
        if self.label_key in data and self.params.get("synthetic_label"):
            out[self.label_key] = 1
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mask_value", "label_key")


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """``HxW`` / ``HxWxC`` uint8 or float in [0, 1] -> float ``[1, C, H, W]``; ``ValueError`` for other layouts."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        msg = f"image must be HxW or HxWxC with C in (1, 3), got shape {image.shape}"
        raise ValueError(msg)
    array = image[..., None] if image.ndim == 2 else image
    if array.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(array)).float() / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    else:
        msg = f"image must be uint8 or float in [0, 1], got dtype {array.dtype}"
        raise ValueError(msg)
    return x.permute(2, 0, 1).unsqueeze(0)


def _from_tensor(x: torch.Tensor, like: np.ndarray) -> np.ndarray:
    array = x.permute(1, 2, 0).numpy()
    if like.ndim == 2:
        array = array[..., 0]
    if like.dtype == np.uint8:
        return (array.clip(0, 1) * 255).round().astype(np.uint8)
    return array.astype(like.dtype)
