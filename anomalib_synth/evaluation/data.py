"""Real evaluation data in MVTec layout: k normal shots, and the real test set with pixel masks.

Layout of ``ROOT/<category>``::

    train/good/*.png|jpg                 normal training images (the shots are drawn from here)
    test/good/*                          normal test images
    test/<defect>/NNN.png                anomalous test images
    ground_truth/<defect>/NNN_mask.png   their masks (MVTec AD); ``NNN.png`` (e.g. the Intel hazelnut toy set)
    ground_truth/<defect>/NNN/*.png      or several masks per image (MVTec LOCO; any value > 0 is anomalous)

If a category has no ``train/good``, the shots are drawn from ``test/good`` and those images leave the test set
(:attr:`CategoryData.shots_from_test` says so, and the report repeats it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io import list_images, open_image, read_image, resize


@dataclass
class TestSample:
    image: Path
    defect: str  # "good" for normal images
    masks: list[Path] = field(default_factory=list)

    @property
    def label(self) -> bool:
        return self.defect != "good"


@dataclass
class CategoryData:
    """The files of one category: shot candidates and the real test set."""

    name: str
    normal: list[Path]
    test: list[TestSample]
    shots_from_test: bool = False

    def split(self, k: int, seed: int) -> tuple[list[Path], list[TestSample]]:
        """``k`` shots drawn reproducibly from ``seed``, and the test samples (without the shots)."""
        if k > len(self.normal):
            msg = f"{self.name}: {k} shots requested but only {len(self.normal)} normal images are available"
            raise ValueError(msg)
        order = torch.randperm(len(self.normal), generator=torch.Generator().manual_seed(seed)).tolist()
        shots = [self.normal[i] for i in order[:k]]
        test = [s for s in self.test if s.image not in shots]
        return shots, test


def masks_for(ground_truth: Path, image: Path) -> list[Path]:
    stem = image.stem
    for candidate in (ground_truth / f"{stem}_mask.png", ground_truth / f"{stem}.png"):
        if candidate.is_file():
            return [candidate]
    folder = ground_truth / stem
    if folder.is_dir():
        return list_images(folder)
    msg = f"no ground-truth mask for {image} (looked for {stem}_mask.png, {stem}.png and {stem}/ in {ground_truth})"
    raise ValueError(msg)


def load_category(root: str | Path, category: str) -> CategoryData:
    """Index the files of ``root/category``; ``ValueError`` with what is missing otherwise."""
    base = Path(root) / category
    test_root = base / "test"
    if not test_root.is_dir():
        msg = f"{base} has no test/ folder (expected MVTec layout: test/good, test/<defect>, ground_truth/<defect>)"
        raise ValueError(msg)
    test: list[TestSample] = []
    for folder in sorted(p for p in test_root.iterdir() if p.is_dir()):
        for image in list_images(folder, recursive=False):
            masks = [] if folder.name == "good" else masks_for(base / "ground_truth" / folder.name, image)
            test.append(TestSample(image, folder.name, masks))
    if not any(s.label for s in test):
        msg = f"{base} has no anomalous test images"
        raise ValueError(msg)
    train = base / "train" / "good"
    if train.is_dir():
        return CategoryData(category, list_images(train, recursive=False), test)
    normal = [s.image for s in test if not s.label]
    if not normal:
        msg = f"{base} has neither train/good nor test/good images to draw shots from"
        raise ValueError(msg)
    return CategoryData(category, normal, test, shots_from_test=True)


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


def load_test_set(samples: list[TestSample], size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Test images ``[N, 3, H, W]``, masks bool ``[N, H, W]`` and labels bool ``[N]``."""
    images = load_images([s.image for s in samples], size)
    masks = torch.stack([read_mask(s.masks, size) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    return images, masks, labels
