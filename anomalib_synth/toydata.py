"""Small data sets written from the photos scikit-image ships, for demos, notebooks and tests (no download).

- :func:`make_toy_mvtec`: one category in MVTec AD layout (``train/good``, ``test/good``, ``test/blob``,
  ``ground_truth/blob``), or MVTec LOCO's multi-mask layout; the test defects are drawn in code by
  :func:`draw_defects` (stain, scratch, pit), not by any synthesizer, so evaluations on it are not circular.
- :func:`make_toy_folder`: anomalib ``Folder`` layout (``good``, ``test_good``, ``defect``, ``mask``) with drawn dark
  scratches, and :func:`toy_folder_datamodule` to wrap it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .io import builtin_photo, resize, to_uint8

__all__ = ["draw_defects", "make_toy_folder", "make_toy_mvtec", "toy_folder_datamodule"]


def make_toy_mvtec(root: str | Path, size: int = 64, train: bool = True, loco: bool = False,
                   category: str = "gravel") -> Path:  # fmt: skip
    """Write ``root/<category>`` in MVTec layout from crops of ``skimage.data.gravel()``; returns ``root``.

    Nine crops of one photo: two normal test crops, two training crops (unless ``train=False``) and three anomalous
    test crops, none of them a training crop. Their defects are drawn by :func:`draw_defects` (an elliptical stain,
    a curved scratch, a dark pit), a process none of the synthesizers under evaluation uses, so a detector trained
    on synthetic anomalies has to generalise to find them. Masks are 0/255 PNGs (LOCO: split over two PNGs with type
    values).
    """
    root = Path(root)
    base = resize(builtin_photo("gravel"), (3 * size, 3 * size))
    crops = torch.stack([base[:, y : y + size, x : x + size] for y in (0, size, 2 * size) for x in (0, size, 2 * size)])
    defect_images, defect_masks = draw_defects(crops[4:7])
    cat = root / category
    folders = {"test/good": crops[:2], "test/blob": defect_images}
    if train:
        folders["train/good"] = crops[2:4]
    for folder, images in folders.items():
        (cat / folder).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(to_uint8(image)).save(cat / folder / f"{i:03d}.png")
    for i, mask in enumerate(defect_masks):
        array = mask.numpy().astype(np.uint8) * 255
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


def draw_defects(images: Tensor) -> tuple[Tensor, Tensor]:
    """Hand-made defects on ``images`` ``[N, 3, H, W]``, in turn: a brown elliptical stain (multiplied in, so the
    texture shows through), a bright curved scratch (a quadratic Bezier curve, 2-3 px wide) and a dark pit (a small
    ellipse with a darker rim). Fixed geometry, no randomness, drawn with coordinate maths rather than by any
    synthesizer. Returns the images and bool masks ``[N, H, W]`` of exactly the pixels that changed."""
    n, _, height, width = images.shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")

    def ellipse(cy: float, cx: float, ry: float, rx: float, angle: float) -> Tensor:
        cos, sin = math.cos(angle), math.sin(angle)
        u, v = (xx - cx) * cos + (yy - cy) * sin, -(xx - cx) * sin + (yy - cy) * cos
        return (u / rx) ** 2 + (v / ry) ** 2  # <= 1 inside

    out, masks = images.clone(), torch.zeros(n, height, width, dtype=torch.bool)
    for i in range(n):
        kind = i % 3
        if kind == 0:  # stain
            r = ellipse(0.45, 0.55, 0.16, 0.26, 0.5)
            mask = r <= 1
            tint = torch.tensor([0.55, 0.38, 0.2]).view(3, 1, 1) * (0.75 + 0.25 * r.clamp(0, 1))
            out[i] = torch.where(mask, images[i] * tint, images[i])
        elif kind == 1:  # scratch
            t = torch.linspace(0, 1, 200)
            py = (1 - t) ** 2 * 0.2 + 2 * (1 - t) * t * 0.85 + t**2 * 0.7
            px = (1 - t) ** 2 * 0.15 + 2 * (1 - t) * t * 0.35 + t**2 * 0.85
            distance = ((yy[..., None] - py) ** 2 * (height - 1) ** 2 + (xx[..., None] - px) ** 2 * (width - 1) ** 2)
            mask = distance.min(-1).values.sqrt() <= 1.2
            out[i] = torch.where(mask, 0.92 + 0.08 * images[i], images[i])
        else:  # pit
            r = ellipse(0.6, 0.35, 0.12, 0.09, -0.3)
            mask = r <= 1
            out[i] = torch.where(mask, images[i] * (0.1 + 0.25 * (1 - r).clamp(0, 1)), images[i])
        masks[i] = mask & (out[i] != images[i]).any(0)
        out[i] = torch.where(masks[i], out[i], images[i])
    return out, masks


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
