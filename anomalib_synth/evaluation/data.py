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

import torch
from torch import Tensor

from ..io import list_images, load_images, masks_for, read_mask

__all__ = ["CategoryData", "TestSample", "load_category", "load_images", "load_test_set", "masks_for", "read_mask"]


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


def load_test_set(samples: list[TestSample], size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Test images ``[N, 3, H, W]``, masks bool ``[N, H, W]`` and labels bool ``[N]``."""
    images = load_images([s.image for s in samples], size)
    masks = torch.stack([read_mask(s.masks, size) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    return images, masks, labels
