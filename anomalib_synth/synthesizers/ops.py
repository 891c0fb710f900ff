"""Batched building blocks shared by the classical synthesizers.

Random draws take an explicit ``torch.Generator`` and are made on the generator's device (they are small parameter
tensors), then moved to the target device. Image-sized work is plain tensor algebra over the whole batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> Tensor:
    """Uniform ``[0, 1)`` draws from ``generator``, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """Uniform draws in ``[low, high)``."""
    return low + (high - low) * rand(shape, generator, device)


def log_uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """Draws whose logarithm is uniform in ``[log low, log high)`` (for ratios such as aspect ratios)."""
    return torch.exp(uniform(math.log(low), math.log(high), shape, generator, device))


def randint(
    low: int, high: int, shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """Integers in ``[low, high]`` (both ends included)."""
    return torch.randint(low, high + 1, shape, generator=generator, device=generator.device).to(device)


def choose_k_of_n(batch: int, n: int, k: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
    """Bool ``[batch, n]`` with exactly ``min(k, n)`` distinct ``True`` entries per row, chosen uniformly."""
    ranks = rand((batch, n), generator, device).argsort(dim=1).argsort(dim=1)
    return ranks < k


def sample_derangement(batch: int, count: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
    """``count`` random cyclic permutations of ``range(batch)`` without fixed points, as ``[batch, count]``.

    Entry ``[i, k]`` is the image that gives image ``i`` its ``k``-th patch (``i`` itself only when ``batch == 1``).
    """
    order = rand((count, batch), generator, device).argsort(dim=1)  # a random cycle per column
    source = torch.empty_like(order)
    source.scatter_(1, order, order.roll(-1, dims=1))
    return source.t().contiguous()


def any_per_sample(mask: Tensor) -> Tensor:
    """Bool ``[B]``: whether each sample of a bool ``[B, ...]`` tensor has a set element.

    The maximum of its bytes, not ``Tensor.any``: on CPU the ``uint8`` reduction is vectorised and tens of times
    faster than the bool one."""
    return mask.flatten(1).view(torch.uint8).amax(1) > 0


def all_per_sample(mask: Tensor) -> Tensor:
    """Bool ``[B]``: whether every element of each sample of a bool ``[B, ...]`` tensor is set (as
    :func:`any_per_sample`, by the minimum of its bytes)."""
    return mask.flatten(1).view(torch.uint8).amin(1) > 0


def sample_points(weights: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling of pixels from non-negative ``weights`` ``[B, H, W]``.

    ``u`` holds uniform draws ``[B]`` (one pixel per sample) or ``[B, K]`` (``K`` pixels per sample, from one CDF).
    Returns float pixel centres ``[B, 2]`` (or ``[B, K, 2]``) as ``(y, x)``. A sample whose weights are all zero
    gets uniformly distributed pixels.

    Bool weights (a mask) are counted in integers: with ``cdf`` integer, ``cdf <= t`` is ``cdf <= floor(t)``, so
    the pixels are those of the float CDF (exact below ``2**24`` pixels). They are sampled in two levels, first the
    row from the CDF of the row counts, then the column from the CDF of that row alone: the same pixel as one CDF
    over all pixels (every pixel of an earlier row has a CDF value at most ``t``, every one of a later row above
    it), for one summing pass over the mask instead of a cumulative sum of it.
    """
    b, h, w = weights.shape
    flat = weights.reshape(b, -1)
    if flat.dtype == torch.bool and h * w < 2**24:
        batch = torch.arange(b, device=weights.device).view(-1, 1)
        row_counts = weights.view(torch.uint8).sum(-1, dtype=torch.int32)
        index = mask_cdf_index(row_counts, lambda row: weights[batch, row], u, w)
    else:
        flat = flat.to(torch.float32)
        empty = flat.sum(1, keepdim=True) <= 0
        flat = torch.where(empty, torch.ones_like(flat), flat)
        cdf = flat.cumsum(1)
        target = (u.to(cdf).view(b, -1) * cdf[:, -1:]).contiguous()
        index = torch.searchsorted(cdf, target, right=True)
    index = index.clamp_max(h * w - 1).view(u.shape)
    return torch.stack((index // w, index % w), dim=-1).to(torch.float32)



def mask_cdf_index(row_counts: Tensor, lines: Callable[[Tensor], Tensor], u: Tensor, w: int) -> Tensor:
    """The flat pixel index ``[B, K]`` that :func:`sample_points` draws with ``u`` from a bool ``[B, H, W]`` mask,
    given the mask by its per-row counts ``[B, H]`` (int32) and ``lines(row)``, its rows ``[B, K, W]`` at
    ``row`` ``[B, K]`` (rows of any representation: the full mask, or coarse blocks blown up)."""
    b, h = row_counts.shape
    row_cdf = row_counts.cumsum(1, dtype=torch.int32)  # [B, H]
    empty = row_cdf[:, -1:] <= 0
    total = torch.where(empty, h * w, row_cdf[:, -1:]).to(torch.float32)
    target = (u.to(torch.float32).view(b, -1) * total).to(torch.int32)  # [B, K]; truncation: floor, as t >= 0
    row = torch.searchsorted(row_cdf, target, right=True).clamp_max_(h - 1)
    before = torch.where(row > 0, row_cdf.gather(1, (row - 1).clamp_min(0)), 0)
    col_cdf = lines(row).cumsum(-1, dtype=torch.int32)  # the chosen rows only
    col = torch.searchsorted(col_cdf, (target - before).unsqueeze(-1), right=True).squeeze(-1)
    # an empty mask stands for all-ones weights, whose CDF is i + 1: the count of entries <= t is t
    return torch.where(empty, target.long(), row.long() * w + col)


def sample_points_blocks(coarse: Tensor, step: int, u: Tensor) -> Tensor:
    """:func:`sample_points` of the mask ``coarse`` ``[B, h, w]`` blown up to ``step x step`` blocks (as
    :func:`~anomalib_synth.synthesizers.placement.upsample_nearest` does), from the coarse mask alone: the same
    pixels, without a pass over the full-size mask."""
    b, hs, ws = coarse.shape
    h, w = hs * step, ws * step
    batch = torch.arange(b, device=coarse.device).view(-1, 1)
    row_counts = (coarse.view(torch.uint8).sum(-1, dtype=torch.int32) * step).repeat_interleave(step, dim=1)
    index = mask_cdf_index(row_counts, lambda row: coarse[batch, row // step].repeat_interleave(step, -1), u, w)
    index = index.clamp_max(h * w - 1).view(u.shape)
    return torch.stack((index // w, index % w), dim=-1).to(torch.float32)

def whole_image_points(u: Tensor, h: int, w: int) -> Tensor:
    """:func:`sample_points` of an all-true ``[B, H, W]`` mask, without the mask: pixel ``floor(u * H * W)`` in raster
    order, for draws ``u`` of any shape (returns ``[*u.shape, 2]`` ``(y, x)``)."""
    index = (u.to(torch.float32) * float(h * w)).to(torch.int32).long().clamp_max(h * w - 1)
    return torch.stack((index // w, index % w), dim=-1).to(torch.float32)


def to_grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma of ``[B, 3, H, W]`` (identity for 1 channel), keeping a channel dim."""
    if x.shape[1] == 1:
        return x
    weights = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def color_matrix(brightness: Tensor, saturation: Tensor, hue: Tensor) -> Tensor:
    """Per-sample ``[B, 3, 3]`` RGB matrices: gain ``brightness``, chroma scale ``saturation``, hue rotation ``hue``.

    Hue is rotated in YIQ space, a linear approximation of torchvision's HSV hue shift that costs one matrix
    product per pixel instead of two colour-space conversions.
    """
    to_yiq = _RGB_TO_YIQ.to(brightness)
    cos, sin = torch.cos(hue), torch.sin(hue)
    one, zero = torch.ones_like(hue), torch.zeros_like(hue)
    rot = torch.stack(
        (
            torch.stack((one, zero, zero), -1),
            torch.stack((zero, saturation * cos, -saturation * sin), -1),
            torch.stack((zero, saturation * sin, saturation * cos), -1),
        ),
        dim=-2,
    )
    return brightness.view(-1, 1, 1) * (_YIQ_TO_RGB.to(brightness) @ rot @ to_yiq)


def apply_color_matrix(matrix: Tensor, values: Tensor) -> Tensor:
    """``matrix @ value`` per pixel, for ``[N, 3, 3]`` matrices and ``[N, 3]`` values: three broadcast
    multiply-adds, faster on CPU than ``einsum``'s batched product of 3 x 3 matrices."""
    first = matrix[:, :, 0] * values[:, 0:1]
    return torch.addcmul(torch.addcmul(first, matrix[:, :, 1], values[:, 1:2]), matrix[:, :, 2], values[:, 2:3])


def rigid_grid(
    size: tuple[int, int],
    target_centre: Tensor,
    source_centre: Tensor,
    angle: Tensor,
    scale: Tensor | None = None,
    source_size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampling grid that maps each target pixel into a rotated, scaled source frame.

    For target pixel ``p`` (``(y, x)``, pixel centres), the local coordinate is ``u = R(-angle)(p - target_centre) /
    scale`` and the source coordinate is ``source_centre + u``.

    Args:
        size: target ``(H, W)``.
        target_centre, source_centre: ``[B, 2]`` as ``(y, x)`` pixels.
        angle: ``[B]`` radians. scale: ``[B]`` (target size / source size), default 1.
        source_size: ``(H, W)`` of the source image, defaults to ``size``.

    Returns:
        ``(grid, local)``: ``grid`` ``[B, H, W, 2]`` normalised for ``F.grid_sample(align_corners=False)``, and
        ``local`` ``[B, H, W, 2]`` (``(y, x)`` in source pixels, relative to ``source_centre``) for masks.
    """
    h, w = size
    sh, sw = source_size or size
    device, dtype = target_centre.device, target_centre.dtype
    ys = torch.arange(h, device=device, dtype=dtype) + 0.5
    xs = torch.arange(w, device=device, dtype=dtype) + 0.5
    dy = ys.view(1, h, 1) - target_centre[:, 0].view(-1, 1, 1)
    dx = xs.view(1, 1, w) - target_centre[:, 1].view(-1, 1, 1)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    uy = -sin * dx + cos * dy
    ux = cos * dx + sin * dy
    if scale is not None:
        uy = uy / scale.view(-1, 1, 1)
        ux = ux / scale.view(-1, 1, 1)
    sy = source_centre[:, 0].view(-1, 1, 1) + uy
    sx = source_centre[:, 1].view(-1, 1, 1) + ux
    grid = torch.stack((sx / sw * 2 - 1, sy / sh * 2 - 1), dim=-1)
    return grid, torch.stack((uy, ux), dim=-1)


def _dilate_axis(mask: Tensor, radius: int, dim: int) -> Tensor:
    """Dilation of a bool tensor along ``dim`` by a segment of ``2 radius + 1`` pixels, outside counted as unset.

    Doubling (a sparse table): ``log2(radius)`` shifted ORs of bool tensors, then two overlapping windows, instead
    of one comparison per kernel pixel per pixel as a max-pool does.
    """
    if radius <= 0:
        return mask
    n, k = mask.shape[dim], 2 * radius + 1
    pad_shape = list(mask.shape)
    pad_shape[dim] = radius
    pad = mask.new_zeros(pad_shape)
    window = torch.cat((pad, mask, pad), dim)  # window[i] = OR of padded[i : i + span]
    span = 1
    while 2 * span <= k:
        length = window.shape[dim] - span
        window = window.narrow(dim, 0, length) | window.narrow(dim, span, length)
        span *= 2
    return window.narrow(dim, 0, n) | window.narrow(dim, k - span, n)


def binary_dilate(mask: Tensor, radius: int) -> Tensor:
    """Dilation of a bool ``[..., H, W]`` mask by a square of side ``2r+1`` (pixels outside the image unset).

    Exactly ``F.max_pool2d(mask.float(), 2r+1, stride=1, padding=r) > 0.5``, computed separably on bools.
    """
    return _dilate_axis(_dilate_axis(mask, radius, -1), radius, -2)


def area_majority(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(mask.float(), size, mode="area") > 0.5`` of a bool ``[B, 1, H, W]`` mask, by counting.

    When ``size`` divides ``(H, W)`` into blocks of at most 64 pixels, the set pixels of each block are counted in
    ``uint8`` from strided slices (rows, then columns; no float copy) and compared with half the block: the same
    decision as the float mean, since a mean of ``count / n`` is above 0.5 exactly when ``2 count > n``. Other sizes
    take the float route.
    """
    h, w = mask.shape[-2:]
    sh, sw = size
    fy, fx = h // sh, w // sw
    if (sh, sw) == (h, w):
        return mask
    if fy * sh != h or fx * sw != w or fy * fx > 64:
        return F.interpolate(mask.float(), size=size, mode="area") > 0.5
    pixels = mask.view(torch.uint8)
    rows = pixels[..., 0::fy, :].clone()  # rows summed first, then columns: fy + fx strided adds, not fy * fx
    for dy in range(1, fy):
        rows += pixels[..., dy::fy, :]
    count = rows[..., 0::fx].clone()
    for dx in range(1, fx):
        count += rows[..., dx::fx]
    return count * 2 > fy * fx


def binary_open_close(mask: Tensor, radius: int) -> Tensor:
    """Morphological opening then closing of a bool ``[B, 1, H, W]`` mask with a square of side ``2r+1``.

    Erosion counts pixels outside the image as set. The two middle dilations are done as one of radius ``2r`` (the
    same set: a square of side ``2r+1`` dilated by itself is the square of side ``4r+1``, also near the border).
    """
    if radius <= 0:
        return mask
    eroded = ~binary_dilate(~mask, radius)
    return ~binary_dilate(~binary_dilate(eroded, 2 * radius), radius)


# Sparse pixel helpers: synthesizers change few pixels, so they compute the new values only where the mask is set
# (``nonzero`` once per call) instead of producing full-size candidate images.


@functools.cache
def _scipy_ndimage():  # noqa: ANN202
    """``scipy.ndimage`` (installed with scikit-image), imported on first use; ``None`` without scipy."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover
        return None
    return ndimage


def fill_holes(mask: Tensor) -> Tensor:
    """``mask`` (bool ``[..., H, W]``) with every hole filled: the pixels not reachable from the border through
    4-connected pixels outside the mask (as ``scipy.ndimage.binary_fill_holes``, per image).

    On CPU the pixels outside the mask are labelled once for the whole batch (``scipy.ndimage.label``, connected
    within each image only) and the components that touch a border are kept. On other devices (or without scipy)
    :func:`fill_holes_torch` computes the same set with tensor operations.
    """
    ndimage = _scipy_ndimage()
    if mask.device.type != "cpu" or ndimage is None or mask.numel() == 0:
        return fill_holes_torch(mask)
    h, w = mask.shape[-2:]
    free = (~mask).reshape(-1, h, w).numpy()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected, never across images
    labels, count = ndimage.label(free, structure)
    border = np.concatenate((labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]), axis=1)
    outside = np.zeros(count + 1, dtype=bool)
    outside[border] = True
    outside[0] = False  # label 0: the mask itself
    return torch.from_numpy(~outside[labels]).view(mask.shape)


def fill_holes_torch(mask: Tensor, max_rounds: int | None = None) -> Tensor:
    """:func:`fill_holes` in tensor operations only (any device).

    The reachable set grows from the border pixels outside the mask by whole runs: a round spreads reach along every
    row's runs of free pixels, then along every column's, so the number of rounds is the number of turns on the
    path to the deepest pixel, not its length.
    """
    free = ~mask
    reach = torch.zeros_like(mask)
    reach[..., 0, :], reach[..., -1, :], reach[..., :, 0], reach[..., :, -1] = True, True, True, True
    reach &= free
    for _ in range(max_rounds or mask.shape[-2] * mask.shape[-1]):
        grown = _spread_runs(_spread_runs(reach, free, -1), free, -2)
        if torch.equal(grown, reach):
            break
        reach = grown
    return ~reach


def _spread_runs(reach: Tensor, free: Tensor, dim: int) -> Tensor:
    """Set every pixel of a run of ``free`` pixels along ``dim`` in which some pixel is set in ``reach``."""
    run = (~free).to(torch.int64).cumsum(dim)  # the pixels of one run share a number; a blocked pixel starts one
    shape = list(reach.shape)
    shape[dim] += 1
    reached = torch.zeros(shape, dtype=torch.int64, device=reach.device)
    reached.scatter_add_(dim, run, reach.to(torch.int64))
    return (reached.gather(dim, run) > 0) & free


def mask_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices ``(b, p)`` of the set pixels of a bool ``[B, 1, H, W]`` mask, ``p = y * W + x`` (sorted by ``b``, then
    ``p``), as ``nonzero`` finds them, but faster on a sparse mask: the mask's bytes are read as 8-byte words,
    ``nonzero`` finds the words with a set pixel (an eighth of the elements), and a second ``nonzero`` scans the
    bytes of only those words. A mask whose bytes cannot be read as words (a size not a multiple of 8, an unaligned
    view) is scanned byte by byte."""
    h, w = mask.shape[-2:]
    flat = mask.reshape(-1).view(torch.uint8)
    if flat.numel() % 8 or flat.storage_offset() % 8:
        index = flat.nonzero().squeeze(1)
    else:
        word = flat.view(torch.int64).nonzero().squeeze(1)
        in_word = flat.view(-1, 8).index_select(0, word).view(-1).nonzero().squeeze(1)
        index = word.index_select(0, in_word >> 3).mul_(8).add_(in_word & 7)
    b = index.div(h * w, rounding_mode="floor")
    return b, index - b * (h * w)


def upsampled_mask_positions(values: Tensor, threshold: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Pixels ``(b, p)`` where ``F.interpolate(values, size, mode="bilinear", align_corners=False) >= threshold``, for
    ``values`` ``[B, 1, h, w]`` and per-sample ``threshold`` ``[B, 1, 1, 1]``, without the full-size map when ``size``
    is an integer multiple ``f >= 2`` of ``(h, w)``.

    Each full-size pixel interpolates the 2 x 2 cell of (edge-replicated) ``values`` around it, and the ``f x f``
    pixels that share a cell share its four corners. Only cells with a corner at or above the threshold can hold a
    pixel that is (the weights are convex); their pixels are interpolated from the corners with one ``[M, 4] @ [4,
    f * f]`` product of the weights. On a mask of a few percent that is about half the time of upsampling and
    thresholding everything. The values equal ``F.interpolate``'s up to float rounding, so a pixel within rounding of
    the threshold may differ.

    Returns ``b`` sorted (non-decreasing) and ``p = y * W + x``; within a sample, pixels come cell by cell (not in
    raster order). Other sizes are upsampled densely (:func:`mask_positions`).
    """
    h, w = values.shape[-2:]
    f = size[0] // h
    if f < 2 or tuple(size) != (f * h, f * w):
        full = values if tuple(size) == (h, w) else F.interpolate(values, size=size, mode="bilinear",
                                                                  align_corners=False)  # fmt: skip
        return mask_positions(full >= threshold)
    valid, first, weights, child_offset, corner_offset = _upsample_cells(h, w, f, values.device)
    padded = F.pad((values - threshold).float(), (1, 1, 1, 1), mode="replicate")  # [B, 1, h + 2, w + 2]
    rows = torch.maximum(padded[..., :-1, :], padded[..., 1:, :])
    hot = torch.zeros(padded.shape, dtype=torch.bool, device=values.device)  # cell (i, j): padded corners (i, j) ..
    torch.ge(torch.maximum(rows[..., :-1], rows[..., 1:]), 0, out=hot[..., :-1, :-1])  # .. (i + 1, j + 1)
    b, cell = mask_positions(hot)
    corners = padded.view(-1).take((b * ((h + 2) * (w + 2)) + cell).unsqueeze(1) + corner_offset)  # [M, 4]
    keep = (corners @ weights) >= 0  # [M, f * f]
    keep &= valid.index_select(0, cell)  # pixels of the edge cells that fall outside the image
    index = keep.view(-1).nonzero().squeeze(1)
    owner = index.div(f * f, rounding_mode="floor")
    position = first.index_select(0, cell).index_select(0, owner) + child_offset.index_select(0, index - owner * f * f)
    return b.index_select(0, owner), position


@functools.lru_cache(maxsize=8)
def _upsample_cells(h: int, w: int, f: int, device: torch.device) -> tuple[Tensor, ...]:
    """Per-size tables of :func:`upsampled_mask_positions` (cells of the ``(h + 2) x (w + 2)`` padded map)."""
    big_h, big_w = f * h, f * w
    start = -((f + 1) // 2)  # pixel ``y`` lies in padded cell ``(y - start) // f``: source ``(y + 0.5) / f - 0.5`` + 1
    cells_y = torch.arange(h + 2).view(-1, 1) * f + start  # first pixel row of each cell row
    cells_x = torch.arange(w + 2).view(1, -1) * f + start
    k = torch.arange(f)
    rows = (cells_y.unsqueeze(-1) + k).unsqueeze(-1)  # [h + 2, 1, f, 1]
    cols = (cells_x.unsqueeze(-1) + k).unsqueeze(-2)  # [1, w + 2, 1, f]
    valid = ((rows >= 0) & (rows < big_h) & (cols >= 0) & (cols < big_w)).reshape(-1, f * f)
    first = (cells_y * big_w + cells_x).reshape(-1)
    frac = (k.double() - (f + 1) // 2 + 0.5) / f + 0.5  # position of each pixel between its cell's corners
    pair = torch.stack((1 - frac, frac))  # [2 corners, f pixels]
    weights = (pair[:, None, :, None] * pair[None, :, None, :]).reshape(4, f * f).float()
    child_offset = (k.view(-1, 1) * big_w + k).reshape(-1)
    corner_offset = torch.tensor([0, 1, w + 2, w + 3])
    return tuple(t.to(device) for t in (valid, first, weights, child_offset, corner_offset))


def channel_elements(images: Tensor, b: Tensor, position: Tensor) -> Tensor:
    """Flat element indices ``[N, C]`` into a contiguous ``[B, C, H, W]`` tensor of the pixels ``(b, position)``
    (``position = y * W + x``), every channel: for ``take`` and ``scatter_`` on ``images.view(-1)``."""
    _, c, h, w = images.shape
    first = b * (c * h * w) + position
    return first.unsqueeze(1) + torch.arange(c, device=b.device) * (h * w)


def _ascending(index: Tensor) -> bool:
    """Whether a 1-D tensor is non-decreasing (``all`` taken as the minimum of bytes: vectorised on CPU)."""
    return index.numel() < 2 or bool((index[1:] >= index[:-1]).view(torch.uint8).amin())


def sample_at(
    images: Tensor, index: Tensor, sy: Tensor, sx: Tensor, padding_mode: str = "border", presorted: bool = False
) -> Tensor:
    """Bilinear samples ``[N, C]`` of ``images[index]`` at continuous pixel coordinates ``(sy, sx)`` (centres at
    +0.5), for ``N`` scattered points.

    The points are packed per source image into one ``F.grid_sample`` call (``[B, 1, max count, 2]`` grid), so the
    work is proportional to ``N``, not to the image size, and no per-sample copy of ``images`` is made.
    ``padding_mode`` is ``grid_sample``'s: ``"border"``, ``"reflection"`` or ``"zeros"``. Set ``presorted`` when
    ``index`` is non-decreasing (as from :func:`mask_positions`) to skip a sort; on CPU that is also checked (one pass
    without a sort), since a stable sort of a sorted index is the identity.
    """
    b, c, h, w = images.shape
    n = index.numel()
    if n == 0:
        return images.new_zeros(0, c)
    counts = torch.bincount(index, minlength=b)
    start = counts.cumsum(0) - counts
    if presorted or (index.device.type == "cpu" and _ascending(index)):
        slot = torch.arange(n, device=index.device) - start.index_select(0, index)
    else:
        order = torch.argsort(index, stable=True)
        slot = torch.empty_like(index)
        slot[order] = torch.arange(n, device=index.device) - start[index[order]]
    grid = images.new_zeros(b, 1, int(counts.max()), 2)
    grid[index, 0, slot] = torch.stack((sx / w * 2 - 1, sy / h * 2 - 1), -1).to(images.dtype)
    samples = F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return samples[index, :, 0, slot]


def jitter_pixels(
    values: Tensor, b: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor, mean: Tensor
) -> Tensor:
    """:func:`jitter_colors` on gathered pixels ``[N, C]`` of samples ``b`` (factors and mean luma are ``[B]``)."""
    if values.shape[1] == 3:
        values = apply_color_matrix(color_matrix(brightness, saturation, hue).index_select(0, b), values)
    else:
        values = values * brightness.index_select(0, b).unsqueeze(1)
    c = contrast.index_select(0, b).unsqueeze(1)
    return (values * c + (mean * brightness).index_select(0, b).unsqueeze(1) * (1 - c)).clamp(0, 1)


def mean_luma(images: Tensor) -> Tensor:
    """Mean luma per image, ``[B]``."""
    return to_grayscale(images.mean(dim=(2, 3), keepdim=True)).flatten()


def rotation_grid(size: tuple[int, int], angle: Tensor) -> Tensor:
    """The ``F.affine_grid(align_corners=False)`` that rotates ``[B, *, H, W]`` maps by ``angle`` ``[B]`` radians
    about their centre (in pixel units, so non-square maps are not sheared).

    Written out (two broadcast products per coordinate) instead of ``affine_grid``'s batched matrix product with
    three-element rows, which is ten times slower on CPU; the two agree to one float ulp.
    """
    h, w = size
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    xs = ((torch.arange(w, device=angle.device, dtype=angle.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, device=angle.device, dtype=angle.dtype) * 2 + 1) / h - 1).view(1, h, 1)
    return torch.stack((cos * xs - (sin * h / w) * ys, (sin * w / h) * xs + cos * ys), dim=-1)


def to_local(py: Tensor, px: Tensor, centre: Tensor, angle: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates of points ``(py, px)`` in the frame of a rectangle at ``centre`` ``[N, 2]`` rotated by ``angle``
    ``[N]`` (radians): ``R(-angle) (p - centre)``. All inputs broadcast."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    dy, dx = py - centre[..., 0], px - centre[..., 1]
    return cos * dy - sin * dx, cos * dx + sin * dy


def rotated_rect_mask(size: tuple[int, int], centre: Tensor, half: Tensor, angle: Tensor) -> Tensor:
    """Bool ``[B, 1, H, W]``: pixel centres inside the rectangle of half-sides ``half`` ``[B, 2]`` (``(y, x)``) at
    ``centre`` ``[B, 2]`` rotated by ``angle`` ``[B]`` radians."""
    h, w = size
    ys = (torch.arange(h, device=centre.device, dtype=centre.dtype) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, device=centre.device, dtype=centre.dtype) + 0.5).view(1, 1, w)
    view = (-1, 1, 1)
    uy, ux = to_local(ys, xs, centre.view(-1, 1, 1, 2), angle.view(view))
    return ((uy.abs() <= half[:, 0].view(view)) & (ux.abs() <= half[:, 1].view(view))).unsqueeze(1)
