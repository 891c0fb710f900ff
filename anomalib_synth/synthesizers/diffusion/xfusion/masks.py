"""The region AnomalyXFusion regenerates: the latent cells of a pixel mask, and those cells on the pixel grid.

Eq. 16 blends in latent space, so the regenerated region is a set of latent cells. Training (the Eq. 17 weight),
sampling (the Eq. 16 blend) and the synthesizer's label all use the same cells: the ones that hold any mask pixel.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["covering_latent_mask", "regenerated_pixels"]


def covering_latent_mask(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, 1, h, w]`` float mask of the latent cells that hold any pixel of ``masks`` (adaptive max-pool).

    Nearest downsampling would drop mask pixels that are not at a cell's sampling point, so that the label could
    claim pixels that were never regenerated; the max-pool keeps every cell a mask pixel touches.
    """
    return F.adaptive_max_pool2d(masks.float(), tuple(size))


def regenerated_pixels(cells: Tensor, size: tuple[int, int]) -> Tensor:
    """The latent ``cells`` (from :func:`covering_latent_mask`) on a pixel grid of ``size``, as bool ``[B, 1, H, W]``.

    Pixel ``y`` belongs to cell ``floor(y * h / H)`` (nearest), which is always one of the cells whose max-pool
    window holds ``y``: every pixel of the mask is inside the returned region.
    """
    return F.interpolate(cells.float(), size=tuple(size), mode="nearest") > 0.5
