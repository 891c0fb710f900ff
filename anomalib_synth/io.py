"""Image loading, built-in sample photos, and atomic file writes."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import ImageReadError, UnsupportedImageError

BUILTIN_PHOTOS = ("brick", "grass", "gravel", "coffee", "camera", "astronaut", "chelsea", "rocket")
"""scikit-image's shipped photos usable as ``builtin:<name>`` (no download needed)."""

BUILTIN_PREFIX = "builtin:"

logger = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Sorted image files under ``folder``; ``ValueError`` if it is missing or holds no images."""
    root = Path(folder)
    if not root.is_dir():
        msg = f"image folder {str(root)!r} does not exist or is not a directory"
        raise ValueError(msg)
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        msg = f"image folder {str(root)!r} holds no images (looked for {', '.join(sorted(IMG_EXTENSIONS))})"
        raise ValueError(msg)
    return files


SKIP, RAISE = "skip", "raise"
ON_ERROR = (SKIP, RAISE)
"""What loaders do with an unreadable file: skip it with a warning, or raise :class:`ImageReadError`."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_tensor(array: np.ndarray, channels: int = 3) -> Tensor:
    """uint8 ``HxW`` / ``HxWxC`` array -> float ``[channels, H, W]`` in ``[0, 1]``."""
    return _float_to_tensor(np.asarray(array, dtype=np.float32) / 255.0, channels)


def _float_to_tensor(array: np.ndarray, channels: int) -> Tensor:
    """float ``HxW`` / ``HxWxC`` array in ``[0, 1]`` -> ``[channels, H, W]`` (gray <-> RGB as needed)."""
    if array.ndim == 2:
        array = array[..., None]
    x = torch.from_numpy(np.array(array[..., :3], dtype=np.float32, copy=True)).permute(2, 0, 1)
    if x.shape[0] == channels:
        return x
    if channels == 3:
        return x.expand(3, -1, -1).contiguous()
    return (x * x.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)


def pil_to_tensor(img: Image.Image, channels: int = 3) -> Tensor:
    """A PIL image of any common mode -> float ``[channels, H, W]`` in ``[0, 1]``.

    16-bit grayscale (``I;16*``, and ``I`` as Pillow opens 16-bit PNGs) is scaled by 65535 rather than clipped to
    255 (which would turn it white, as ``Image.convert("RGB")`` does); float images (``F``) are clipped to ``[0, 1]``;
    palette, RGBA, LA, CMYK and 1-bit images go through Pillow's own conversion (alpha is dropped, as anomalib's
    reader does).
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        return _float_to_tensor(np.asarray(img, dtype=np.float32).clip(0, 65535) / 65535.0, channels)
    if img.mode == "F":
        return _float_to_tensor(np.asarray(img, dtype=np.float32).clip(0, 1), channels)
    if channels == 1 and img.mode != "L":
        img = img.convert("L")
    elif channels == 3 and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    return to_tensor(np.asarray(img), channels)


def open_image(path: str | Path) -> Image.Image:
    """Open and decode ``path`` with its EXIF orientation applied; :class:`ImageReadError` names the file if not."""
    path = Path(path)
    if not path.is_file():
        msg = f"image file {str(path)!r} does not exist"
        raise ImageReadError(msg)
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        msg = f"cannot read image {str(path)!r}: {err}"
        raise ImageReadError(msg) from err


def read_image(path: str | Path, channels: int = 3) -> Tensor:
    """Read an image file as float ``[channels, H, W]`` in ``[0, 1]``; :class:`ImageReadError` if it cannot be read."""
    return pil_to_tensor(open_image(path), channels)


def probe_image(path: str | Path) -> None:
    """Check that anomalib's own reader (``Image.open(path).convert("RGB")``) can read ``path`` faithfully.

    Reads the header and checks the file's structure (``Image.verify``: chunk checksums, no decompression), so it is
    cheap enough for a whole data set. Raises :class:`ImageReadError` for a missing, non-image or truncated file and
    :class:`UnsupportedImageError` for 16-bit or float grayscale, which that reader clips to white.
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            img.verify()
    except (OSError, SyntaxError, ValueError, struct.error) as err:
        msg = f"cannot read image {str(path)!r}: {err}"
        raise ImageReadError(msg) from err
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        kind = "float" if mode == "F" else "16-bit"
        msg = f"{str(path)!r} is a {kind} grayscale image, which anomalib's reader turns white; convert it to 8-bit"
        raise UnsupportedImageError(msg)


def read_images(
    paths: Sequence[str | Path], size: Sequence[int] | None, channels: int = 3, on_error: str = SKIP
) -> tuple[list[Tensor], list[Path], list[tuple[Path, str]]]:
    """Read and resize ``paths``; returns the images, their paths, and ``(path, reason)`` of each skipped file.

    With ``on_error="skip"`` unreadable files are skipped with a warning; with ``"raise"`` the first one raises
    :class:`ImageReadError`.
    """
    if on_error not in ON_ERROR:
        msg = f"on_error must be one of {ON_ERROR}, got {on_error!r}"
        raise ValueError(msg)
    images, kept, skipped = [], [], []
    for path in paths:
        try:
            images.append(resize(read_image(path, channels), size))
        except ImageReadError as err:
            if on_error == RAISE:
                raise
            logger.warning("skipping %s", err)
            skipped.append((Path(path), str(err)))
            continue
        kept.append(Path(path))
    return images, kept, skipped


def builtin_photo(name: str, channels: int = 3) -> Tensor:
    """A scikit-image sample photo (``brick``, ``grass``, ``gravel``, ``coffee``, ...) as ``[channels, H, W]``."""
    if name not in BUILTIN_PHOTOS:
        msg = f"unknown builtin photo {name!r}; choose from {', '.join(BUILTIN_PHOTOS)}"
        raise ValueError(msg)
    import skimage.data

    return to_tensor(getattr(skimage.data, name)(), channels)


def resize(image: Tensor, size: Sequence[int] | None) -> Tensor:
    """Resize ``[C, H, W]`` or ``[B, C, H, W]`` to ``size = (H, W)`` (antialiased bilinear); ``None`` keeps it."""
    if size is not None and (len(size) != 2 or min(size) < 1):
        msg = f"size must be two positive integers (H, W), got {tuple(size)}"
        raise ValueError(msg)
    if size is None:
        return image
    squeeze = image.ndim == 3
    x = image.unsqueeze(0) if squeeze else image
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x.squeeze(0) if squeeze else x


class Source(NamedTuple):
    """Normal images loaded by :func:`load_source`."""

    images: Tensor
    """float ``[N, C, H, W]`` in ``[0, 1]``."""
    names: list[str]
    """the file (or ``builtin:<name>``) of each image."""
    skipped: list[tuple[Path, str]]
    """``(path, reason)`` of each unreadable file that was skipped."""


def load_source(
    source: str, size: Sequence[int] | None = (256, 256), channels: int = 3, on_error: str = SKIP
) -> Source:
    """Load normal images from a folder or ``builtin:<name>[,<name>...]``, all resized to ``size``.

    Unreadable files are skipped with a warning (``on_error="skip"``) or raise :class:`ImageReadError`
    (``"raise"``); a folder with no readable image raises ``ValueError``.
    """
    if source.startswith(BUILTIN_PREFIX):
        names = [n for n in source[len(BUILTIN_PREFIX) :].split(",") if n]
        if not names:
            names = ["brick"]
        images = [resize(builtin_photo(n, channels), size) for n in names]
        return Source(torch.stack(images) if size else _stack_same(images), [BUILTIN_PREFIX + n for n in names], [])
    images, kept, skipped = read_images(list_images(source), size, channels, on_error)
    if not images:
        msg = f"image folder {source!r} holds no readable images ({len(skipped)} could not be read)"
        raise ValueError(msg)
    return Source(torch.stack(images) if size else _stack_same(images), [str(f) for f in kept], skipped)


def _stack_same(images: list[Tensor]) -> Tensor:
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        msg = f"images have different sizes {sorted(shapes)}; pass a size to resize them"
        raise ValueError(msg)
    return torch.stack(images)


def to_uint8(image: Tensor) -> np.ndarray:
    """float ``[C, H, W]`` in ``[0, 1]`` -> uint8 ``HxW`` (1 channel) or ``HxWx3``."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_files(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``folder``; on success each file written there is renamed into ``folder``
    (JSON files last, so a config never names weights that are not there yet). When the writing fails (an error or
    an interruption inside the block), nothing in ``folder`` changes, so a model saved there before stays loadable.
    Each rename is atomic, the set of them is not; files of ``folder`` that the new save does not write stay."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        yield tmp
        folder.mkdir(exist_ok=True)
        files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", str(p)))
        for file in files:
            target = folder / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(file, 0o666 & ~_UMASK)
            os.replace(file, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_png(path: str | Path, image: Tensor | np.ndarray) -> None:
    """Atomically write ``[C, H, W]`` float in ``[0, 1]`` (or a uint8 array) as PNG."""
    array = to_uint8(image) if isinstance(image, Tensor) else image
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors(path: str | Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` (moved to the CPU, contiguous) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def masks_for(ground_truth: Path, image: Path) -> list[Path]:
    """The mask files of ``image`` in ``ground_truth``: ``NNN_mask.png`` (MVTec AD), ``NNN.png``, or every image of a
    folder ``NNN/`` (MVTec LOCO); ``ValueError`` naming what was looked for otherwise."""
    stem = image.stem
    for candidate in (ground_truth / f"{stem}_mask.png", ground_truth / f"{stem}.png"):
        if candidate.is_file():
            return [candidate]
    folder = ground_truth / stem
    if folder.is_dir():
        return list_images(folder)
    msg = f"no ground-truth mask for {image} (looked for {stem}_mask.png, {stem}.png and {stem}/ in {ground_truth})"
    raise ValueError(msg)


def read_mask(paths: list[Path], size: tuple[int, int]) -> Tensor:
    """Union of the masks (value > 0) resized to ``size`` (nearest), as bool ``[H, W]``; all-False for none."""
    if not paths:
        return torch.zeros(size, dtype=torch.bool)
    union = None
    for path in paths:
        array = np.asarray(open_image(path).convert("L")) > 0
        union = array if union is None else union | array
    mask = torch.from_numpy(union.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(mask, size=size, mode="nearest")[0, 0] > 0.5


def load_images(paths: list[Path], size: tuple[int, int]) -> Tensor:
    """Images as float ``[N, 3, H, W]`` in ``[0, 1]`` (grayscale read as 3 channels)."""
    return torch.stack([resize(read_image(p, channels=3), size) for p in paths])


def load_texture_bank(folder: str | Path, size: int = 256, limit: int | None = None) -> Tensor:
    """Load the anomaly-source textures of ``folder`` (searched recursively, e.g. DTD ``images/``).

    At most ``limit`` textures are kept, evenly spaced in sorted order. Each texture is centre-cropped to a square
    and resized to ``size``; returns float ``[N, 3, size, size]``.
    Raises ``ValueError`` if the folder is missing or holds no images.
    """
    files = list_images(folder)
    if limit is not None and len(files) > limit:  # spread over the sorted list, i.e. over DTD's classes
        files = [files[i * len(files) // limit] for i in range(limit)]
    bank = []
    for f in files:
        x = read_image(f)
        side = min(x.shape[-2:])
        top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
        bank.append(resize(x[:, top : top + side, left : left + side], (size, size)))
    return torch.stack(bank)
