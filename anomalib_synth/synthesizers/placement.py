"""Where defects may go: foreground masks, given by the user or estimated from the image.

Automatic estimation (``foreground="auto"``), batched and sync-free:

1. The background colour of each image is the median of its 1-pixel border.
2. Each pixel's distance to that colour (max over channels) is thresholded with Otsu's method, computed on a
   256-bin histogram per image.
3. The mask is cleaned by a morphological opening and closing (radius ``~min(H, W) / 100``).
4. If fewer than ``border_agreement`` (90 %) of the border pixels fall in the background class (before step 3),
   the image has no uniform background (a texture such as carpet, grid, brick): its whole area is foreground. The
   same holds when the estimated foreground covers less than 1 % of the image.

This is the default of every synthesizer (:data:`DEFAULT_FOREGROUND`). It suits MVTec-style objects photographed on a plain background (bottle, hazelnut, screw, capsule, ...). For other
set-ups pass ``fg_masks`` explicitly.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .ops import (
    all_per_sample,
    any_per_sample,
    binary_open_close,
    mask_cdf_index,
    rand,
    sample_points,
    sample_points_blocks,
    whole_image_points,
)
from .validation import check_choice

ForegroundMode = Literal["none", "auto"]
FOREGROUND_MODES = ("none", "auto")
DEFAULT_FOREGROUND: ForegroundMode = "auto"
"""The one default of every synthesizer's ``foreground`` option: defects go on the estimated object, and textures
(no uniform background) keep the whole image. A defect on the empty background of a bottle is not an anomaly any
inspector would see; ``"none"`` (anywhere) remains one argument away."""


def _border(x: Tensor) -> Tensor:
    """Border pixels of ``[B, C, H, W]`` as ``[B, C, N]``."""
    return torch.cat((x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]), dim=-1)


def border_median(images: Tensor) -> Tensor:
    """The background colour of each image: the median of its 1-pixel border, ``[B, C]``."""
    return _border(images).median(dim=-1).values


def otsu_threshold(values: Tensor, bins: int = 256) -> Tensor:
    """Per-sample Otsu threshold of ``values`` ``[B, N]`` in ``[0, 1]``; returns ``[B]``."""
    b = values.shape[0]
    index = (values.clamp(0, 1) * (bins - 1)).round().long()
    hist = torch.zeros(b, bins, device=values.device, dtype=torch.float32)
    hist.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    prob = hist / hist.sum(1, keepdim=True)
    levels = torch.arange(bins, device=values.device, dtype=torch.float32) / (bins - 1)
    w0 = prob.cumsum(1)
    mu = (prob * levels).cumsum(1)
    mu_t = mu[:, -1:]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    return levels[between.argmax(1)]


def estimate_foreground(
    images: Tensor, border_agreement: float = 0.9, min_fraction: float = 0.01, work_size: int | None = 64
) -> Tensor:
    """Estimate bool foreground masks ``[B, 1, H, W]`` of ``images`` ``[B, C, H, W]`` in ``[0, 1]`` (see module doc).

    The estimate is made on every ``s``-th pixel (``s = min(H, W) // work_size``; a short side of about
    ``work_size`` px) and each of its pixels stands for an ``s x s`` block, so its cost hardly grows with the image size. ``work_size=None``
    works at full size.
    """
    coarse, step = estimate_foreground_coarse(images, border_agreement, min_fraction, work_size)
    return upsample_nearest(coarse, step, images.shape[-2:]) if step > 1 else coarse


def estimate_foreground_coarse(
    images: Tensor, border_agreement: float = 0.9, min_fraction: float = 0.01, work_size: int | None = 64
) -> tuple[Tensor, int]:
    """:func:`estimate_foreground` before its last step: the mask on every ``step``-th pixel, and ``step``
    (``upsample_nearest(mask, step, (H, W))`` is the full-size estimate)."""
    h, w = images.shape[-2:]
    step = 1 if work_size is None else max(1, min(h, w) // work_size)
    if step == 1:
        return _estimate_foreground(images.float(), border_agreement, min_fraction), 1
    small = images[..., step // 2 :: step, step // 2 :: step].float().contiguous()  # strided views are slow
    return _estimate_foreground(small, border_agreement, min_fraction), step


def upsample_nearest(mask: Tensor, step: int, size: tuple[int, int]) -> Tensor:
    """Blow a mask sampled at every ``step``-th pixel up to ``size``: each sample covers a ``step x step`` block (the
    last row and column of blocks are cut or repeated to fit)."""
    h, w = size
    sh, sw = mask.shape[-2:]
    if (sh * step, sw * step) == (h, w):
        # two broadcast copies (columns, then rows) of bytes: a quarter of the time of two ``repeat_interleave``s
        lead = mask.shape[:-2]
        rows = mask.view(torch.uint8).unsqueeze(-1).expand(*lead, sh, sw, step).reshape(*lead, sh, w)
        return rows.unsqueeze(-2).expand(*lead, sh, step, w).reshape(*lead, h, w).view(torch.bool)
    rows = torch.arange(h, device=mask.device).div_(step, rounding_mode="floor").clamp_max_(mask.shape[-2] - 1)
    cols = torch.arange(w, device=mask.device).div_(step, rounding_mode="floor").clamp_max_(mask.shape[-1] - 1)
    return mask.index_select(-2, rows).index_select(-1, cols)


def _estimate_foreground(x: Tensor, border_agreement: float, min_fraction: float) -> Tensor:
    b, _, h, w = x.shape
    bg = border_median(x)  # [B, C]
    dist = (x - bg[:, :, None, None]).abs_().amax(1, keepdim=True)  # [B, 1, H, W]
    scale = dist.flatten(1).amax(1).clamp_min(1e-6).view(b, 1, 1, 1)
    norm = dist / scale
    thr = otsu_threshold(norm.flatten(1)).view(b, 1, 1, 1)
    raw = norm > thr
    # judged before the clean-up, which would erase the speckles that a texture's "foreground" is made of
    border_bg = (~_border(raw.float()).bool()).float().mean(-1).view(b, 1, 1, 1)
    textured = border_bg < border_agreement
    if x.device.type == "cpu" and bool(textured.all()):
        # no image has a plain background (a batch of textures): the clean-up cannot change the answer, all
        # foreground (only on CPU, where this test is free; on a GPU it would wait for the device)
        return torch.ones_like(raw)
    fg = binary_open_close(raw, max(1, min(h, w) // 100))
    fraction = fg.float().mean(dim=(1, 2, 3), keepdim=True)
    no_background = textured | (fraction < min_fraction)
    return fg | no_background


def resolve_foreground(images: Tensor, fg_masks: Tensor | None, mode: str) -> Tensor | None:
    """The bool ``[B, 1, H, W]`` region where defects may go: user masks, else by ``mode``.

    ``None`` means everywhere (mode ``"none"``), which lets synthesizers skip the intersection.
    """
    if fg_masks is not None:
        return fg_masks
    if mode == "auto":
        return estimate_foreground(images)
    return None


class ResolvedForeground(NamedTuple):
    """A foreground as :func:`resolve_foreground_or_everywhere` finds it."""

    mask: Tensor | None
    """Bool ``[B, 1, H, W]``, or ``None`` (everywhere)."""
    everywhere: bool = False
    """Whether ``None`` stands for an all-true mask (an ``"auto"`` estimate on textures) rather than no foreground."""
    blocks: tuple[Tensor, int] | None = None
    """``(coarse, step)`` with ``mask == upsample_nearest(coarse, step, (H, W))`` exactly, when known: inverse-CDF
    draws can be made from the coarse mask (:func:`~anomalib_synth.synthesizers.ops.sample_points_blocks`)."""


def resolve_foreground_or_everywhere(images: Tensor, fg_masks: Tensor | None, mode: str) -> ResolvedForeground:
    """:func:`resolve_foreground`, and what is known of its structure.

    An ``"auto"`` estimate on a batch without a plain background (textures) is all foreground: it comes back as
    ``mask=None, everywhere=True``, without building the full-size mask. Callers then skip the intersections with it,
    which could not change anything, but draw centres as from a foreground (:func:`sample_centres`): the output is
    the one the all-true mask gives. Otherwise an ``"auto"`` estimate comes with its coarse ``blocks`` when they tile
    the image exactly.
    """
    if fg_masks is None and mode == "auto":
        coarse, step = estimate_foreground_coarse(images)
        if bool(all_per_sample(coarse).all()):
            return ResolvedForeground(None, everywhere=True)
        h, w = images.shape[-2:]
        blocks = (coarse, step) if (coarse.shape[-2] * step, coarse.shape[-1] * step) == (h, w) else None
        return ResolvedForeground(upsample_nearest(coarse, step, (h, w)) if step > 1 else coarse, blocks=blocks)
    return ResolvedForeground(resolve_foreground(images, fg_masks, mode))


def check_foreground_mode(mode: str) -> str:
    return check_choice("foreground", mode, FOREGROUND_MODES)


def sample_centres(
    fg: Tensor | None,
    shape: tuple[int, int, int, int],
    count: int,
    generator: torch.Generator,
    device: torch.device,
    everywhere: bool = False,
    blocks: tuple[Tensor, int] | None = None,
) -> Tensor:
    """``count`` defect centres per image of a ``[B, C, H, W]`` batch, as ``[B, count, 2]`` ``(y, x)`` pixels.

    With a foreground mask the centres are pixel centres drawn uniformly inside it (inverse-CDF sampling, one
    uniform draw per centre); without one they are uniform over the image. ``everywhere`` and ``blocks`` are what
    :func:`resolve_foreground_or_everywhere` knows of the mask: the same draws and centres, without a pass over
    the full-size mask.
    """
    b, _, h, w = shape
    if fg is None and not everywhere:
        return rand((b, count, 2), generator, device) * torch.tensor([h, w], device=device, dtype=torch.float32)
    u = rand((b * count,), generator, device).view(b, count)
    if everywhere:
        return whole_image_points(u, h, w) + 0.5
    if blocks is not None:
        return sample_points_blocks(blocks[0].squeeze(1), blocks[1], u) + 0.5
    return sample_points(fg.squeeze(1), u) + 0.5  # one CDF per image for its ``count`` centres


def sample_source_centres(
    fg: Tensor, source: Tensor, half: Tensor, u: Tensor, partial: Tensor | None = None,
    blocks: tuple[Tensor, int] | None = None,
) -> Tensor:
    """Centres ``[B, K, 2]`` (``(y, x)`` pixels) of source patches inside the foreground of their images.

    Patch ``(b, k)`` of half-sides ``half[b, k]`` (``(y, x)`` pixels) comes from image ``source[b, k]``, with two
    uniform draws ``u[b, k]``. Its centre is the pixel centre drawn (inverse-CDF, from ``u[b, k, 0]``) from that
    image's foreground pixels where the patch fits inside the image; if the patch fits nowhere on the foreground,
    from the whole foreground. A source whose foreground is the whole image (a texture) or empty gets
    ``half + u * (size - 2 half)``: uniform where the patch fits, as without a foreground. ``partial`` is
    :func:`partial_foreground` of ``fg``, if already known; ``blocks`` as in :class:`ResolvedForeground`.
    """
    b, _, h, w = fg.shape
    limit = torch.tensor([h, w], device=half.device, dtype=half.dtype)
    centres = half + u * (limit - 2 * half)
    on_object = (partial_foreground(fg) if partial is None else partial)[source]  # [B, K]: sources with an object on a background
    if not bool(on_object.any()):
        return centres
    pick = on_object.nonzero(as_tuple=True)
    ys = torch.arange(h, device=fg.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=fg.device, dtype=torch.float32) + 0.5
    hy, hx = half[pick][:, :1].to(ys), half[pick][:, 1:].to(xs)
    rows_fit, cols_fit = (ys >= hy) & (ys <= h - hy), (xs >= hx) & (xs <= w - hx)  # [N, H], [N, W]
    if blocks is not None:
        points = _fitting_points_blocks(blocks[0].index_select(0, source[pick]).squeeze(1), blocks[1], rows_fit,
                                        cols_fit, u[pick][:, 0])  # fmt: skip
        centres[pick] = points.to(centres) + 0.5
        return centres
    region = fg.index_select(0, source[pick]).squeeze(1)  # [N, H, W]
    inside = region & rows_fit.unsqueeze(2)  # rows where the patch fits ...
    inside &= cols_fit.unsqueeze(1)  # ... and columns
    fits_somewhere = any_per_sample(inside)
    weights = inside if bool(fits_somewhere.all()) else torch.where(fits_somewhere.view(-1, 1, 1), inside, region)
    centres[pick] = sample_points(weights, u[pick][:, 0]).to(centres) + 0.5
    return centres


def _fitting_points_blocks(coarse: Tensor, step: int, rows_fit: Tensor, cols_fit: Tensor, u: Tensor) -> Tensor:
    """:func:`sample_source_centres`' draw (before the half-pixel shift) from the blocks ``coarse`` ``[N, h, w]`` of
    the donors' foregrounds: the same pixels as from the full-size masks, counted block by block.

    A full-size row ``Y`` of ``mask & rows_fit & cols_fit`` holds ``rows_fit[Y] * sum_j coarse[Y // step, j] *
    (columns of block j that fit)`` pixels; a donor where the patch fits nowhere falls back to its whole mask.
    """
    n, hs, ws = coarse.shape
    w = ws * step
    batch = torch.arange(n, device=coarse.device).view(-1, 1)
    cols_per_block = cols_fit.view(n, ws, step).sum(-1, dtype=torch.int32)  # [N, ws]
    fitting = (coarse.to(torch.int32) * cols_per_block.unsqueeze(1)).sum(-1, dtype=torch.int32)  # [N, hs]
    fitting = fitting.repeat_interleave(step, dim=1) * rows_fit  # [N, H]
    whole = (coarse.view(torch.uint8).sum(-1, dtype=torch.int32) * step).repeat_interleave(step, dim=1)
    fits = (fitting.sum(1) > 0).view(-1, 1)
    row_counts = torch.where(fits, fitting, whole)

    def lines(row: Tensor) -> Tensor:
        full = coarse[batch, row // step].repeat_interleave(step, -1)  # [N, K, W]
        return torch.where(fits.unsqueeze(-1), full & cols_fit.unsqueeze(1), full)

    index = mask_cdf_index(row_counts, lines, u, w).clamp_max(hs * step * w - 1).view(u.shape)
    return torch.stack((index // w, index % w), dim=-1).to(torch.float32)


def partial_foreground(fg: Tensor) -> Tensor:
    """Bool ``[B]``: images whose foreground is neither empty nor the whole image (an object on a background), the
    ones patches are restricted to. An empty foreground stands for the whole image, so that a sample whose own
    foreground is set never loses its defect to a donor without one."""
    return any_per_sample(fg) & ~all_per_sample(fg)
