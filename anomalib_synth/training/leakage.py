"""Train/test leakage of the diffusion adapters: exclusions at training time, a check at evaluation time.

AnomalyXFusion and AnomalyControl train on MVTec *test* anomalies with their captions (MVTec-Caption covers the test
split only). An evaluation that later scores a detector on those same test images, with anomalies synthesised by
such an adapter, would leak: the adapter has seen (and may reproduce) the very defects it is tested on.

- At training time, :func:`exclude_records` drops categories, image paths or the images of a split file
  (``anomalib-synth train xfusion|control --exclude-categories ... --exclude-images ... --exclude-split FILE``).
- The adapter's config records the images it was trained on (:func:`training_data`), under ``"training_data"``
  (``adapter_config.json``, or ``config.json`` for the adapters saved as diffusers models).
- At evaluation time, :func:`check_leakage` compares what a synthesizer has seen (its adapter's training images and
  its reference images, see ``source_images`` of the synthesizers) with the images tested on, and refuses (or warns).

Images are matched by their path *suffix* ``<category>/test/<defect>/<file>`` (the last four path parts), so the
same MVTec image is recognised under another data root, and also by their resolved absolute path.

>>> from pathlib import Path
>>> image_key("/data/mvtec/bottle/test/crack/000.png")
'bottle/test/crack/000.png'
>>> find_overlap(["/a/bottle/test/crack/000.png"], [Path("/b/bottle/test/crack/000.png"), "/b/bottle/test/good/000.png"])
['bottle/test/crack/000.png']
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # kept light: the evaluation harness imports this module
    from .captions import CaptionedDefect

__all__ = [
    "LeakageError",
    "LeakageWarning",
    "check_leakage",
    "exclude_records",
    "find_overlap",
    "image_key",
    "read_split",
    "training_data",
    "training_images_of",
]

ADAPTER_CONFIGS = ("config.json", "adapter_config.json", "sga_config.json")
"""The config files of an adapter folder that may record ``training_data``: diffusers' ``config.json`` (e.g.
AnomalyXFusion's ``XFusionAdapter``), AnomalyXFusion's earlier ``adapter_config.json``, AnomalyControl's
``sga_config.json``."""

KEY_PARTS = 4
"""``<category>/test/<defect>/<file>``: the identity of an MVTec image, whatever the data root."""


class LeakageError(ValueError):
    """An adapter (or its references) has seen images that an evaluation tests on."""


class LeakageWarning(UserWarning):
    """As :class:`LeakageError`, when the check is asked to warn instead of refusing."""


def image_key(path: str | Path) -> str:
    """The last four parts of ``path`` (``category/test/defect/file``), ``/``-separated."""
    return "/".join(Path(path).parts[-KEY_PARTS:])


def _resolved(path: str | Path) -> str:
    try:
        return str(Path(path).expanduser().resolve())
    except OSError:  # pragma: no cover - unresolvable paths still match by key
        return str(path)


def read_split(path: str | Path) -> list[str]:
    """Image paths listed in a split file.

    A ``.json`` file holds a list of paths, or an object whose ``"test"`` (else ``"images"``) entry is that list;
    any other file has one path per line (blank lines and ``#`` comments are skipped). Paths may be absolute,
    relative to the data root, or ``category/test/defect/file`` keys.

    Raises:
        FileNotFoundError: for a missing file. ValueError: for a malformed JSON split.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"split file {str(path)!r} does not exist"
        raise FileNotFoundError(msg)
    if path.suffix.lower() == ".json":
        raw = json.loads(path.read_text())
        if isinstance(raw, dict):
            raw = raw.get("test", raw.get("images"))
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            msg = f"{str(path)!r}: a JSON split is a list of image paths, or {{'test': [paths]}}"
            raise ValueError(msg)
        return list(raw)
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _suffix_match(path: Path, entry: str) -> bool:
    """``path`` ends with the parts of ``entry`` (absolute entries: the same resolved file)."""
    entry_path = Path(entry).expanduser()
    if entry_path.is_absolute():
        return _resolved(path) == _resolved(entry_path) or image_key(path) == image_key(entry_path)
    parts = entry_path.parts
    return bool(parts) and Path(path).parts[-len(parts) :] == parts


def exclude_records(
    records: list[CaptionedDefect],
    categories: Iterable[str] | None = None,
    images: Iterable[str | Path] | None = None,
    split: str | Path | None = None,
) -> tuple[list[CaptionedDefect], list[CaptionedDefect]]:
    """Split ``records`` into (kept, excluded).

    Args:
        records: from :func:`~anomalib_synth.data.captions.match_captions`.
        categories: categories to leave out entirely.
        images: image paths to leave out (absolute, relative to the data root, or path suffixes such as
            ``bottle/test/crack/000.png``).
        split: a split file of image paths to leave out (see :func:`read_split`), e.g. the test images of a later
            evaluation.

    Raises:
        ValueError: when nothing is left to train on.
    """
    drop_categories = {Path(c).name for c in categories or []}
    entries = [str(p) for p in images or []] + (read_split(split) if split is not None else [])
    kept, excluded = [], []
    for record in records:
        hit = record.category in drop_categories or any(_suffix_match(record.image, e) for e in entries)
        (excluded if hit else kept).append(record)
    if not kept:
        msg = f"every one of the {len(records)} captioned images is excluded: nothing left to train on"
        raise ValueError(msg)
    return kept, excluded


def training_data(
    records: list[CaptionedDefect], data_root: str | Path, excluded: list[CaptionedDefect] | None = None
) -> dict[str, Any]:
    """What an adapter config records about its training images (``"training_data"``).

    ``images`` lists each image (absolute path), its masks, caption, category and defect; ``keys`` the
    ``category/test/defect/file`` keys; ``excluded`` the keys that an exclusion left out.
    """
    images = [{"image": _resolved(r.image), "masks": [_resolved(m) for m in r.masks], "caption": r.caption,
               "category": r.category, "defect": r.defect} for r in records]  # fmt: skip
    return {
        "data_root": _resolved(data_root),
        "images": images,
        "keys": [image_key(r.image) for r in records],
        "excluded": [image_key(r.image) for r in excluded or []],
    }


def training_images_of(source: Any) -> list[str]:
    """Image paths that ``source`` has seen: a synthesizer (its ``source_images``: adapter training images and
    references), an adapter folder (the ``training_data`` of its configs, see :data:`ADAPTER_CONFIGS`), a config
    dict, or a list of paths."""
    if source is None:
        return []
    if hasattr(source, "source_images"):
        return [str(p) for p in source.source_images]
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        configs = [Path(source) / name for name in ADAPTER_CONFIGS if (Path(source) / name).is_file()]
        seen = [image for path in configs for image in training_images_of(json.loads(path.read_text()))]
        return list(dict.fromkeys(seen))
    if isinstance(source, dict):
        data = source.get("training_data") or {}
        return [entry["image"] for entry in data.get("images", [])]
    if isinstance(source, (list, tuple, set)):
        return [str(p) for p in source]
    return []  # e.g. a synthesizer without weights trained on images


def find_overlap(seen: Iterable[str | Path], tested: Iterable[str | Path]) -> list[str]:
    """Sorted keys of the images in both lists (matched by ``category/test/defect/file`` key or resolved path)."""
    seen = list(seen)
    keys = {image_key(p) for p in seen}
    paths = {_resolved(p) for p in seen}
    return sorted({image_key(p) for p in tested if image_key(p) in keys or _resolved(p) in paths})


def check_leakage(source: Any, tested: Iterable[str | Path], on_overlap: str = "error", what: str = "") -> list[str]:
    """Refuse (``on_overlap="error"``, :class:`LeakageError`) or warn (``"warn"``, :class:`LeakageWarning`) when
    ``source`` (see :func:`training_images_of`) has seen any of the ``tested`` images; returns the overlap.

    The evaluation harness calls this with the synthesizer it builds and the test images of the run.
    """
    if on_overlap not in ("error", "warn", "ignore"):
        msg = f"on_overlap must be 'error', 'warn' or 'ignore', got {on_overlap!r}"
        raise ValueError(msg)
    overlap = find_overlap(training_images_of(source), tested)
    if overlap and on_overlap != "ignore":
        msg = (f"{what or type(source).__name__}: {len(overlap)} of the images tested on were seen in training or "
               f"are references ({', '.join(overlap[:3])}{', ...' if len(overlap) > 3 else ''}); the evaluation would "
               "leak. Retrain with `--exclude-split` / `--exclude-categories`, or use other references")  # fmt: skip
        if on_overlap == "error":
            raise LeakageError(msg)
        warnings.warn(msg, LeakageWarning, stacklevel=2)
    return overlap
