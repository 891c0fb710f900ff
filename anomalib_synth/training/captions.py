"""(image, mask, caption) triples from MVTec-style folders and MVTec-Caption JSON (AnomalyXFusion's training data).

Caption JSON (see :func:`~anomalib_synth.synthesizers.diffusion.prompts.load_captions`) maps
``{category: {defect: [caption of test image 000, 001, ...]}}``: list index ``i`` is the caption of
``<category>/test/<defect>/<i:03d>.png``. Masks are ``ground_truth/<defect>/NNN_mask.png`` (MVTec AD) or every PNG
in ``ground_truth/<defect>/NNN/`` (MVTec LOCO, values > 0 anomalous), merged into one binary mask.

>>> import tempfile, json
>>> from pathlib import Path
>>> from PIL import Image
>>> with tempfile.TemporaryDirectory() as tmp:
...     for sub in ("bottle/test/crack", "bottle/ground_truth/crack"):
...         Path(tmp, sub).mkdir(parents=True)
...     Image.new("RGB", (8, 8)).save(Path(tmp, "bottle/test/crack/001.png"))
...     Image.new("L", (8, 8), 255).save(Path(tmp, "bottle/ground_truth/crack/001_mask.png"))
...     records = match_captions(tmp, {"bottle": {"crack": ["first", "second"]}})
...     [(r.category, r.defect, r.caption, r.image.name) for r in records]
[('bottle', 'crack', 'second', '001.png')]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..io import list_images, masks_for, read_image, read_mask, resize
from ..synthesizers.diffusion.prompts import load_captions

__all__ = ["CaptionedDefect", "CaptionedDefects", "match_captions"]


@dataclass(frozen=True)
class CaptionedDefect:
    """One anomalous test image with its mask files and caption."""

    image: Path
    masks: tuple[Path, ...]
    caption: str
    category: str
    defect: str


def match_captions(
    root: str | Path,
    captions: str | Path | dict[str, dict[str, list[str]]],
    categories: list[str] | None = None,
) -> list[CaptionedDefect]:
    """Pair every captioned anomalous test image under ``root`` with its masks.

    Args:
        root (str | Path): folder holding ``<category>/test/<defect>/NNN.png`` and ``<category>/ground_truth``.
        captions (str | Path | dict): caption JSON (path or loaded).
        categories (list[str] | None, optional): categories to use; ``None`` = every caption category found under
            ``root``. Defaults to ``None``.

    Returns:
        list[CaptionedDefect]: sorted by category, defect and file name.

    Raises:
        ValueError: when a requested category is missing from the captions or from ``root``, or nothing matches.
        FileNotFoundError: when the caption file does not exist.
    """
    root = Path(root)
    data = load_captions(captions) if isinstance(captions, (str, Path)) else captions
    wanted = categories or [c for c in sorted(data) if (root / c / "test").is_dir()]
    records: list[CaptionedDefect] = []
    for category in wanted:
        key = Path(category).name
        if key not in data:
            msg = f"category {key!r} has no captions (caption categories: {', '.join(sorted(data))})"
            raise ValueError(msg)
        test = root / category / "test"
        if not test.is_dir():
            msg = f"{test} does not exist (expected MVTec layout <category>/test/<defect>/NNN.png)"
            raise ValueError(msg)
        for defect, texts in sorted(data[key].items()):
            for image in list_images(test / defect, recursive=False) if (test / defect).is_dir() else []:
                if not image.stem.isdigit() or int(image.stem) >= len(texts):
                    continue
                masks = masks_for(root / category / "ground_truth" / defect, image)
                records.append(CaptionedDefect(image, tuple(masks), texts[int(image.stem)], key, defect))
    if not records:
        msg = f"no captioned anomalous images under {root} for categories {wanted}"
        raise ValueError(msg)
    return records


class CaptionedDefects(Dataset):
    """A dataset of ``{"image": [3,H,W] in [0,1], "mask": [1,H,W] float {0,1}, "caption": str}`` items.

    Args:
        records (list[CaptionedDefect]): from :func:`match_captions`.
        size (tuple[int, int]): ``(H, W)`` images and masks are resized to.
    """

    def __init__(self, records: list[CaptionedDefect], size: tuple[int, int]) -> None:
        self.records, self.size = list(records), tuple(size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image: Tensor = resize(read_image(record.image, channels=3), self.size)
        mask = read_mask(list(record.masks), self.size)[None].float()
        return {"image": image, "mask": mask, "caption": record.caption}

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "image": torch.stack([i["image"] for i in items]),
            "mask": torch.stack([i["mask"] for i in items]),
            "caption": [i["caption"] for i in items],
        }
