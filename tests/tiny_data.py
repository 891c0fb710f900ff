"""Test data: aliases of :mod:`anomalib_synth.toydata`, and captioned defects for the diffusion adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomalib_synth.io import builtin_photo, resize, to_uint8
from anomalib_synth.synthesizers import Synthesizer
from anomalib_synth.toydata import make_toy_folder as make_folder_dataset
from anomalib_synth.toydata import toy_folder_datamodule as folder_datamodule

__all__ = [
    "EveryOtherAnomalous",
    "fake_captioned_mvtec",
    "folder_datamodule",
    "folder_datamodule_config",
    "make_folder_dataset",
    "training_batch",
]


def fake_captioned_mvtec(root: Path, size: int = 32) -> dict:
    """bottle/test/{crack,good} with AD-style masks, and juice/test/logical with LOCO-style mask folders."""
    photo = to_uint8(resize(builtin_photo("coffee"), (size, size)))
    captions = {"bottle": {"crack": [f"crack caption {i}" for i in range(3)], "good": []},
                "juice": {"logical": ["wrong label 0", "wrong label 1"]}, "unused": {"x": ["never"]}}  # fmt: skip
    for category, defect, indices in (("bottle", "crack", (0, 2, 5)), ("juice", "logical", (1,))):
        (root / category / "test" / defect).mkdir(parents=True)
        (root / category / "ground_truth" / defect).mkdir(parents=True)
        for i in indices:
            Image.fromarray(photo).save(root / category / "test" / defect / f"{i:03d}.png")
            mask = np.zeros((size, size), np.uint8)
            mask[4 + i : 14 + i, 6:20] = 255
            if category == "bottle":
                Image.fromarray(mask).save(root / category / "ground_truth" / defect / f"{i:03d}_mask.png")
            else:  # LOCO: one folder per image, one PNG per annotated region, values encode the type
                folder = root / category / "ground_truth" / defect / f"{i:03d}"
                folder.mkdir()
                Image.fromarray((mask > 0).astype(np.uint8) * 7).save(folder / "000.png")
                extra = np.zeros_like(mask)
                extra[20:26, 20:26] = 3
                Image.fromarray(extra).save(folder / "001.png")
    (root / "bottle" / "test" / "good").mkdir()
    Image.fromarray(photo).save(root / "bottle" / "test" / "good" / "000.png")
    path = root / "captions.json"
    path.write_text(json.dumps(captions))
    return {"root": root, "captions": path}


def training_batch() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = torch.stack([resize(builtin_photo(n), (32, 32)) for n in ("coffee", "brick")])
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 8:20, 6:14] = 1
    masks[1, :, 18:28, 10:30] = 1
    images = torch.where(masks.bool(), torch.tensor([0.1, 0.05, 0.0]).view(1, 3, 1, 1), images)  # drawn dark defects
    return images, masks, ["The coffee cup has a dark stain.", "The brick has a black hole."]


def folder_datamodule_config(root: Path) -> dict:
    """The ``class_path`` / ``init_args`` block of an anomalib ``Folder`` over :func:`make_folder_dataset` (1-shot
    batches, no workers, no real anomalies in validation), for YAML configs in tests."""
    return {
        "class_path": "anomalib.data.Folder",
        "init_args": {"name": "tiny", "root": str(root), "normal_dir": "good", "abnormal_dir": "defect",
                      "normal_test_dir": "test_good", "mask_dir": "mask", "val_split_mode": "none",
                      "train_batch_size": 1, "eval_batch_size": 4, "num_workers": 0},
    }  # fmt: skip


ANOMALYANY_FAST = {"num_inference_steps": 8, "gamma": 0.5, "attention_steps": 2, "inner_steps": 2,
                   "refine_fraction": 0.5, "localized_range": None}  # fmt: skip
"""The smallest AnomalyAny schedule that still has guided, plain and refinement steps (8 x 0.5 = 4 executed)."""


class EveryOtherAnomalous(Synthesizer):
    """Makes samples 0, 2, ... of each batch anomalous (a dark 8x8 corner) and leaves 1, 3, ... normal, as a
    synthesizer does for a sample with an empty foreground."""

    name = "every-other"

    def sample_params(self, images, fg_masks, generator):
        return {}

    def apply(self, images, params):
        masks = torch.zeros_like(images[:, :1], dtype=torch.bool)
        masks[::2, :, :8, :8] = True
        return self._result(images, torch.where(masks, 0.0, images), masks, params, ())
