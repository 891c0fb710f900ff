"""Natural Synthetic Anomalies (Schlüter et al., "Natural Synthetic Anomalies for Self-Supervised Anomaly Detection
and Localization", ECCV 2022, Sec. 3), batched.

A rectangular patch of *another* image of the batch is resized by ``scale`` (paper: 0.7-1.3), moved to a different
location and Poisson-blended (gradient domain, :mod:`.poisson`) into the image, so that its texture appears without
a visible seam. The mask marks where the blend changed the image by more than ``change_threshold`` (max over
channels), with the holes inside it filled (a solid defect; the blend is kept there too); elsewhere the original
pixel is kept, so the image changes exactly where the mask says.

Departures from the paper and its code (hmsch/natural-synthetic-anomalies), and why:
    - Poisson blending is our batched membrane solver instead of one ``cv2.seamlessClone`` call per image; it
      corresponds to OpenCV's ``NORMAL_CLONE`` (the paper's choice for objects). ``MIXED_CLONE`` is not offered yet.
    - Patch sides are drawn uniformly from ``patch_size`` (fractions of the image side) instead of the paper's
      ``Gamma(2, 0.05) + 0.03`` half-widths, which makes the size range explicit.
    - The label is binary (the paper also has continuous / logistic labels).
    - When the blend leaves less than ``min_visible`` of a patch visibly changed, the patch is pasted unblended
      (the paper's code would keep an invisible "anomaly"; our masks must mark what changed).
    - Sources are paired by a random cyclic permutation of the batch (each image gives and receives one patch per
      defect), which keeps the work free of copies; with a batch of one image the patch comes from the image itself.
    - The blend is computed in a window around each target patch (its largest possible size plus a margin), not
      over the whole image, which keeps the cost proportional to the patch area.
    - With a foreground (``foreground="auto"``, the default, or ``fg_masks``), the patch is taken from the donor's
      foreground too (``source_foreground``): its centre is drawn there and the pixels whose source is the donor's
      background are left out of the blend region, so plain background is not pasted onto the object.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Params, SynthesisResult, Synthesizer
from .ops import fill_holes, rand, randint, rigid_grid, sample_derangement, uniform
from .placement import (
    DEFAULT_FOREGROUND,
    check_foreground_mode,
    resolve_foreground_or_everywhere,
    sample_centres,
    partial_foreground,
    sample_source_centres,
)
from .poisson import seamless_clone
from .registry import register
from .validation import check_bool, check_int_range, check_range


@register("nsa")
class NSASynthesizer(Synthesizer):
    """NSA: a resized, shifted patch of another image, Poisson-blended; the mask marks what the blend changed.

    Args:
        patch_size (tuple[float, float], optional): source patch height and width, each drawn as a fraction of the
            image side. Defaults to ``(0.1, 0.3)``.
        scale (tuple[float, float], optional): resize factor of the patch. Defaults to ``(0.7, 1.3)``.
        num_defects (tuple[int, int], optional): patches per image, inclusive. Defaults to ``(1, 1)``.
        change_threshold (float, optional): smallest change (in ``[0, 1]`` intensity) counted as anomalous.
            Defaults to ``0.03``.
        foreground (str, optional): ``"none"`` or ``"auto"``; patch centres are drawn inside the foreground and the
            blend is limited to it. Defaults to ``"auto"``
            (:data:`~anomalib_synth.synthesizers.placement.DEFAULT_FOREGROUND`).
        sweeps (int, optional): Jacobi sweeps per resolution level of the Poisson solver. Defaults to ``4``.
        min_visible (float, optional): if the blend changes less than this fraction of a patch (look-alike
            textures), the patch is pasted without blending instead, so the sample stays a visible anomaly. ``0``
            turns the fallback off. Defaults to ``0.3``.
        source_foreground (bool, optional): with a foreground (``"auto"`` or ``fg_masks``), take the patch from the
            donor's foreground too: its centre is drawn there and pixels whose source is background are left out of
            the region. ``False`` cuts it from anywhere in the donor. Defaults to ``True``.
    """

    description = "NSA: a resized patch of another image Poisson-blended elsewhere; the mask marks what changed"
    cost = "No network. A batched coarse-to-fine membrane (Poisson) solve in a window around each patch."
    _param_keys = ("num_defects", "source_index", "height", "width", "scale", "centre")

    def __init__(
        self,
        patch_size: tuple[float, float] = (0.1, 0.3),
        scale: tuple[float, float] = (0.7, 1.3),
        num_defects: tuple[int, int] = (1, 1),
        change_threshold: float = 0.03,
        foreground: str = DEFAULT_FOREGROUND,
        sweeps: int = 4,
        min_visible: float = 0.3,
        source_foreground: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = check_range("patch_size", patch_size, 0.01, 0.6)
        self.scale = check_range("scale", scale, 0.1, 1.5)
        self.num_defects = check_int_range("num_defects", num_defects, 1, 16)
        if not 0 <= change_threshold < 1:
            msg = f"change_threshold must be in [0, 1), got {change_threshold}"
            raise ValueError(msg)
        self.change_threshold = float(change_threshold)
        self.foreground = check_foreground_mode(foreground)
        self.sweeps = int(sweeps)
        if not 0 <= min_visible <= 1:
            msg = f"min_visible must be in [0, 1], got {min_visible}"
            raise ValueError(msg)
        self.min_visible = float(min_visible)
        self.source_foreground = check_bool("source_foreground", source_foreground)

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        b, _, h, w = images.shape
        k = self.num_defects[1]
        device = images.device
        side = torch.tensor([h, w], device=device, dtype=torch.float32)
        size = uniform(*self.patch_size, (b, k, 2), generator, device) * side
        # a batch of textures under ``"auto"``: no mask to intersect with, centres drawn as from an all-true one
        found = resolve_foreground_or_everywhere(images, fg_masks, self.foreground)
        fg = found.mask
        centre = sample_centres(fg, images.shape, k, generator, device, found.everywhere, found.blocks)
        num_defects = randint(*self.num_defects, (b,), generator, device)
        source_index = sample_derangement(b, k, generator, device)
        scale = uniform(*self.scale, (b, k), generator, device)
        u_source = rand((b, k, 2), generator, device)
        params = {
            "num_defects": num_defects,
            "source_index": source_index,
            "height": size[..., 0],
            "width": size[..., 1],
            "scale": scale,
            "centre": centre,
            "source_centre": size / 2 + u_source * (side - size),
        }
        if fg is not None:
            params["fg"] = fg
            if self.source_foreground:
                params["fg_partial"] = partial = partial_foreground(fg)
                params["source_centre"] = sample_source_centres(
                    fg, source_index, size / 2, u_source, partial, found.blocks
                )
        return params

    def window_size(self, h: int, w: int) -> tuple[int, int]:
        """Side of the square blend window: the largest target patch plus a 2 px margin on each side."""
        longest = self.patch_size[1] * self.scale[1]
        return min(h, math.ceil(longest * h) + 4), min(w, math.ceil(longest * w) + 4)

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        x = images.float()
        b, c, h, w = x.shape
        sh, sw = self.window_size(h, w)
        ys = torch.arange(sh, device=x.device).view(1, sh, 1)
        xs = torch.arange(sw, device=x.device).view(1, 1, sw)
        inner = torch.zeros(1, 1, sh, sw, dtype=torch.bool, device=x.device)
        inner[..., 1:-1, 1:-1] = True
        out = x.clone()
        mask = torch.zeros(b, 1, h, w, dtype=torch.bool, device=x.device)
        fg = params.get("fg")
        source_fg = restrict = None
        if fg is not None and self.source_foreground:
            restrict = params.get("fg_partial")
            restrict = partial_foreground(fg) if restrict is None else restrict  # empty or whole: no restriction
            source_fg = (fg | ~restrict.view(b, 1, 1, 1)).to(x) if bool(restrict.any()) else None
        for k in range(params["source_index"].shape[1]):
            centre = params["centre"][:, k].to(x)
            top = (centre[:, 0].round().long() - sh // 2).clamp(0, h - sh)
            left = (centre[:, 1].round().long() - sw // 2).clamp(0, w - sw)
            window = ((top.view(b, 1, 1) + ys) * w + left.view(b, 1, 1) + xs).view(b, 1, sh * sw)
            dst = out.view(b, c, h * w).gather(2, window.expand(-1, c, -1)).view(b, c, sh, sw)
            origin = torch.stack((top, left), -1).to(x)
            grid, local = rigid_grid(
                (sh, sw),
                centre - origin,
                params["source_centre"][:, k].to(x),
                torch.zeros_like(centre[:, 0]),
                params["scale"][:, k].to(x),
                source_size=(h, w),
            )
            # The sources form a permutation, so the grids are permuted instead of copying the source images.
            source = params["source_index"][:, k]
            permuted = torch.empty_like(grid)
            permuted[source] = grid
            src = F.grid_sample(x, permuted, mode="bilinear", padding_mode="border", align_corners=False)
            src = src[source]  # sample i's grid sat at position source[i]
            half = torch.stack((params["height"][:, k], params["width"][:, k]), -1).to(x).view(b, 1, 1, 2) / 2
            active = (params["num_defects"] > k).view(b, 1, 1, 1)
            region = (local.abs() <= half).all(-1).unsqueeze(1) & inner & active
            if fg is not None:
                region &= fg.view(b, 1, h * w).gather(2, window).view(b, 1, sh, sw)
            if source_fg is not None and bool(restrict[source].any()):  # leave out what comes from background
                region &= F.grid_sample(source_fg, permuted, mode="nearest", padding_mode="border",
                                        align_corners=False)[source] > 0.5  # fmt: skip
            blended = seamless_clone(dst, src, region, self.sweeps)
            changed = region & ((blended - dst).abs().amax(1, keepdim=True) > self.change_threshold)
            if self.min_visible > 0:
                # a blend of look-alike textures can leave (almost) nothing visible: paste those patches as they are
                area = region.sum((1, 2, 3), keepdim=True)
                faint = changed.sum((1, 2, 3), keepdim=True) < self.min_visible * area
                blended = torch.where(faint, torch.where(region, src, dst), blended)
                changed = region & ((blended - dst).abs().amax(1, keepdim=True) > self.change_threshold)
            changed = fill_holes(changed) & region  # a solid defect: look-alike pixels inside it belong to it
            result = torch.where(changed, blended, dst)
            out.view(b, c, h * w).scatter_(2, window.expand(-1, c, -1), result.view(b, c, -1))
            mask.view(b, 1, h * w).scatter_(
                2, window, changed.view(b, 1, -1) | mask.view(b, 1, h * w).gather(2, window)
            )
        return self._result(images, out, mask, params, self._param_keys)
