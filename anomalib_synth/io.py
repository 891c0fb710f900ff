"""Image loading, built-in sample photos, and atomic file writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

BUILTIN_PHOTOS = ("brick", "grass", "gravel", "coffee", "camera", "astronaut", "chelsea", "rocket")
"""scikit-image's shipped photos usable as ``builtin:<name>`` (no download needed)."""

BUILTIN_PREFIX = "builtin:"

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


def to_tensor(array: np.ndarray, channels: int = 3) -> Tensor:
    """uint8 ``HxW`` / ``HxWxC`` array -> float ``[channels, H, W]`` in ``[0, 1]``."""
    if array.ndim == 2:
        array = array[..., None]
    x = torch.from_numpy(np.array(array[..., :3], copy=True)).permute(2, 0, 1).float() / 255.0
    if x.shape[0] == channels:
        return x
    if channels == 3:
        return x.expand(3, -1, -1).contiguous()
    return (x * x.new_tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)


def read_image(path: str | Path, channels: int = 3) -> Tensor:
    """Read an image file as float ``[channels, H, W]`` in ``[0, 1]``."""
    path = Path(path)
    if not path.is_file():
        msg = f"image file {str(path)!r} does not exist"
        raise ValueError(msg)
    with Image.open(path) as img:
        return to_tensor(np.asarray(img.convert("RGB" if channels == 3 else "L")), channels)


def builtin_photo(name: str, channels: int = 3) -> Tensor:
    """A scikit-image sample photo (``brick``, ``grass``, ``gravel``, ``coffee``, ...) as ``[channels, H, W]``."""
    if name not in BUILTIN_PHOTOS:
        msg = f"unknown builtin photo {name!r}; choose from {', '.join(BUILTIN_PHOTOS)}"
        raise ValueError(msg)
    import skimage.data

    return to_tensor(getattr(skimage.data, name)(), channels)


def resize(image: Tensor, size: Sequence[int] | None) -> Tensor:
    """Resize ``[C, H, W]`` or ``[B, C, H, W]`` to ``size = (H, W)`` (antialiased bilinear); ``None`` keeps it."""
    if size is None:
        return image
    squeeze = image.ndim == 3
    x = image.unsqueeze(0) if squeeze else image
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x.squeeze(0) if squeeze else x


def load_source(source: str, size: Sequence[int] | None = (256, 256), channels: int = 3) -> tuple[Tensor, list[str]]:
    """Load normal images from a folder or ``builtin:<name>[,<name>...]``.

    Returns a float ``[N, C, H, W]`` stack (all resized to ``size``) and the source name of each image.
    """
    if source.startswith(BUILTIN_PREFIX):
        names = [n for n in source[len(BUILTIN_PREFIX) :].split(",") if n]
        if not names:
            names = ["brick"]
        images = [resize(builtin_photo(n, channels), size) for n in names]
        return torch.stack(images) if size else _stack_same(images), [BUILTIN_PREFIX + n for n in names]
    files = list_images(source)
    images = [resize(read_image(f, channels), size) for f in files]
    return torch.stack(images) if size else _stack_same(images), [str(f) for f in files]


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


def load_texture_bank(folder: str | Path, size: int = 256, limit: int | None = None) -> Tensor:
    """Load the anomaly-source textures of ``folder`` (searched recursively, e.g. DTD ``images/``).

    At most ``limit`` textures are kept, evenly spaced in sorted order. Each texture is centre-cropped to a square and resized to ``size``; returns float ``[N, 3, size, size]``.
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
