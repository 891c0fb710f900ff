"""Files that behave like real inspection data, written in code: what scikit-image's photos never show.

- pure white and pure black regions (anomalib's antialiased resize pushes saturated white slightly above 1);
- 16-bit grayscale and 16-bit RGB PNGs, palette and RGBA PNGs, an EXIF-rotated JPEG;
- a corrupt file (random bytes) and a truncated PNG among good ones;
- a tiny image, a large one, and odd sizes.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ODD = (97, 131)  # H, W


def white_object(size: tuple[int, int] = ODD, seed: int = 0) -> np.ndarray:
    """A dark textured disc on a saturated white background with a pure black bar: uint8 ``HxWx3``."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) / 3) ** 2
    image = np.full((h, w, 3), 255, np.uint8)
    image[disc] = rng.integers(40, 140, (int(disc.sum()), 3), dtype=np.uint8)
    image[: max(1, h // 10), :] = 0
    return image


def gray16() -> np.ndarray:
    """A 16-bit grayscale ramp over the full range (``I;16`` in Pillow): uint16 ``HxW``."""
    h, w = ODD
    return (np.linspace(0, 65535, h * w).reshape(h, w)).astype(np.uint16)


def write_kinds(folder: Path) -> dict[str, Path]:
    """One file of each real-data kind in ``folder``; returns ``{kind: path}`` (readable kinds only)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["white"] = folder / "white.png"
    Image.fromarray(white_object()).save(paths["white"])
    paths["gray16"] = folder / "gray16.png"
    Image.fromarray(gray16()).save(paths["gray16"])
    paths["rgb16"] = folder / "rgb16.png"
    rgb16 = (white_object(seed=1).astype(np.uint16) * 257)[..., ::-1]  # cv2 writes BGR
    cv2.imwrite(str(paths["rgb16"]), np.ascontiguousarray(rgb16))
    paths["palette"] = folder / "palette.png"
    Image.fromarray(white_object(seed=2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["palette"])
    paths["rgba"] = folder / "rgba.png"
    rgba = np.dstack([white_object(seed=3), np.full(ODD, 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(paths["rgba"])
    paths["exif"] = folder / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(white_object(seed=4)).save(paths["exif"], exif=exif, quality=95)
    paths["tiny"] = folder / "tiny.png"
    Image.fromarray(white_object((3, 5))).save(paths["tiny"])
    paths["large"] = folder / "large.png"
    Image.fromarray(white_object((2049, 3001))).save(paths["large"], compress_level=1)
    return paths


def write_corrupt(folder: Path) -> list[Path]:
    """A file of random bytes and a PNG cut in half, both named ``.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "zz_garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    truncated = folder / "zz_truncated.png"
    good = folder / ".full.png"
    Image.fromarray(white_object(seed=5)).save(good)
    data = good.read_bytes()
    good.unlink()
    truncated.write_bytes(data[: len(data) // 2])
    return [garbage, truncated]


def write_folder_dataset(root: Path, n_train: int = 6, n_test: int = 2, corrupt: bool = False) -> Path:
    """anomalib ``Folder`` layout (``good``, ``test_good``, ``defect``, ``mask``): white-background, odd-size images."""
    for sub in ("good", "test_good", "defect", "mask"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(white_object(seed=10 + i)).save(root / "good" / f"{i:03d}.png")
    for i in range(n_test):
        Image.fromarray(white_object(seed=30 + i)).save(root / "test_good" / f"{i:03d}.png")
        image = white_object(seed=50 + i)
        mask = np.zeros(ODD, np.uint8)
        mask[40:48, 20:100] = 255
        image[mask > 0] = 0
        Image.fromarray(image).save(root / "defect" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "mask" / f"{i:03d}.png")
    if corrupt:
        write_corrupt(root / "good")
    return root
