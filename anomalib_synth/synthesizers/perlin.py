"""DRAEM-style Perlin-noise anomalies (Zavrtanik et al., "DRAEM", ICCV 2021, Sec. 3.3), batched.

Per image: a Perlin noise map with random power-of-two lattice resolution per axis (``2**[0, 5]``, DRAEM's
``perlin_scale=6`` exclusive) is rotated and thresholded into a mask ``M``; an anomaly source ``A`` (a texture from a
folder such as DTD, or the image itself, shifted and rotated) is augmented by ``n_augment`` of a list of colour
operations; inside the mask it is blended with opacity ``beta``:

    I' = (1 - M) * I + M * ((1 - beta) * I + beta * A)

``beta`` here is the *opacity of the anomaly source* (anomalib's ``blend_factor``; DRAEM's ``1 - beta``), drawn from
``beta`` = ``(0.2, 1.0)`` by default, the range of DRAEM's ``beta ~ U[0, 0.8]``.

Departures from DRAEM, and why:
    - All images of a batch are processed at once (noise lattices of different resolution are evaluated with a
      per-sample gather), with draws from an explicit generator; DRAEM and anomalib loop over images.
    - The noise is evaluated at up to 128 px on the short side and upsampled bilinearly, which makes it ~4x cheaper
      at 256 px. Against the noise evaluated at full size, on photos at 256 px, a mask's IoU is about 0.97 for
      lattices of up to 8 cells per axis and 0.91 for 16 cells (edge detail). The finest lattice (32 cells, 4 noise
      px per cell) loses part of its smallest specks to the two bilinear resamplings (rotation, upsampling): IoU
      about 0.68, area about 0.69x.
    - The upsampled noise is thresholded only in the cells near the mask
      (:func:`~anomalib_synth.synthesizers.ops.upsampled_mask_positions`), not as a full-size map.
    - A mask that would be empty (a known cause of anomalib's retry loop) is grown to the ``min_area`` highest-noise
      pixels inside the foreground, so every sample is anomalous unless the foreground itself is empty.
    - ``area_range`` optionally replaces the fixed threshold with a per-sample quantile, giving direct control of
      the defect size.
    - The augmentations are DRAEM's list minus the geometric and equalisation ones, implemented as batched colour
      operations (hue rotation is done in YIQ space).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import load_texture_bank
from .base import Params, SynthesisResult, Synthesizer
from .ops import (
    apply_color_matrix,
    area_majority,
    choose_k_of_n,
    color_matrix,
    channel_elements,
    mask_positions,
    rand,
    randint,
    rotation_grid,
    sample_at,
    to_grayscale,
    uniform,
    upsampled_mask_positions,
)
from .placement import (
    DEFAULT_FOREGROUND,
    check_foreground_mode,
    resolve_foreground_or_everywhere,
    upsample_nearest,
)
from .registry import register
from .validation import check_range

AUGMENT_OPS = ("gamma", "brightness", "hue_saturation", "solarize", "posterize", "invert", "autocontrast")


def _lattice_weights(n: int, res: Tensor, lattice: int) -> tuple[Tensor, Tensor]:
    """Interpolation weights of the lattice lines for ``n`` pixels along one axis, per sample.

    Returns ``weight`` ``[B, n, lattice]`` (the faded linear-interpolation weight of each lattice line, non-zero for
    the two lines around the pixel) and ``offset_weight`` = ``weight * (coordinate - line)``.
    """
    # pixel centres: at i / n, a lattice resolution dividing n would put every pixel on a lattice point (noise 0)
    coord = (torch.arange(n, device=res.device, dtype=torch.float32) + 0.5) / n * res.view(-1, 1).float()  # [B, n]
    cell = coord.floor()
    t = coord - cell
    fade = t * t * t * (t * (t * 6 - 15) + 10)
    lines = torch.arange(lattice, device=res.device, dtype=torch.float32).view(1, 1, -1)
    weight = torch.where(lines == cell.unsqueeze(-1), (1 - fade).unsqueeze(-1), 0.0)
    weight = weight + torch.where(lines == cell.unsqueeze(-1) + 1, fade.unsqueeze(-1), 0.0)
    return weight, weight * (coord.unsqueeze(-1) - lines)


@functools.lru_cache(maxsize=8)
def _lattice_table(n: int, lattice: int, device: torch.device) -> Tensor:
    """``(offset_weight, weight)`` of :func:`_lattice_weights` for every resolution ``0 .. lattice - 1``, concatenated
    on the last dimension (``[lattice, n, 2 lattice]``): a batch's weights are one ``index_select`` of its rows,
    instead of a dozen passes over ``[B, n, lattice]``. Cached per size (about 1 MB at 128 px)."""
    weight, offset_weight = _lattice_weights(n, torch.arange(lattice, device=device), lattice)
    return torch.cat((offset_weight, weight), 2)


def perlin_noise(size: tuple[int, int], res_y: Tensor, res_x: Tensor, angles: Tensor) -> Tensor:
    """Batched 2-D gradient (Perlin) noise in about ``[-1, 1]``, as two small matrix products per sample.

    Perlin noise at ``(y, x)`` is ``sum_ij Wy_i(y) Wx_j(x) (gx_ij (x - j) + gy_ij (y - i))`` over lattice points
    ``(i, j)`` with unit gradients ``(gy, gx)`` and faded interpolation weights ``W``. That sum factorises into
    ``Wy @ Gx @ Dx^T + Dy @ Gy @ Wx^T`` with ``D = W * offset``, evaluated as ``[Wy Gx, Dy Gy] @ [Dx, Wx]^T``:
    three batched matmuls for the whole batch (the sum folded into the last product's inner dimension).

    Args:
        size: ``(H, W)`` of the noise maps.
        res_y, res_x: ``[B]`` integer lattice resolutions (cells per axis), at most ``angles.shape[-1] - 1``.
        angles: ``[B, R+1, R+1]`` gradient directions (radians) of the lattice points.

    Returns:
        ``[B, 1, H, W]`` noise.
    """
    h, w = size
    lattice = angles.shape[-1]
    dwy = _lattice_table(h, lattice, angles.device).index_select(0, res_y)  # [B, H, 2 lattice]: (Dy, Wy)
    dwx = _lattice_table(w, lattice, angles.device).index_select(0, res_x)
    gx, gy = torch.cos(angles), torch.sin(angles)
    noise = torch.cat((dwy[..., lattice:] @ gx, dwy[..., :lattice] @ gy), 2) @ dwx.transpose(1, 2)
    return (math.sqrt(2) * noise).unsqueeze(1)


def sample_augment_params(batch: int, n_ops: int, generator: torch.Generator, device: torch.device) -> Params:
    """Draw DRAEM-style source augmentations: ``n_ops`` of :data:`AUGMENT_OPS` per sample and their strengths."""
    return {
        "aug_ops": choose_k_of_n(batch, len(AUGMENT_OPS), n_ops, generator, device),
        "aug_gamma": uniform(0.5, 2.0, (batch,), generator, device),
        "aug_gain": uniform(0.8, 1.2, (batch,), generator, device),
        "aug_offset": uniform(-30 / 255, 30 / 255, (batch,), generator, device),
        "aug_hue": uniform(-math.pi / 4, math.pi / 4, (batch,), generator, device),
        "aug_saturation": uniform(0.5, 1.5, (batch,), generator, device),
        "aug_solarize": uniform(0.125, 1.0, (batch,), generator, device),
        "aug_bits": randint(2, 5, (batch,), generator, device),
    }


def apply_augment(values: Tensor, b: Tensor, p: Params, low: Tensor, high: Tensor) -> Tensor:
    """Apply :func:`sample_augment_params` draws to source pixels ``[N, C]`` of samples ``b``.

    ``low`` / ``high`` (``[B, C]``) are the per-sample source extremes used by autocontrast. Autocontrast, the
    hue/saturation rotation, gain, offset and invert are all affine, so they are folded into one ``C x C`` matrix and
    bias per sample and applied with one product; then gamma, solarize and posterize follow. Unselected operations
    get identity parameters (an unselected posterize quantises to 2**-20); an operation no sample selected is
    skipped.
    """
    on = p["aug_ops"]
    one = torch.ones_like(p["aug_gamma"])
    c = values.shape[1]
    span = (high - low).clamp_min(1e-3)
    scale = torch.where(on[:, 6:7], 1 / span, 1.0)  # autocontrast: v -> scale * v + shift
    shift = torch.where(on[:, 6:7], -low / span, 0.0)
    gain = torch.where(on[:, 1], p["aug_gain"], one)
    sign = torch.where(on[:, 5], -1.0, 1.0)  # invert: v -> 1 - v
    offset = torch.where(on[:, 1], p["aug_offset"], 0.0) * sign + torch.where(on[:, 5], 1.0, 0.0)
    if c == 3:
        colour = color_matrix(
            gain * sign,
            torch.where(on[:, 2], p["aug_saturation"], one),
            torch.where(on[:, 2], p["aug_hue"], 0.0),
        )
    else:
        colour = (gain * sign).view(-1, 1, 1)
    matrix = colour * scale.unsqueeze(1)  # colour @ diag(scale)
    bias = (colour @ shift.unsqueeze(-1)).squeeze(-1) + offset.view(-1, 1)
    levels = torch.where(on[:, 4], torch.exp2(p["aug_bits"].float()), 2.0**20)  # 2**20 levels: identity to 1e-6
    per_sample = torch.cat(
        (
            matrix.flatten(1),
            bias,
            torch.where(on[:, 0], p["aug_gamma"], one).view(-1, 1),
            torch.where(on[:, 3], p["aug_solarize"], 2.0).view(-1, 1),
            levels.view(-1, 1),
        ),
        dim=1,
    ).index_select(0, b)  # one gather: [N, C*C + C + 3] (``index_select``: several times faster than ``[b]``)
    cc = c * c
    matrix, bias = per_sample[:, :cc].view(-1, c, c), per_sample[:, cc : cc + c]
    gamma, solarize, levels = per_sample[:, cc + c :].split(1, dim=1)
    values = apply_color_matrix(matrix, values) if c == 3 else values * matrix[:, 0]
    values = values.add_(bias).clamp_(0, 1)
    if bool(on[:, 0].any()):
        values = values.log_().mul_(gamma).exp_()  # ``pow`` with a tensor exponent is not vectorised: 2x slower
    if bool(on[:, 3].any()):
        values = torch.where(values >= solarize, 1 - values, values)
    return values.mul_(levels).floor_().div_(levels)


def threshold_with_floor(values: Tensor, threshold: float, k: int) -> Tensor:
    """Per row of ``values`` ``[B, N]``: ``threshold``, lowered to the row's ``k``-th highest value where fewer than
    ``k`` values reach it (``min(threshold, topk(values, k)[-1])``, ``[B, 1]``), so that at least ``k`` pass.

    Only the rows that need it are sorted: on photos most rows have ``k`` pixels above DRAEM's threshold.
    """
    out = values.new_full((values.shape[0], 1), threshold)
    short = ((values >= threshold).sum(1) < k).nonzero().squeeze(1)
    if len(short):
        # fewer than ``k`` values reach ``threshold``: the ``k``-th highest is below it
        out.index_copy_(0, short, values.index_select(0, short).topk(k, dim=1).values[:, -1:])
    return out


def _noise_size(size: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """The size the noise is evaluated at (up to 128 px on the short side) and the integer factor to ``size``."""
    h, w = size
    factor = max(1, min(h, w) // 128)
    return (math.ceil(h / factor), math.ceil(w / factor)), factor


@register("perlin")
class PerlinSynthesizer(Synthesizer):
    """DRAEM-style anomalies: a thresholded Perlin mask filled with an augmented texture or the image itself.

    Args:
        texture_dir (str | Path | None, optional): folder of anomaly-source textures (e.g. DTD ``images/``), searched
            recursively. ``None`` uses the image itself (shifted, rotated and recoloured). Defaults to ``None``.
        beta (tuple[float, float], optional): opacity range of the anomaly source inside the mask. Defaults to
            ``(0.2, 1.0)``.
        scale_range (tuple[int, int], optional): exponents of the Perlin lattice resolution ``2**k``, inclusive.
            Small values give large blobs. Defaults to ``(0, 5)``.
        threshold (float, optional): noise threshold of the mask (DRAEM: 0.5). Defaults to ``0.5``.
        area_range (tuple[float, float] | None, optional): if given, each mask covers a fraction of the foreground
            drawn from this range instead of using ``threshold``. Defaults to ``None``.
        rotation (tuple[float, float], optional): rotation range of the noise, degrees. Defaults to ``(-90, 90)``.
        n_augment (int, optional): number of augmentations applied to the source. Defaults to ``3``.
        min_area (float, optional): smallest mask, as a fraction of the image. Defaults to ``0.002``.
        foreground (str, optional): ``"none"`` (anywhere) or ``"auto"`` (estimated object region, see
            :mod:`anomalib_synth.synthesizers.placement`). ``fg_masks`` passed to the call take precedence.
            Defaults to ``"auto"``
            (:data:`~anomalib_synth.synthesizers.placement.DEFAULT_FOREGROUND`).
        texture_size (int, optional): side length textures are stored at (uint8, in memory). Defaults to ``256``.
        max_textures (int, optional): at most this many textures are preloaded
            (evenly spaced in sorted order), so that no disk read happens per call. Defaults to ``256``.

    Raises:
        ValueError: for an empty or missing ``texture_dir`` or out-of-range arguments.
    """

    description = "DRAEM-style Perlin-noise mask filled with a texture (e.g. DTD) or the image itself"
    cost = (
        "No network. One batched pass: three batched matmuls for the noise at up to 128 px, then work on the "
        "cells near the mask and the masked pixels only. About 11x anomalib's generator in images per second on "
        "photos, 2 CPU threads (`benchmarks/classical_throughput.py`)."
    )
    texture_argument = "texture_dir"
    _param_keys = ("beta", "res_y", "res_x", "angle", "texture")

    def __init__(
        self,
        texture_dir: str | Path | None = None,
        beta: tuple[float, float] = (0.2, 1.0),
        scale_range: tuple[int, int] = (0, 5),
        threshold: float = 0.5,
        area_range: tuple[float, float] | None = None,
        rotation: tuple[float, float] = (-90.0, 90.0),
        n_augment: int = 3,
        min_area: float = 0.002,
        foreground: str = DEFAULT_FOREGROUND,
        texture_size: int = 256,
        max_textures: int = 256,
    ) -> None:
        super().__init__()
        self.beta = check_range("beta", beta, 0.0, 1.0)
        self.scale_range = tuple(int(v) for v in check_range("scale_range", scale_range, 0, 6))
        if not -1.0 < threshold < 1.0:
            msg = f"threshold must be in (-1, 1), got {threshold}"
            raise ValueError(msg)
        self.threshold = float(threshold)
        self.area_range = None if area_range is None else check_range("area_range", area_range, 1e-6, 1.0)
        self.rotation = check_range("rotation", rotation, -360.0, 360.0)
        if not 0 <= n_augment <= len(AUGMENT_OPS):
            msg = f"n_augment must be in [0, {len(AUGMENT_OPS)}], got {n_augment}"
            raise ValueError(msg)
        self.n_augment = int(n_augment)
        self.min_area = float(min_area)
        self.foreground = check_foreground_mode(foreground)
        self.texture_dir = None if texture_dir is None else str(texture_dir)
        self.texture_size = int(texture_size)
        self.max_textures = int(max_textures)
        textures = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        if texture_dir is not None:
            bank = load_texture_bank(texture_dir, self.texture_size, limit=self.max_textures)
            textures = (bank * 255).round().to(torch.uint8)
        self.register_buffer("textures", textures, persistent=False)
        extremes = torch.stack(torch.aminmax(textures.flatten(2).float() / 255, dim=-1), 1)  # [N, 2, 3]
        self.register_buffer("texture_range", extremes, persistent=False)

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        b, device = images.shape[0], images.device
        lo, hi = self.scale_range
        n_lattice = 2**hi + 1
        params: Params = {
            "beta": uniform(*self.beta, (b,), generator, device),
            "res_y": torch.exp2(randint(lo, hi, (b,), generator, device).float()).long(),
            "res_x": torch.exp2(randint(lo, hi, (b,), generator, device).float()).long(),
            "lattice": uniform(0, 2 * math.pi, (b, n_lattice, n_lattice), generator, device),
            "angle": uniform(*self.rotation, (b,), generator, device),
            "target_area": uniform(*(self.area_range or (0.0, 0.0)), (b,), generator, device),
            "texture": randint(0, max(len(self.textures) - 1, 0), (b,), generator, device),
            "shift": rand((b, 2), generator, device),
            "source_angle": uniform(-180, 180, (b,), generator, device),
        }
        params.update(sample_augment_params(b, self.n_augment, generator, device))
        found = resolve_foreground_or_everywhere(images, fg_masks, self.foreground)
        if found.everywhere:
            # no image has a plain background (a batch of textures): :meth:`_mask` skips its foreground passes (the
            # empty-mask rescue still applies)
            params["fg_everywhere"] = torch.ones(b, dtype=torch.bool, device=device)
        elif found.mask is not None:
            params["fg"] = found.mask
            small, factor = _noise_size(images.shape[-2:])
            if found.blocks is not None and found.blocks[1] % factor == 0 and small == (
                images.shape[-2] // factor,
                images.shape[-1] // factor,
            ):
                # each noise pixel covers a block of the full-size mask inside one of its coarse blocks: the area
                # majority of that block is the coarse value (what :meth:`_mask` would compute, at a fraction of
                # the cost)
                coarse, step = found.blocks
                params["fg_noise"] = upsample_nearest(coarse, step // factor, small)
        return params

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        # ``out`` starts as a contiguous copy of the images, read and written through flat element indices
        # (``take`` / ``scatter_``: about twice as fast as indexing ``[b, :, y, x]``)
        out = images.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # one copy, any input dtype
        b, at = self._mask(params, out.shape[-2:])
        y = at.div(out.shape[-1], rounding_mode="floor")
        source, low, high = self._source(out, params, b, y, at - y * out.shape[-1])
        source = apply_augment(source, b, params, low, high)
        beta = params["beta"].to(out).index_select(0, b).unsqueeze(1)
        elements = channel_elements(out, b, at)
        blended = torch.lerp(out.view(-1).take(elements), source, beta)
        out.view(-1).scatter_(0, elements.view(-1), blended.view(-1))
        labels = torch.bincount(b, minlength=out.shape[0]) > 0  # from the pixel list: no pass over the mask
        keys = self._param_keys + (("target_area",) if self.area_range is not None else ())
        # the float mask filled from the pixel list: a fifth of the time of converting the bool one
        masks = out.new_zeros((out.shape[0], 1, *out.shape[-2:]))
        masks.view(-1).index_fill_(0, b * masks[0].numel() + at, 1.0)
        return self._result(images, out, masks, params, keys, labels)

    def sample_masks(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Tensor:
        """Only the masks (bool ``[B, 1, H, W]``) this synthesizer would draw: the mask generator of other methods."""
        b, at = self._mask(self.sample_params(images, fg_masks, generator), images.shape[-2:])
        masks = torch.zeros((images.shape[0], 1, *images.shape[-2:]), dtype=torch.bool, device=images.device)
        masks.view(-1).index_fill_(0, b * masks[0].numel() + at, True)
        return masks

    def _noise(self, params: Params, size: tuple[int, int]) -> Tensor:
        """Rotated Perlin noise at up to 128 px on the short side (upsampled later by :meth:`_mask`)."""
        small, _ = _noise_size(size)
        # at most one lattice cell per 2 noise pixels, so that tiny images still get varied noise
        res_y = params["res_y"].clamp(1, max(1, small[0] // 2))
        res_x = params["res_x"].clamp(1, max(1, small[1] // 2))
        noise = perlin_noise(small, res_y, res_x, params["lattice"])
        grid = rotation_grid(small, torch.deg2rad(params["angle"].float()))
        return F.grid_sample(noise, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _mask(self, params: Params, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Threshold the noise: per-sample thresholds are found on the small map, then applied at full size.

        Returns the mask's pixels ``(b, y * W + x)``, ``b`` sorted
        (:func:`~anomalib_synth.synthesizers.ops.upsampled_mask_positions`)."""
        fg = params.get("fg")
        noise = self._noise(params, size)
        candidates = noise
        if fg is not None:
            fg_small = params.get("fg_noise")
            if fg_small is None:
                fg_small = area_majority(fg, noise.shape[-2:])
            candidates = noise.masked_fill(~fg_small, float("-inf"))
        candidates = candidates.flatten(1)
        n_pixels = candidates.shape[1]
        if self.area_range is not None:
            n_fg = n_pixels if fg is None else (candidates > float("-inf")).sum(1)
            k = (params["target_area"] * n_fg).round().long().clamp(1, n_pixels)
            threshold = candidates.sort(dim=1, descending=True).values.gather(1, (k - 1).view(-1, 1))
        else:
            threshold = threshold_with_floor(candidates, self.threshold, max(1, round(self.min_area * n_pixels)))
        threshold = threshold.view(-1, 1, 1, 1)
        b, at = upsampled_mask_positions(noise, threshold, size)  # no full-size map: only cells near the mask
        if fg is None and "fg_everywhere" not in params:  # foreground "none": no rescue of an empty mask
            return b, at
        if fg is not None:
            inside = fg.reshape(-1).take(b * fg[0].numel() + at).nonzero().squeeze(1)
            b, at = b.index_select(0, inside), at.index_select(0, inside)
        if bool((torch.bincount(b, minlength=noise.shape[0]) > 0).all()):
            return b, at
        # the threshold was found on the small map: never let it exceed the best full-size foreground pixel (only
        # needed where no foreground pixel reaches it, a rare case, so the full-size map is made only then)
        if noise.shape[-2:] != tuple(size):
            noise = F.interpolate(noise, size=size, mode="bilinear", align_corners=False)
        best = (noise if fg is None else noise.masked_fill(~fg, float("-inf"))).amax(dim=(1, 2, 3), keepdim=True)
        mask = noise >= torch.minimum(threshold, best)
        if fg is not None:
            mask &= fg
        return mask_positions(mask)

    def _source(self, x: Tensor, params: Params, b: Tensor, y: Tensor, xx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Anomaly-source values at the masked pixels ``[N, C]``, and per-sample source extremes ``[B, C]``."""
        _, c, h, w = x.shape
        py, px = y.to(x) + 0.5, xx.to(x) + 0.5
        if len(self.textures):
            index = params["texture"]
            on_bank = index.to(self.textures.device)
            bank = self.textures[on_bank].to(x) / 255  # only the B textures in use move to the images' device
            side = bank.shape[-1]
            values = sample_at(bank, b, py * side / h, px * side / w, presorted=True)
            low, high = self.texture_range[on_bank].to(x).unbind(1)
            if c == 1:
                return to_grayscale(values[..., None, None])[:, :, 0, 0], low.amin(1, True), high.amax(1, True)
            return values, low, high
        # source = the image rotated about its centre and shifted: per sample, s = t + R (p - centre), written as one
        # affine map per sample and applied to the masked pixels with a single gather of its coefficients
        angle = torch.deg2rad(params["source_angle"].to(x))
        cos, sin = torch.cos(angle), torch.sin(angle)
        shift = params["shift"].to(x) * x.new_tensor([h, w])
        affine = torch.stack(
            (
                shift[:, 0] - cos * h / 2 + sin * w / 2, cos, -sin,
                shift[:, 1] - cos * w / 2 - sin * h / 2, sin, cos,
            ),
            dim=1,
        ).index_select(0, b)  # fmt: skip
        sy = torch.addcmul(torch.addcmul(affine[:, 0], affine[:, 1], py), affine[:, 2], px)
        sx = torch.addcmul(torch.addcmul(affine[:, 3], affine[:, 4], py), affine[:, 5], px)
        # nearest-neighbour lookup, wrapping around the borders: a rotated copy of the image needs no interpolation
        # to serve as an anomaly source
        sy = sy.floor().long().remainder_(h)
        sx = sx.floor().long().remainder_(w)
        values = x.view(-1).take(channel_elements(x, b, sy * w + sx))
        # autocontrast stretches the part of the source that is used, not the whole image (no full-image pass)
        index = b.unsqueeze(1).expand_as(values)
        low = values.new_full((x.shape[0], c), float("inf")).scatter_reduce(0, index, values, "amin")
        high = values.new_full((x.shape[0], c), float("-inf")).scatter_reduce(0, index, values, "amax")
        return values, low.clamp(0, 1), high.clamp(0, 1)
