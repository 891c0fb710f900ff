"""Augmented views of normal images: the stand-in for unseen normal images when only the shots exist.

At one shot, a query that *is* the shot matches every normal patch of the memory at distance 0, so a model trained
or validated on the shot itself learns "any distance above 0 is a defect" (see ``docs/results.md``). Views of the
shot with small, plausible changes of pose and lighting (what two good images of one product differ by on a line)
stand in for other normal images: they train the models of :mod:`anomalib_synth.models` and make the normal half of
the synthetic validation split of the evaluation.

As in torchvision v2 and kornia, the random parameters are drawn apart from applying them
(:func:`sample_view_params`, then :func:`apply_views`), for a whole batch, from an explicit ``torch.Generator``, on
the input's device; the same parameters give the same views.

>>> import torch
>>> images = torch.rand(2, 3, 32, 32)
>>> params = sample_view_params(4, ViewRanges(), torch.Generator().manual_seed(0))
>>> apply_views(images[params["source"] % 2], params).shape
torch.Size([4, 3, 32, 32])
>>> torch.equal(apply_views(images, sample_view_params(2, ViewRanges.identity(), None)), images)
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ViewRanges", "apply_views", "augmented_views", "sample_view_params"]


@dataclass(frozen=True)
class ViewRanges:
    """How far a view may depart from its image. The defaults are small: a flipped or turned part can be a logical
    defect (a transistor's misplaced lead), so give larger ranges only for products that allow them (e.g.
    ``rotation=180`` for hazelnuts or screws lying anywhere).

    Args:
        rotation (float): largest rotation, degrees, either way. Defaults to ``10``.
        translate (float): largest shift, as a fraction of the side, either way. Defaults to ``0.05``.
        scale (float): largest relative zoom, either way. Defaults to ``0.05``.
        hflip (float): probability of a horizontal flip. Defaults to ``0.5``.
        vflip (float): probability of a vertical flip. Defaults to ``0``.
        brightness (float): largest additive brightness change. Defaults to ``0.05``.
        contrast (float): largest relative contrast change. Defaults to ``0.05``.
    """

    rotation: float = 10.0
    translate: float = 0.05
    scale: float = 0.05
    hflip: float = 0.5
    vflip: float = 0.0
    brightness: float = 0.05
    contrast: float = 0.05

    def __post_init__(self) -> None:
        bad = {k: v for k, v in asdict(self).items() if not (math.isfinite(v) and v >= 0)}
        bad.update({k: v for k, v in (("hflip", self.hflip), ("vflip", self.vflip)) if v > 1})
        if bad:
            msg = f"view ranges must be finite and >= 0 (flip probabilities <= 1), got {bad}"
            raise ValueError(msg)

    @classmethod
    def identity(cls) -> ViewRanges:
        """Views equal to their images."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def sample_view_params(
    n: int, ranges: ViewRanges, generator: torch.Generator | None, sources: int | None = None
) -> dict[str, Tensor]:
    """Parameters of ``n`` views, each a ``[n]`` tensor on the generator's device (CPU without one).

    ``source`` picks the image of each view among ``sources`` images (``0..n-1`` when ``sources`` is ``None``).
    """
    device = generator.device if generator is not None else torch.device("cpu")

    def uniform(limit: float) -> Tensor:  # in [-limit, limit]
        return (torch.rand(n, generator=generator, device=device) * 2 - 1) * limit

    source = (
        torch.arange(n, device=device)
        if sources is None
        else torch.randint(sources, (n,), generator=generator, device=device)
    )
    return {
        "source": source,
        "angle": uniform(ranges.rotation),
        "tx": uniform(ranges.translate),
        "ty": uniform(ranges.translate),
        "scale": 1 + uniform(ranges.scale),
        "hflip": torch.rand(n, generator=generator, device=device) < ranges.hflip,
        "vflip": torch.rand(n, generator=generator, device=device) < ranges.vflip,
        "brightness": uniform(ranges.brightness),
        "contrast": 1 + uniform(ranges.contrast),
    }


def apply_views(images: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Warp and relight ``images`` ``[n, C, H, W]`` (view ``i`` of ``images[i]``); values stay in ``[0, 1]``.

    The warp samples bilinearly with reflected borders (a texture continues, a plain background stays plain), so
    an identity view returns its image exactly.
    """
    p = {k: v.to(images.device) for k, v in params.items()}
    theta = torch.deg2rad(p["angle"].to(images.dtype))
    cos, sin = torch.cos(theta) / p["scale"], torch.sin(theta) / p["scale"]
    sx = torch.where(p["hflip"], -1.0, 1.0).to(images.dtype)
    sy = torch.where(p["vflip"], -1.0, 1.0).to(images.dtype)
    # output -> input coordinates in [-1, 1]: rotate/zoom, flip, then shift (2 * fraction of the side)
    affine = torch.stack(
        [
            torch.stack([cos * sx, -sin * sx, -2 * p["tx"].to(images.dtype)], -1),
            torch.stack([sin * sy, cos * sy, -2 * p["ty"].to(images.dtype)], -1),
        ],
        1,
    )
    warped = images
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=images.dtype, device=images.device)
    moved = ~(affine == identity).flatten(1).all(1)
    if moved.any():
        grid = F.affine_grid(affine[moved], list(images[moved].shape), align_corners=False)
        warped = images.clone()
        warped[moved] = F.grid_sample(images[moved], grid, mode="bilinear", padding_mode="reflection",
                                      align_corners=False)  # fmt: skip
    shape = (-1, 1, 1, 1)
    mean = warped.mean((1, 2, 3), keepdim=True)
    relit = (warped - mean) * p["contrast"].to(images.dtype).view(shape) + mean
    relit = relit + p["brightness"].to(images.dtype).view(shape)
    changed = (p["contrast"] != 1) | (p["brightness"] != 0)
    return torch.where(changed.view(shape), relit.clamp(0, 1), warped)


def augmented_views(
    images: Tensor, n: int, generator: torch.Generator | None, ranges: ViewRanges | None = None
) -> tuple[Tensor, Tensor]:
    """``n`` views of images drawn from ``images`` ``[k, C, H, W]``; returns ``(views, source index [n])``."""
    params = sample_view_params(n, ranges or ViewRanges(), generator, sources=len(images))
    source = params["source"].to(images.device)
    return apply_views(images[source], params), source
