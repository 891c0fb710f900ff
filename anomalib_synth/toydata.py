"""Small data sets written from the photos scikit-image ships, for demos, notebooks and tests (no download).

- :func:`make_toy_mvtec`: one category in MVTec AD layout (``train/good``, ``test/good``, ``test/blob``,
  ``ground_truth/blob``), or MVTec LOCO's multi-mask layout; the test defects are drawn by our Perlin synthesizer.
- :func:`make_toy_folder`: anomalib ``Folder`` layout (``good``, ``test_good``, ``defect``, ``mask``) with drawn dark
  scratches, and :func:`toy_folder_datamodule` to wrap it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .io import builtin_photo, resize, to_uint8

__all__ = ["make_toy_folder", "make_toy_mvtec", "toy_folder_datamodule"]


def make_toy_mvtec(root: str | Path, size: int = 64, train: bool = True, loco: bool = False,
                   category: str = "gravel") -> Path:  # fmt: skip
    """Write ``root/<category>`` in MVTec layout from crops of ``skimage.data.gravel()``; returns ``root``.

    Two normal test crops, two training crops (unless ``train=False``) and one anomalous test crop whose defect is
    drawn by the ``perlin`` synthesizer (seed 9), with its mask (LOCO: split over two PNGs with type values).
    """
    from .synthesizers import get

    root = Path(root)
    base = resize(builtin_photo("gravel"), (3 * size, 3 * size))
    crops = torch.stack([base[:, y : y + size, x : x + size] for y in (0, size) for x in (0, size, 2 * size)])
    perlin = get("perlin", beta=(0.9, 1.0), area_range=(0.05, 0.15), foreground="none")
    defects = perlin(crops[3:], generator=torch.Generator().manual_seed(9))
    cat = root / category
    folders = {"test/good": crops[:2], "test/blob": defects.images}
    if train:
        folders["train/good"] = crops[2:4]
    for folder, images in folders.items():
        (cat / folder).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(to_uint8(image)).save(cat / folder / f"{i:03d}.png")
    for i, mask in enumerate(defects.masks):
        array = (mask[0].numpy() * 255).astype(np.uint8)
        if loco:  # several masks per image, values encode the type
            folder = cat / "ground_truth" / "blob" / f"{i:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            half = array.copy()
            half[:, : size // 2] = 0
            Image.fromarray((half > 0).astype(np.uint8) * 7).save(folder / "000.png")
            rest = array.copy()
            rest[:, size // 2 :] = 0
            Image.fromarray(rest).save(folder / "001.png")
        else:
            (cat / "ground_truth" / "blob").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(cat / "ground_truth" / "blob" / f"{i:03d}_mask.png")
    return root


def make_toy_folder(root: str | Path, size: int = 64, n_train: int = 6, n_test: int = 3) -> Path:
    """``root/good`` (training normals), ``root/test_good``, ``root/defect`` + ``root/mask`` (drawn dark scratches)."""
    root = Path(root)
    base = resize(builtin_photo("gravel"), (size * 2, size * 2))
    rng = np.random.default_rng(0)
    for sub in ("good", "test_good", "defect", "mask"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def crop() -> np.ndarray:
        top, left = rng.integers(0, size, 2)
        return to_uint8(base[:, top : top + size, left : left + size])

    for i in range(n_train):
        Image.fromarray(crop()).save(root / "good" / f"{i:03d}.png")
    for i in range(n_test):
        Image.fromarray(crop()).save(root / "test_good" / f"{i:03d}.png")
        image = crop().copy()
        mask = np.zeros((size, size), np.uint8)
        r = rng.integers(size // 4, 3 * size // 4)
        mask[r : r + 4, size // 5 : 4 * size // 5] = 255
        image[mask > 0] = 20
        Image.fromarray(image).save(root / "defect" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "mask" / f"{i:03d}.png")
    return root


def toy_folder_datamodule(root: str | Path, **kwargs: Any):
    """anomalib's ``Folder`` datamodule over :func:`make_toy_folder`'s layout (batch 4, no workers by default)."""
    from anomalib.data import Folder

    defaults = {"train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}
    defaults.update(kwargs)
    return Folder(name="tiny", root=root, normal_dir="good", abnormal_dir="defect", normal_test_dir="test_good",
                  mask_dir="mask", **defaults)  # fmt: skip
