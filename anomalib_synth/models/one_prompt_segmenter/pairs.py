"""Synthetic change pairs for the one-prompt segmenter, and the leakage check of its training images.

MetaUAS (Gao, NeurIPS 2024) trains on a generic change-segmentation data set synthesised from existing image
collections (object-level and local-region changes pasted into images). This project has no such collection and a
budget of CPU minutes, so the pairs are made here from **normal images outside the evaluated category**, with this
project's synthesizers:

- *prompt* = a normal image (resized to a square);
- *query* = an augmented view of it (:func:`anomalib_synth.views.augmented_views`: small rotations, shifts, zooms,
  flips, light changes; two good images of one product differ that way), which also teaches the model that a
  moved normal pattern is not a defect (the self-matching pitfall of one shot);
- with probability ``anomaly_ratio``, a synthetic anomaly on the query from a per-sample mix of synthesizers
  (default ``perlin+cutpaste+nsa+scar``); *target* = its mask (empty otherwise).

Sources (:func:`pair_sources`) are the normal images of every data root (``**/good/*`` of MVTec-like folders, and
texture folders without a train/test layout such as DTD's ``images/<class>/``), minus every path that has an
excluded category as a folder component, plus scikit-image's photos. Images of ``test/<defect>`` and
``ground_truth`` folders are never sources. :func:`check_segmenter_leakage` refuses a segmenter whose recorded
training images include the evaluated category or a tested image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...io import BUILTIN_PHOTOS, BUILTIN_PREFIX, builtin_photo, read_image, resize
from ...synthesizers import Synthesizer
from ...views import ViewRanges, apply_views, sample_view_params

__all__ = [
    "DEFAULT_SYNTHESIZERS",
    "PairBatch",
    "PairMaker",
    "check_segmenter_leakage",
    "load_sources",
    "make_synthesizers",
    "pair_sources",
]

DEFAULT_SYNTHESIZERS = "perlin+cutpaste+nsa+scar"
LAYOUT_FOLDERS = frozenset({"train", "test", "validation", "ground_truth"})
"""Folders of an MVTec-like layout: below them, only ``good`` folders hold normal images."""
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def _is_normal(path: Path, root: Path) -> bool:
    """``…/good/<file>``, or an image outside any train/test/ground_truth layout (a texture folder)."""
    if path.parent.name == "good":
        return True
    return not (set(path.relative_to(root).parts[:-1]) & LAYOUT_FOLDERS)


def _excluded(path: Path, exclude: set[str]) -> bool:
    return bool(set(path.parts[:-1]) & exclude)


def pair_sources(
    roots: Sequence[str | Path], exclude: Iterable[str], builtin_photos: bool = True
) -> list[Path | str]:
    """The normal images of ``roots`` that pretraining may use, with every excluded category left out by name.

    Args:
        roots (Sequence[str | Path]): data roots, searched recursively (e.g. ``../shared/data``).
        exclude (Iterable[str]): category names; a path with any of them as a folder component is left out, in
            every root (``bottle`` drops ``mvtec_ad/bottle/...`` and any other ``.../bottle/...``).
        builtin_photos (bool): add scikit-image's photos as ``"builtin:<name>"`` (those named in ``exclude`` are
            left out too). Defaults to ``True``.

    Returns:
        Sorted, de-duplicated paths (then the ``builtin:`` names). ``ValueError`` for a missing root or when no
        image is left.
    """
    drop = {str(name).strip() for name in exclude if str(name).strip()}
    found: dict[str, Path] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            msg = f"data root {str(root)!r} does not exist or is not a directory"
            raise ValueError(msg)
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and _is_normal(path, root):
                if not _excluded(path, drop):
                    found.setdefault(str(path.resolve()), path)
    sources: list[Path | str] = [found[key] for key in sorted(found)]
    if builtin_photos:
        sources += [BUILTIN_PREFIX + name for name in BUILTIN_PHOTOS if name not in drop]
    if not sources:
        msg = f"no normal images left in {[str(r) for r in roots]} after excluding {sorted(drop)}"
        raise ValueError(msg)
    return sources


def source_name(source: Path | str) -> str:
    """How a source is recorded in ``training_data``: the resolved path, or ``builtin:<name>``."""
    text = str(source)
    return text if text.startswith(BUILTIN_PREFIX) else str(Path(text).resolve())


def load_sources(sources: Sequence[Path | str], size: int) -> Tensor:
    """Every source as ``[N, 3, size, size]`` in ``[0, 1]`` (grayscale read as RGB, squashed to a square)."""
    images = []
    for source in sources:
        text = str(source)
        image = builtin_photo(text[len(BUILTIN_PREFIX) :]) if text.startswith(BUILTIN_PREFIX) else read_image(text)
        images.append(resize(image, (size, size)))
    return torch.stack(images)


def make_synthesizers(names: str | Sequence[str], texture_dir: str | None = None) -> list[Synthesizer]:
    """``"perlin+cutpaste+nsa+scar"`` (or a list of names) -> the synthesizers, each given ``texture_dir`` when it
    takes an anomaly-source folder."""
    from ...synthesizers import get, get_class

    parts = names.split("+") if isinstance(names, str) else list(names)
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        msg = f"no synthesizer named in {names!r}"
        raise ValueError(msg)
    members = []
    for name in parts:
        argument = get_class(name).texture_argument
        members.append(get(name, **({argument: texture_dir} if texture_dir and argument else {})))
    return members


@dataclass
class PairBatch:
    """A batch of change pairs: ``prompts``/``queries`` ``[B, 3, S, S]`` in ``[0, 1]``, ``masks`` float
    ``[B, 1, S, S]`` in ``{0, 1}``, and the ``source`` index ``[B]`` of each prompt."""

    prompts: Tensor
    queries: Tensor
    masks: Tensor
    source: Tensor


class PairMaker:
    """Draws batches of change pairs from normal images.

    Args:
        images (Tensor): the normal source images ``[N, 3, S, S]`` in ``[0, 1]``.
        synthesizers (Sequence[Synthesizer]): drawn uniformly per anomalous sample.
        anomaly_ratio (float): probability that a query gets a synthetic anomaly. Defaults to ``0.75``.
        ranges (ViewRanges | None): how far a query view departs from its prompt. Defaults to ``ViewRanges()``.

    Every draw comes from the ``generator`` passed to :meth:`__call__`, in a fixed order (view parameters, the
    anomaly gate, the synthesizer choice, then each synthesizer's own draws), so one generator state gives one batch.
    """

    def __init__(self, images: Tensor, synthesizers: Sequence[Synthesizer], anomaly_ratio: float = 0.75,
                 ranges: ViewRanges | None = None) -> None:  # fmt: skip
        if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
            msg = f"images must be [N, 3, S, S] with N >= 1, got {tuple(images.shape)}"
            raise ValueError(msg)
        if not 0 <= anomaly_ratio <= 1:
            msg = f"anomaly_ratio must be in [0, 1], got {anomaly_ratio}"
            raise ValueError(msg)
        if not synthesizers:
            msg = "PairMaker needs at least one synthesizer"
            raise ValueError(msg)
        self.images = images
        self.synthesizers = list(synthesizers)
        self.anomaly_ratio = float(anomaly_ratio)
        self.ranges = ranges or ViewRanges()

    def __call__(self, batch_size: int, generator: torch.Generator) -> PairBatch:
        params = sample_view_params(batch_size, self.ranges, generator, sources=len(self.images))
        source = params["source"]
        prompts = self.images[source]
        queries = apply_views(prompts, params)
        gate = torch.rand(batch_size, generator=generator) < self.anomaly_ratio
        choice = torch.randint(len(self.synthesizers), (batch_size,), generator=generator)
        masks = queries.new_zeros(batch_size, 1, *queries.shape[-2:])
        for index, synth in enumerate(self.synthesizers):
            rows = (gate & (choice == index)).nonzero().flatten()
            if rows.numel():
                result = synth(queries[rows], generator=generator)
                queries[rows] = result.images.clamp(0, 1)
                masks[rows] = result.masks.float()
        return PairBatch(prompts, queries, masks, source)


# --- leakage -----------------------------------------------------------------------------------------------------
def _training_images(source: Any) -> list[str]:
    from .torch_model import OnePromptSegmenterModel

    if isinstance(source, OnePromptSegmenterModel):
        return list(source.training_data)
    model = getattr(source, "model", None)  # the Lightning module
    if isinstance(model, OnePromptSegmenterModel):
        return list(model.training_data)
    if isinstance(source, (str, Path)):
        config = OnePromptSegmenterModel.read_config(source)
        if "training_data" not in config:
            msg = f"{str(source)!r}: config.json records no training_data, so its leakage cannot be checked"
            from ...training.leakage import LeakageError

            raise LeakageError(msg)
        return [str(p) for p in config["training_data"]]
    msg = f"expected a segmenter folder or model, got {type(source).__name__}"
    raise TypeError(msg)


def check_segmenter_leakage(folder_or_model: Any, category: str, test_paths: Iterable[str | Path]) -> None:
    """Raise :class:`~anomalib_synth.training.leakage.LeakageError` when the segmenter trained on ``category``
    (an image path with it as a folder component) or on any of ``test_paths`` (same file, or the same
    ``category/split/defect/file`` key under another root).

    Args:
        folder_or_model: a folder written by ``pretrain-segmenter`` / ``save_pretrained``, an
            :class:`OnePromptSegmenterModel`, or the Lightning ``OnePromptSegmenter``.
        category (str): the evaluated category (e.g. ``"bottle"``).
        test_paths: the images tested on.
    """
    from ...training.leakage import LeakageError, find_overlap

    seen = _training_images(folder_or_model)
    same_category = [p for p in seen if category in Path(p).parts[:-1]]
    overlap = find_overlap(seen, list(test_paths))
    if same_category or overlap:
        examples = (same_category + overlap)[:3]
        msg = (f"the segmenter was trained on {len(same_category)} image(s) of the evaluated category {category!r} "
               f"and {len(overlap)} of the test images (e.g. {', '.join(examples)}); pretrain it with "
               f"--exclude {category}")  # fmt: skip
        raise LeakageError(msg)
