"""The one synthesizer API: ``synth(images, fg_masks=None, generator=None) -> SynthesisResult``.

Convention:
    - ``images`` are float ``[B, C, H, W]`` in ``[0, 1]`` with ``C`` in ``{1, 3}``, on any device. They are *not*
      normalised: in anomalib, synthesis runs before the model's ``PreProcessor``.
    - ``fg_masks`` (optional) are ``[B, 1, H, W]`` (bool, or float in ``{0, 1}``) and say where defects may go.
    - ``generator`` is the only source of randomness. Without one, a fresh generator is seeded from OS entropy; the
      global RNG is never touched.
    - Random parameters are drawn once per call by :meth:`Synthesizer.sample_params` as a dict of tensors whose first
      dimension is the batch. :meth:`Synthesizer.apply` is deterministic given those parameters, so a call can be
      replayed exactly (``synth.apply(images, params)``) and sampling can be tested apart from application.
    - Parameters are drawn on the generator's device (small tensors) and moved to the images' device; everything
      image-sized is computed on the images' device, for the whole batch at once.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .ops import any_per_sample

Params = dict[str, Tensor]

__all__ = [
    "RANGE_TOLERANCE",
    "Params",
    "SynthesisResult",
    "Synthesizer",
    "validate_images",
    "validate_fg_masks",
    "make_generator",
]


@dataclass
class SynthesisResult:
    """What every synthesizer returns.

    Attributes:
        images (Tensor): synthesized images, same shape, dtype and device as the input.
        masks (Tensor): float ``[B, 1, H, W]`` in ``{0, 1}``: 1 where the image was made anomalous.
        labels (Tensor): bool ``[B]``: ``True`` for samples whose mask is not empty.
        params (list[dict]): one JSON-serialisable dict of drawn parameters per sample (for manifests).
    """

    images: Tensor
    masks: Tensor
    labels: Tensor
    params: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


def make_generator(generator: torch.Generator | None = None, seed: int | None = None) -> torch.Generator:
    """Return ``generator``, or a new CPU generator seeded with ``seed`` (OS entropy when ``None``)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            msg = f"generator must be a torch.Generator, got {type(generator).__name__}"
            raise TypeError(msg)
        return generator
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


RANGE_TOLERANCE = 0.1
"""How far outside ``[0, 1]`` input values may be and still be accepted (then clamped).

Real pipelines overshoot a little: anomalib's antialiased bilinear ``Resize`` turns saturated white into
``1.0000002``, antialiased bicubic overshoots by about 1.2 %, upscaling bicubic or Lanczos by a few percent. Real
mistakes are far outside: 0-255 images, ImageNet-normalised images (about ``[-2.1, 2.6]``) and ``[-1, 1]`` images.
"""


def validate_images(images: Any) -> Tensor:
    """Check the image contract and return ``images``, clamped to ``[0, 1]``; raise ``ValueError`` naming what is wrong.

    Values up to :data:`RANGE_TOLERANCE` outside ``[0, 1]`` (resampling overshoot) are clamped; a tensor already
    in range is returned as it is (no copy).
    """
    if not isinstance(images, Tensor):
        msg = f"images must be a torch.Tensor [B,C,H,W] in [0,1], got {type(images).__name__}"
        raise ValueError(msg)
    if images.ndim != 4:
        msg = f"images must have rank 4 [B,C,H,W], got rank {images.ndim} with shape {tuple(images.shape)}"
        raise ValueError(msg)
    if images.shape[1] not in (1, 3):
        msg = f"images must have 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})"
        raise ValueError(msg)
    if not images.is_floating_point():
        msg = (
            f"images must be a floating point tensor in [0,1], got dtype {images.dtype}; "
            "convert uint8 images with `images.float() / 255`"
        )
        raise ValueError(msg)
    if images.numel():
        lo, hi = (float(v) for v in torch.aminmax(images))  # one pass; NaN propagates and fails the checks
        if not (lo >= -RANGE_TOLERANCE and hi <= 1.0 + RANGE_TOLERANCE):
            msg = (
                "images must be in [0,1] (un-normalised; synthesize before the model's Normalize), "
                f"got values in [{lo:.7g}, {hi:.7g}]"
            )
            raise ValueError(msg)
        if lo < 0.0 or hi > 1.0:
            images = images.clamp(0.0, 1.0)
    return images


def validate_fg_masks(fg_masks: Any, images: Tensor) -> Tensor | None:
    """Check ``fg_masks`` against ``images`` and return them as bool ``[B,1,H,W]`` on the images' device."""
    if fg_masks is None:
        return None
    if not isinstance(fg_masks, Tensor):
        msg = f"fg_masks must be a torch.Tensor [B,1,H,W] or None, got {type(fg_masks).__name__}"
        raise ValueError(msg)
    b, _, h, w = images.shape
    if fg_masks.ndim == 3:
        fg_masks = fg_masks.unsqueeze(1)
    if tuple(fg_masks.shape) != (b, 1, h, w):
        msg = f"fg_masks must have shape [B,1,H,W] = {(b, 1, h, w)} to match the images, got {tuple(fg_masks.shape)}"
        raise ValueError(msg)
    fg = fg_masks.to(images.device)
    return fg if fg.dtype == torch.bool else fg > 0.5


class Synthesizer(nn.Module):
    """Base class of all synthesizers.

    Subclasses implement :meth:`sample_params` and :meth:`apply`, and set the class attributes ``name`` (the
    registry's short name) and ``description`` (one line, shown by ``anomalib-synth list``).

    Example:
        >>> import torch
        >>> from anomalib_synth.synthesizers import get
        >>> synth = get("cutpaste")
        >>> out = synth(torch.rand(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
        >>> out.masks.shape, out.labels.tolist()
        (torch.Size([2, 1, 64, 64]), [True, True])
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires_weights: ClassVar[bool] = False
    """Whether the synthesizer loads pretrained models (the diffusion ones); the classical ones run as they are."""
    kind: ClassVar[str] = "classical"
    """``"classical"`` (runs per batch on any device, no weights) or ``"diffusion"``."""
    texture_argument: ClassVar[str | None] = None
    """The constructor argument that takes an anomaly-source folder (e.g. DTD), if the synthesizer has one."""
    cost: ClassVar[str] = ""
    """One paragraph on the compute cost (shown in the generated docs page)."""
    keeps_pixels_outside_mask: ClassVar[bool] = True
    """Whether every pixel outside the returned mask is the input's own, bit-exact (the README's promise). A
    synthesizer that sets it to ``False`` declares how far its changes reach in :meth:`affected_region`; the contract
    tests check that nothing changes beyond it."""

    def forward(
        self,
        images: Tensor,
        fg_masks: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SynthesisResult:
        """Synthesize one anomaly (set) per image.

        Args:
            images (Tensor): float ``[B, C, H, W]`` in ``[0, 1]``, ``C`` in ``{1, 3}``.
            fg_masks (Tensor | None, optional): ``[B, 1, H, W]``, where defects may go. Defaults to ``None``
                (the synthesizer's own ``foreground`` option decides).
            generator (torch.Generator | None, optional): the only source of randomness. Defaults to ``None``.

        Returns:
            SynthesisResult: images, masks, labels and per-sample params.

        Raises:
            ValueError: for a wrong dtype, rank, channel count, value range or mask shape.
        """
        images = validate_images(images)
        fg = validate_fg_masks(fg_masks, images)
        if images.shape[0] == 0:
            masks = images.new_zeros(0, 1, *images.shape[-2:], dtype=torch.float32)
            return SynthesisResult(images.clone(), masks, torch.zeros(0, dtype=torch.bool, device=images.device))
        params = self.sample_params(images, fg, make_generator(generator))
        return self.apply(images, params)

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        """Draw every random parameter of the call for the whole batch (tensors with leading dim ``B``)."""
        raise NotImplementedError

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        """Apply drawn ``params`` to ``images`` deterministically."""
        raise NotImplementedError

    anomalous_inside_any_foreground: ClassVar[bool] = True
    """Whether every sample with a non-empty foreground comes out anomalous. ``False`` for a method that places
    its defect without looking at the foreground and only cuts the mask to it (which may leave it empty)."""

    def affected_region(self, masks: Tensor) -> Tensor:
        """Bool ``[B, 1, H, W]``: where a call that returned ``masks`` may have changed pixels (the mask itself,
        unless the class declares ``keeps_pixels_outside_mask = False``)."""
        return masks > 0.5

    config_ignore: ClassVar[tuple[str, ...]] = ("device", "local_files_only", "progress")
    """Constructor arguments that do not change the output (left out of :meth:`config` and so of cache keys)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Record the constructor arguments of every subclass (as diffusers' ``register_to_config`` does)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_records_config", False):
            cls.__init__ = _recording(init)  # type: ignore[method-assign]

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments, defaults included (recorded in manifests and cache keys).

        Recorded automatically from every ``__init__`` in the class chain: the outermost value of an argument wins,
        arguments a subclass passes on through ``**kwargs`` are recorded where they are named.
        """
        recorded = self.__dict__.get("_init_config", {})
        return {k: _jsonable(v) for k, v in sorted(recorded.items()) if k not in self.config_ignore}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    @staticmethod
    def _result(
        images: Tensor,
        out: Tensor,
        masks: Tensor,
        params: Params,
        keys: tuple[str, ...],
        labels: Tensor | None = None,
    ) -> SynthesisResult:
        """Build the result: cast back to the input dtype, derive labels (unless given), export params as JSON."""
        if labels is None:
            labels = any_per_sample(masks if masks.dtype == torch.bool else masks != 0)
        if out.dtype != images.dtype:  # computed in float32: keep the input's own values outside the mask
            out = torch.where(masks if masks.dtype == torch.bool else masks > 0.5, out.to(images.dtype), images)
        return SynthesisResult(
            images=out,
            masks=masks.to(torch.float32),  # a float32 mask (built directly, a pass cheaper) is kept as it is
            labels=labels,
            params=params_to_json(params, keys, images.shape[0]),
        )


def _recording(init: Any) -> Any:
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording_init(self: Synthesizer, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        recorded = self.__dict__.setdefault("_init_config", {})  # plain attribute: set before nn.Module's __init__
        for name, parameter in signature.parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                recorded.setdefault(name, bound.arguments[name])
        init(self, *args, **kwargs)

    recording_init._records_config = True  # type: ignore[attr-defined]
    return recording_init


def _jsonable(value: Any) -> Any:
    """A JSON-friendly, stable form of a constructor argument (no memory addresses)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else str(value)
    if isinstance(value, Synthesizer):
        return {"synthesizer": value.name or type(value).__name__, "config": value.config()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Tensor):
        return value.tolist() if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    return type(value).__name__


def params_to_json(params: Params, keys: tuple[str, ...], batch_size: int) -> list[dict[str, Any]]:
    """Per-sample JSON dicts of the named entries of ``params`` (one host transfer per entry)."""
    columns = {}
    for key in keys:
        value = params[key].detach().cpu()
        columns[key] = value.reshape(batch_size, -1).tolist()
    out = []
    for i in range(batch_size):
        row = {}
        for key, col in columns.items():
            vals = [_json_number(v) for v in col[i]]
            row[key] = vals[0] if len(vals) == 1 else vals
        out.append(row)
    return out


def _json_number(value: float | int | bool) -> float | int | bool:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None  # type: ignore[return-value]
    return value
