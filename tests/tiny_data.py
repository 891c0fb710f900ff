"""A tiny Folder data set written from scikit-image photos, with drawn defects and masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from anomalib_synth.io import builtin_photo, resize, to_uint8


def make_folder_dataset(root: Path, size: int = 64, n_train: int = 6, n_test: int = 3) -> Path:
    """``root/good`` (train normals), ``root/test_good``, ``root/defect`` + ``root/mask`` (drawn dark scratches)."""
    base = resize(builtin_photo("gravel"), (size * 2, size * 2))
    rng = np.random.default_rng(0)
    for sub in ("good", "test_good", "defect", "mask"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def crop(k: int) -> np.ndarray:
        top, left = rng.integers(0, size, 2)
        return to_uint8(base[:, top : top + size, left : left + size])

    for i in range(n_train):
        Image.fromarray(crop(i)).save(root / "good" / f"{i:03d}.png")
    for i in range(n_test):
        Image.fromarray(crop(i)).save(root / "test_good" / f"{i:03d}.png")
        image = crop(i).copy()
        mask = np.zeros((size, size), np.uint8)
        r = rng.integers(size // 4, 3 * size // 4)
        mask[r : r + 4, size // 5 : 4 * size // 5] = 255
        image[mask > 0] = 20
        Image.fromarray(image).save(root / "defect" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "mask" / f"{i:03d}.png")
    return root


def folder_datamodule(root: Path, **kwargs):
    from anomalib.data import Folder

    defaults = {"train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}
    defaults.update(kwargs)
    return Folder(
        name="tiny",
        root=root,
        normal_dir="good",
        abnormal_dir="defect",
        normal_test_dir="test_good",
        mask_dir="mask",
        **defaults,
    )
