"""The explorer without its web page: from the page's settings to a synthesized batch, its figures, and the config
and command that reproduce it.

:meth:`Explorer.preview` synthesizes exactly what ``anomalib-synth generate`` writes for the same settings: the same
images (:func:`~anomalib_synth.explore.sources.load_batch`), batch 0 of the seed
(:func:`~anomalib_synth.synthesis.synthesize_seeded_batch`), on the CPU.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid

from .. import metrics
from ..demo import overlay
from ..io import to_uint8
from ..synthesis import synthesize_seeded_batch
from ..synthesizers import SynthesisResult, Synthesizer, available, get_class
from ..synthesizers.registry import constructor_arguments, get
from .availability import offline_arguments, unavailable_reason
from .controls import FOREGROUND_ARGUMENT, Control, changed_arguments, derive_controls
from .reproduce import generate_command, synthesizer_block
from .sources import DEFAULT_PHOTOS, builtin_source, describe_folder, load_batch, load_real_defect, real_defects

__all__ = ["FOREGROUND_MODES", "Entry", "Explorer", "Preview", "Request"]

FOREGROUND_MODES = ("auto", "none", "drawn")
"""``auto``/``none``: the synthesizer's ``foreground`` argument; ``drawn``: a mask drawn (or uploaded) on the page,
passed as ``fg_masks``."""


@dataclass
class Request:
    """What the page is set to."""

    synthesizer: str
    values: dict[str, Any] = field(default_factory=dict)
    """``{control name: raw value}`` (see :meth:`Control.to_argument`); missing controls keep their defaults."""
    source: str = builtin_source(DEFAULT_PHOTOS)
    size: int = 256
    batch_size: int = 4
    seed: int = 0
    foreground: str = "auto"
    drawn_mask: Tensor | None = None
    """bool ``[1, 1, H, W]`` for ``foreground="drawn"`` (resized to ``size``)."""


@dataclass
class Preview:
    """A synthesized batch with what the page shows of it."""

    images: Tensor
    result: SynthesisResult
    figures: dict[str, float]
    ms_per_image: float
    yaml: str
    command: str
    arguments: dict[str, Any]
    notes: list[str]

    def picture(self) -> np.ndarray:
        """One row per sample: input | result | mask overlay (uint8 ``H x W x 3``)."""
        tiles = []
        for x, y, m in zip(self.images, self.result.images, self.result.masks, strict=True):
            tiles += [x, y, overlay(y, m)]
        return to_uint8(make_grid(torch.stack(tiles).clamp(0, 1), nrow=3, padding=2, pad_value=1.0))


@dataclass(frozen=True)
class Entry:
    """A registered synthesizer as the explorer lists it."""

    name: str
    description: str
    cls: type[Synthesizer] | None
    controls: tuple[Control, ...]
    reason: str | None
    """Why it cannot run here (one line), ``None`` when it can."""

    @property
    def takes_foreground(self) -> bool:
        accepted = constructor_arguments(self.cls) if self.cls is not None else []
        return accepted is None or FOREGROUND_ARGUMENT in accepted


class Explorer:
    """Lists the registered synthesizers with their controls and synthesizes previews.

    Args:
        images (str | Path | None): a folder of images (plain or MVTec-style); ``None``: scikit-image's photos only.
        output (str): the output folder named in the copied command.
        cache_size (int): built synthesizers kept for reuse (a texture folder is read once).
    """

    def __init__(self, images: str | Path | None = None, output: str = "explore_output", cache_size: int = 6) -> None:
        self.layout = describe_folder(images) if images is not None else None
        self.output = output
        self.entries = {name: _entry(name, description) for name, description in available().items()}
        self._built: OrderedDict[tuple[str, str], Synthesizer] = OrderedDict()
        self._cache_size = cache_size

    def folder_source(self, category: str = "") -> str:
        """The ``SOURCE`` of the given folder (of one category of an MVTec-style folder)."""
        if self.layout is None:
            msg = "no image folder was given (start with --images FOLDER)"
            raise ValueError(msg)
        folders = self.layout.normal_folders
        return str(folders.get(category) or next(iter(folders.values())))

    def arguments(self, request: Request) -> dict[str, Any]:
        """The constructor arguments of ``request``: those that differ from their defaults, and ``foreground``."""
        entry = self._entry(request.synthesizer)
        arguments = changed_arguments(entry.controls, request.values)
        if entry.takes_foreground:
            arguments[FOREGROUND_ARGUMENT] = "none" if request.foreground == "none" else "auto"
        return arguments

    def build(self, name: str, arguments: dict[str, Any]) -> Synthesizer:
        """``get(name, **arguments)``, offline, reused while the arguments stay the same."""
        key = (name, repr(sorted(arguments.items())))
        if key not in self._built:
            entry = self._entry(name)
            self._built[key] = get(name, **arguments, **offline_arguments(entry.cls)).eval()
            while len(self._built) > self._cache_size:
                self._built.popitem(last=False)
        self._built.move_to_end(key)
        return self._built[key]

    def preview(self, request: Request) -> Preview:
        """Synthesize ``request``'s batch.

        Raises:
            ValueError, OSError: a bad value (the synthesizer's own one-line error), a missing folder, unreachable
                weights.
        """
        if request.foreground not in FOREGROUND_MODES:
            msg = f"foreground must be one of {FOREGROUND_MODES}, got {request.foreground!r}"
            raise ValueError(msg)
        entry = self._entry(request.synthesizer)
        arguments = self.arguments(request)
        defaults = {c.name: c.default for c in entry.controls}
        reason = unavailable_reason(entry.cls, defaults, arguments) if entry.cls is not None else entry.reason
        if reason:
            raise ValueError(f"{request.synthesizer} is unavailable: {reason}")
        synth = self.build(request.synthesizer, arguments)
        images, _, notes = load_batch(request.source, request.size, request.batch_size)
        fg_masks = self._fg_masks(request, entry, notes)
        start = time.perf_counter()
        with torch.inference_mode():
            result = synthesize_seeded_batch(synth, images, request.seed, 0, "cpu", fg_masks)
        ms = (time.perf_counter() - start) * 1000 / len(images)
        drawn = request.foreground == "drawn"
        return Preview(
            images=images,
            result=result,
            figures=metrics.summarize(result, images),
            ms_per_image=ms,
            yaml=synthesizer_block(entry.cls, arguments, drawn=drawn),
            command=generate_command(request.synthesizer, arguments, request.source, request.size,
                                     request.batch_size, request.seed, self.output, drawn=drawn),  # fmt: skip
            arguments=arguments,
            notes=notes,
        )

    def real_defect(self, category: str, index: int, size: int) -> tuple[np.ndarray, str] | None:
        """A real defect of ``category`` (an MVTec-style folder) beside its mask overlay, and its file name."""
        if self.layout is None or not self.layout.is_mvtec:
            return None
        defects = real_defects(self.layout.normal_folders[category])
        if not defects:
            return None
        defect = defects[index % len(defects)]
        image, mask = load_real_defect(defect, size)
        grid = make_grid(torch.stack([image, overlay(image, mask)]), nrow=2, padding=2, pad_value=1.0)
        return to_uint8(grid), f"{defect.defect}/{defect.image.name}"

    def _fg_masks(self, request: Request, entry: Entry, notes: list[str]) -> Tensor | None:
        if request.foreground != "drawn":
            if not entry.takes_foreground and request.foreground == "auto":
                notes.append(f"{request.synthesizer} has no foreground option: defects may go anywhere")
            return None
        if request.drawn_mask is None or not bool(request.drawn_mask.any()):
            msg = "foreground 'drawn': draw the object on the image first (or upload a mask), or choose auto / none"
            raise ValueError(msg)
        mask = torch.nn.functional.interpolate(request.drawn_mask.float(), size=(request.size,) * 2, mode="nearest")
        return (mask > 0.5).expand(request.batch_size, 1, -1, -1)

    def _entry(self, name: str) -> Entry:
        if name not in self.entries:
            msg = f"unknown synthesizer {name!r}; available: {', '.join(self.entries)}"
            raise ValueError(msg)
        return self.entries[name]


def _entry(name: str, description: str) -> Entry:
    """Import, derive the controls of, and check one registered synthesizer (a plugin that fails to import is
    listed with the reason)."""
    from ..errors import one_line

    try:
        cls = get_class(name)
    except Exception as err:  # a third-party plugin's import error must not stop the explorer
        return Entry(name, description, None, (), f"cannot import it: {one_line(err)}")
    controls = derive_controls(cls)
    reason = unavailable_reason(cls, {c.name: c.default for c in controls})
    return Entry(name, description, cls, controls, reason)
