"""Where the explorer's images come from: scikit-image's photos, a folder (plain or MVTec-style), or an upload.

Every source is a string that ``anomalib-synth generate`` takes as its ``SOURCE`` (``builtin:brick,coffee`` or a
folder), and the batch is read exactly as ``generate`` reads it: sample ``i`` is the ``i % N``-th readable image in
sorted order, resized with :func:`~anomalib_synth.io.resize`. Only as many files are read as the batch needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..io import BUILTIN_PREFIX, list_images, load_source, masks_for, read_images, read_mask, resize

__all__ = ["FolderLayout", "RealDefect", "describe_folder", "load_batch", "real_defects", "save_upload"]

logger = logging.getLogger(__name__)

DEFAULT_PHOTOS = ("coffee", "brick", "astronaut", "grass")


@dataclass(frozen=True)
class RealDefect:
    """A real defect image of an MVTec-style category with its mask file(s) (none for unannotated ones)."""

    defect: str
    image: Path
    masks: tuple[Path, ...]


@dataclass(frozen=True)
class FolderLayout:
    """A folder given with ``--images``: its normal-image folders by category (``""`` for a plain folder)."""

    root: Path
    normal_folders: dict[str, Path]

    @property
    def is_mvtec(self) -> bool:
        return "" not in self.normal_folders


def describe_folder(root: str | Path) -> FolderLayout:
    """Find the normal images of ``root``: ``<category>/train/good`` of an MVTec-style root, ``train/good`` of one
    category, or the folder itself.

    Raises:
        ValueError: when ``root`` is not a folder or holds no images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        msg = f"image folder {str(root)!r} does not exist or is not a directory"
        raise ValueError(msg)
    if (root / "train" / "good").is_dir():
        return FolderLayout(root, {root.name: root / "train" / "good"})
    categories = {p.name: p / "train" / "good" for p in sorted(root.iterdir()) if (p / "train" / "good").is_dir()}
    if categories:
        return FolderLayout(root, categories)
    list_images(root)  # a clear error for a folder without images
    return FolderLayout(root, {"": root})


def real_defects(normal_folder: Path) -> list[RealDefect]:
    """The real defects next to ``<category>/train/good``: ``test/<defect>/*`` with ``ground_truth/<defect>/`` masks."""
    category = normal_folder.parent.parent
    test = category / "test"
    if normal_folder.parent.name != "train" or not test.is_dir():
        return []
    found = []
    for folder in sorted(p for p in test.iterdir() if p.is_dir() and p.name != "good"):
        for image in list_images(folder, recursive=False) if any(folder.iterdir()) else []:
            try:
                masks = tuple(masks_for(category / "ground_truth" / folder.name, image))
            except ValueError:
                masks = ()
            found.append(RealDefect(folder.name, image, masks))
    return found


def load_real_defect(defect: RealDefect, size: int) -> tuple[Tensor, Tensor]:
    """The defect image ``[3, size, size]`` and its mask ``[1, size, size]`` (bool)."""
    image = read_images([defect.image], (size, size), on_error="raise")[0][0]
    return image, read_mask(list(defect.masks), (size, size))[None]


def load_batch(source: str, size: int, batch_size: int) -> tuple[Tensor, list[str], list[str]]:
    """The batch ``anomalib-synth generate SOURCE ... --num B --batch-size B --size S S`` synthesizes first.

    Returns:
        tuple: images ``[B, 3, S, S]``, the source of each, and a note per unreadable file that was skipped.
    """
    if source.startswith(BUILTIN_PREFIX):
        images, names, _ = load_source(source, (size, size))
        notes: list[str] = []
    else:
        images_list, kept, notes = [], [], []
        for path in list_images(source):
            loaded, paths, skipped = read_images([path], (size, size))
            images_list += loaded
            kept += paths
            notes += [f"skipped {reason}" for _, reason in skipped]
            if len(images_list) == batch_size:
                break
        if not images_list:
            msg = f"image folder {source!r} holds no readable images ({len(notes)} could not be read)"
            raise ValueError(msg)
        images, names = torch.stack(images_list), [str(p) for p in kept]
    index = torch.arange(batch_size) % len(images)
    return images[index], [names[i] for i in index.tolist()], notes


def save_upload(image: np.ndarray | Image.Image, folder: str | Path) -> str:
    """Write an uploaded image as ``folder/upload.png`` (replacing an earlier one) and return the folder: a source
    that ``generate`` reads exactly as the explorer does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    picture.save(folder / "upload.png")
    return str(folder)


def mask_from_drawing(drawing: object, size: int) -> Tensor | None:
    """A foreground mask ``[1, 1, size, size]`` (bool) from an image-editor value (``{"layers": [...], ...}``:
    painted pixels of the layers), or from a mask image (pixels > 127); ``None`` when nothing is drawn."""
    if drawing is None:
        return None
    if isinstance(drawing, dict):
        layers = [np.asarray(layer) for layer in drawing.get("layers") or [] if layer is not None]
        if not layers:
            return None
        painted = [layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else layer.reshape(
            *layer.shape[:2], -1).max(-1) > 0 for layer in layers]  # fmt: skip
        mask = np.logical_or.reduce(painted)
    else:
        array = np.asarray(drawing)
        mask = (array if array.ndim == 2 else array[..., :3].max(-1)) > 127
    if not mask.any():
        return None
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return resize_mask(tensor, size)


def resize_mask(mask: Tensor, size: int) -> Tensor:
    """``[1, 1, H, W]`` float/bool -> bool at ``size`` (nearest)."""
    return torch.nn.functional.interpolate(mask.float(), size=(size, size), mode="nearest") > 0.5


def builtin_source(photos: list[str] | tuple[str, ...]) -> str:
    """``builtin:a,b`` of the chosen photos (the default ones when none is chosen)."""
    return BUILTIN_PREFIX + ",".join(photos or DEFAULT_PHOTOS)


def photo_thumbnail(source: str, size: int) -> Tensor:
    """The first image of ``source`` at ``size`` (the drawing canvas of the drawn foreground)."""
    return resize(load_batch(source, size, 1)[0][0], (size, size))
