"""CutPaste anomalies (Li et al., "CutPaste: Self-Supervised Learning for Anomaly Detection and Localization",
CVPR 2021, Sec. 3.1), batched and with masks.

``normal``: a rectangle of area ratio ``area_range`` (paper: 0.02-0.15 of the image) and aspect ratio
``aspect_range`` (paper: 0.3-3.3) is cut, colour-jittered (paper: 0.1) and pasted at another location.
``scar``: a thin rectangle, width 2-16 px and height 10-25 px at 256 px (scaled with the image), rotated by up to
45 degrees.

Departures from the paper, and why:
    - A mask of the pasted region is returned (the paper only needs an image-level label).
    - The patch may come from another image of the batch (``source="other"``), which gives defects of foreign
      texture; ``"same"`` is the paper's behaviour.
    - The normal mode may rotate too (``rotation``; default ``(-45, 45)`` for both modes); set ``(0, 0)`` for the
      paper's axis-aligned patches.
    - Several patches per image (``num_defects``) and foreground-limited placement are options.
    - With a foreground (``foreground="auto"``, the default, or ``fg_masks``), the patch is taken from the
      foreground too (``source_foreground``): its centre is drawn there, and the pixels whose source is background
      are left out of the defect. Otherwise a patch cut from anywhere pastes plain background onto the object (on
      MVTec bottle, white bars on a dark bottle: 20 % of scar pixels, 10 % of cutpaste pixels; now 0 %,
      ``benchmarks/background_pasted.py``).
    - Target pixels are sampled from the rotated source frame with bilinear interpolation; the mask is the exact
      rasterised rectangle, so pixels outside it are never touched.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Params, SynthesisResult, Synthesizer
from .ops import (
    channel_elements,
    jitter_pixels,
    log_uniform,
    mean_luma,
    rand,
    randint,
    sample_at,
    to_local,
    uniform,
)
from .placement import (
    DEFAULT_FOREGROUND,
    check_foreground_mode,
    resolve_foreground_or_everywhere,
    sample_centres,
    partial_foreground,
    sample_source_centres,
)
from .registry import register
from .validation import check_bool, check_choice, check_int_range, check_range

SOURCES = ("same", "other", "any")
MODES = ("normal", "scar")


def sample_sources(batch: int, source: str, generator: torch.Generator, device: torch.device, shape=()) -> Tensor:
    """Index of the image each sample takes its patch from: itself, another one, or any one of the batch."""
    index = torch.arange(batch, device=device).view(batch, *([1] * len(shape)))
    if source == "same" or batch == 1:
        return index.expand(batch, *shape).clone()
    if source == "other":
        offset = randint(1, batch - 1, (batch, *shape), generator, device)
    else:
        offset = randint(0, batch - 1, (batch, *shape), generator, device)
    return (index + offset) % batch


@register("cutpaste")
class CutPasteSynthesizer(Synthesizer):
    """CutPaste: a (colour-jittered, rotated) patch of the same or another image pasted elsewhere.

    Args:
        mode (str, optional): ``"normal"`` (rectangles) or ``"scar"`` (thin long rectangles). Defaults to
            ``"normal"``.
        source (str, optional): take the patch from the ``"same"`` image, an ``"other"`` image of the batch, or
            ``"any"``. Defaults to ``"same"``.
        area_range (tuple[float, float], optional): normal mode: patch area as a fraction of the image. Defaults to
            ``(0.02, 0.15)``.
        aspect_range (tuple[float, float], optional): normal mode: height / width ratio (log-uniform). Defaults to
            ``(0.3, 3.3)``.
        scar_width (tuple[float, float], optional): scar mode: width in px at 256 px. Defaults to ``(2, 16)``.
        scar_height (tuple[float, float], optional): scar mode: height in px at 256 px. Defaults to ``(10, 25)``.
        rotation (tuple[float, float], optional): rotation range, degrees. Defaults to ``(-45, 45)``.
        jitter (float, optional): colour jitter strength for brightness, contrast, saturation (``1 +- jitter``) and
            hue (``+- jitter * pi`` rad). Defaults to ``0.1``.
        num_defects (tuple[int, int], optional): number of patches per image, inclusive. Defaults to ``(1, 1)``.
        foreground (str, optional): ``"none"`` or ``"auto"``; patch centres are drawn inside the foreground and the
            mask is cut to it. Defaults to ``"auto"``
            (:data:`~anomalib_synth.synthesizers.placement.DEFAULT_FOREGROUND`).
        source_foreground (bool, optional): with a foreground (``"auto"`` or ``fg_masks``), take the patch from the
            foreground of its source image too: its centre is drawn there and pixels whose source is background are
            left out of the mask. ``False`` cuts it from anywhere in the image. Defaults to ``True``.
    """

    description = "CutPaste (normal or scar): a jittered, rotated patch of the same or another image pasted elsewhere"
    cost = "No network. One packed `grid_sample` over the masked pixels of the whole batch."
    _param_keys = ("num_defects", "source_index", "height", "width", "angle", "centre")

    def __init__(
        self,
        mode: str = "normal",
        source: str = "same",
        area_range: tuple[float, float] = (0.02, 0.15),
        aspect_range: tuple[float, float] = (0.3, 3.3),
        scar_width: tuple[float, float] = (2.0, 16.0),
        scar_height: tuple[float, float] = (10.0, 25.0),
        rotation: tuple[float, float] = (-45.0, 45.0),
        jitter: float = 0.1,
        num_defects: tuple[int, int] = (1, 1),
        foreground: str = DEFAULT_FOREGROUND,
        source_foreground: bool = True,
    ) -> None:
        super().__init__()
        self.mode = check_choice("mode", mode, MODES)
        self.source = check_choice("source", source, SOURCES)
        self.area_range = check_range("area_range", area_range, 1e-6, 0.8)
        self.aspect_range = check_range("aspect_range", aspect_range, 1e-2, 1e2)
        self.scar_width = check_range("scar_width", scar_width, 0.5, 256.0)
        self.scar_height = check_range("scar_height", scar_height, 0.5, 256.0)
        self.rotation = check_range("rotation", rotation, -360.0, 360.0)
        if not 0 <= jitter < 1:
            msg = f"jitter must be in [0, 1), got {jitter}"
            raise ValueError(msg)
        self.jitter = float(jitter)
        self.num_defects = check_int_range("num_defects", num_defects, 1, 64)
        self.foreground = check_foreground_mode(foreground)
        self.source_foreground = check_bool("source_foreground", source_foreground)

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        b, _, h, w = images.shape
        k = self.num_defects[1]
        device = images.device
        shape = (b, k)
        if self.mode == "normal":
            area = uniform(*self.area_range, shape, generator, device) * h * w
            aspect = log_uniform(*self.aspect_range, shape, generator, device)
            height, width = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        else:
            unit = min(h, w) / 256
            width = uniform(*self.scar_width, shape, generator, device) * unit
            height = uniform(*self.scar_height, shape, generator, device) * unit
        height = height.clamp(1.0, 0.9 * h)
        width = width.clamp(1.0, 0.9 * w)
        # a batch of textures under ``"auto"``: no mask to intersect with, centres drawn as from an all-true one
        found = resolve_foreground_or_everywhere(images, fg_masks, self.foreground)
        fg = found.mask
        centre = sample_centres(fg, images.shape, k, generator, device, found.everywhere, found.blocks)
        size = torch.stack((height, width), -1)
        half = size / 2
        limit = torch.tensor([h, w], device=device, dtype=torch.float32)
        u_source = rand((b, k, 2), generator, device)
        jitter = uniform(-self.jitter, self.jitter, (b, k, 4), generator, device)
        params = {
            "num_defects": randint(*self.num_defects, (b,), generator, device),
            "source_index": sample_sources(b, self.source, generator, device, (k,)),
            "height": height,
            "width": width,
            "angle": uniform(*self.rotation, shape, generator, device),
            "centre": centre,
            "source_centre": half + u_source * (limit - size),
            "jitter": jitter,
        }
        if fg is not None:
            params["fg"] = fg
            if self.source_foreground:
                params["fg_partial"] = partial = partial_foreground(fg)
                params["source_centre"] = sample_source_centres(
                    fg, params["source_index"], half, u_source, partial, found.blocks
                )
        return params

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        x = images.float()
        b, _, h, w = x.shape
        out = x.clone(memory_format=torch.contiguous_format)  # written through flat indices (``scatter_``)
        mask = torch.zeros(b, 1, h, w, device=x.device)  # float32, filled directly: no conversion pass at the end
        luma = mean_luma(x)
        jitter = params["jitter"].to(x)
        fg = params.get("fg")
        restrict = params.get("fg_partial") if fg is not None and self.source_foreground else None
        if fg is not None and self.source_foreground and restrict is None:
            restrict = partial_foreground(fg)
        labels = torch.zeros(b, dtype=torch.bool, device=x.device)
        for k in range(params["source_index"].shape[1]):
            centre = params["centre"][:, k].to(x)
            angle = torch.deg2rad(params["angle"][:, k].to(x))
            half = torch.stack((params["height"][:, k], params["width"][:, k]), -1).to(x) / 2
            n, y, xx, uy, ux = rect_pixels((h, w), centre, half, angle, params["num_defects"] > k)
            source = params["source_index"][:, k]
            src = params["source_centre"][:, k].to(x).index_select(0, n)
            sy, sx = src[:, 0] + uy, src[:, 1] + ux
            if fg is not None:
                # one filter of the pixel list: inside the foreground, and not taken from the donor's background
                keep = fg.view(-1).index_select(0, (n * h + y) * w + xx)
                if restrict is not None:
                    donor = source.index_select(0, n)
                    at = (donor * h + sy.long().clamp(0, h - 1)) * w + sx.long().clamp(0, w - 1)
                    keep &= ~restrict.index_select(0, donor) | fg.view(-1).index_select(0, at)
                keep = keep.nonzero().squeeze(1)
                n, y, xx, sy, sx = (t.index_select(0, keep) for t in (n, y, xx, sy, sx))
            values = sample_at(x, source.index_select(0, n), sy, sx, presorted=self.source == "same")
            jit = jitter[:, k]
            values = jitter_pixels(
                values, n, 1 + jit[:, 0], 1 + jit[:, 1], 1 + jit[:, 2], jit[:, 3] * math.pi, luma[source]
            )
            position = y * w + xx
            out.view(-1).scatter_(0, channel_elements(out, n, position).view(-1), values.view(-1))
            mask.view(-1).index_fill_(0, n * (h * w) + position, 1.0)
            labels[n] = True
        return self._result(images, out, mask, params, self._param_keys, labels)


def rect_pixels(
    size: tuple[int, int], centre: Tensor, half: Tensor, angle: Tensor, active: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Indices ``(b, y, x)`` (row-major per sample) of the pixels of :func:`rotated_rect_mask` in the samples
    ``active`` ``[B]``, and their coordinates ``(uy, ux)`` in the rectangle's frame
    (:func:`~anomalib_synth.synthesizers.ops.to_local` of the pixel centres).

    The same test as :func:`rotated_rect_mask` (so the same pixels), evaluated only in a window around each
    rectangle: its bounding box, as large as the largest of the batch, plus a pixel of margin.
    """
    h, w = size
    b = centre.shape[0]
    cos, sin = torch.cos(angle).abs(), torch.sin(angle).abs()
    extent = torch.stack((half[:, 0] * cos + half[:, 1] * sin, half[:, 0] * sin + half[:, 1] * cos), -1)
    reach = extent.amax(0).ceil().long().tolist() if b else [0, 0]
    sh, sw = min(h, 2 * reach[0] + 3), min(w, 2 * reach[1] + 3)
    top = (centre[:, 0].floor().long() - reach[0] - 1).clamp(0, h - sh)
    left = (centre[:, 1].floor().long() - reach[1] - 1).clamp(0, w - sw)
    ys = top.view(b, 1, 1) + torch.arange(sh, device=centre.device).view(1, sh, 1)
    xs = left.view(b, 1, 1) + torch.arange(sw, device=centre.device).view(1, 1, sw)
    view = (-1, 1, 1)
    uy, ux = to_local(ys.to(centre) + 0.5, xs.to(centre) + 0.5, centre.view(-1, 1, 1, 2), angle.view(view))
    inside = (uy.abs() <= half[:, 0].view(view)) & (ux.abs() <= half[:, 1].view(view)) & active.view(view)
    n, wy, wx = inside.nonzero(as_tuple=True)
    at = (n * sh + wy) * sw + wx  # multiply-adds: cheaper than splitting a flat index by integer division
    return (n, top.index_select(0, n) + wy, left.index_select(0, n) + wx, uy.reshape(-1).index_select(0, at),
            ux.reshape(-1).index_select(0, at))
