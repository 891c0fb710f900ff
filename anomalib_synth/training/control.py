"""Training AnomalyControl's Semantic Guided Adapter on (target, reference) pairs of captioned defects.

Per sample (Sec. 3.5): the target anomalous image, its mask and caption, and a reference (image + caption + mask)
drawn by a configurable pairing strategy: by default the target itself, as the official training (whose CSM
feature is that of the target image, caption and mask). Only the SGA is trained (BLIP projection, image projection,
new K/V); the CSM features of the reference (with ASEA) come from the frozen BLIP-2 and are computed once per
reference image and cached for the run (the official code caches them to ``blip_cache/``).

The Lightning module, :class:`~anomalib_synth.synthesizers.diffusion.anomalycontrol.lightning_model.ControlTraining`,
lives with the method and is re-exported here; this module holds the data (:class:`ReferencePairs`) and the run
(:func:`train_control`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..synthesizers.diffusion.anomalycontrol import BLIP2_ITM
from ..synthesizers.diffusion.anomalycontrol.lightning_model import ControlTraining
from ..synthesizers.diffusion.loading import SD15_INPAINTING
from ..synthesizers.validation import check_choice
from .captions import CaptionedDefect, CaptionedDefects

__all__ = ["PAIRINGS", "ControlTraining", "ReferencePairs", "train_control"]

PAIRINGS = ("self", "same_defect", "same_category", "random")
"""Reference of each target: the target itself (the official training), another image of the same defect type, of
the same category, or any captioned defect (the paper's flexible, non-matching pairs)."""


class ReferencePairs(Dataset):
    """Targets with references: ``{"image", "mask", "caption", "ref_image", "ref_mask", "ref_caption", "ref_key"}``
    items (``ref_key`` names the reference image, for the feature cache).

    The reference of item ``i`` in epoch ``e`` is drawn from ``random.Random(seed, e, i)``: reproducible, and new
    each epoch (call :meth:`set_epoch`).
    """

    def __init__(self, records: list[CaptionedDefect], size: tuple[int, int], pairing: str = "self",
                 seed: int = 0) -> None:  # fmt: skip
        self.items = CaptionedDefects(records, size)
        self.pairing, self.seed, self.epoch = check_choice("pairing", pairing, PAIRINGS), seed, 0
        keys = {"self": lambda r: r.image, "same_defect": lambda r: (r.category, r.defect),
                "same_category": lambda r: r.category, "random": lambda r: None}[pairing]  # fmt: skip
        groups: dict[Any, list[int]] = {}
        for i, record in enumerate(records):
            groups.setdefault(keys(record), []).append(i)
        self.candidates = [groups[keys(r)] for r in records]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def reference_index(self, index: int) -> int:
        if self.pairing == "self":
            return index
        pool = [j for j in self.candidates[index] if j != index] or [index]
        return random.Random(f"{self.seed}-{self.epoch}-{index}").choice(pool)

    def __getitem__(self, index: int) -> dict[str, Any]:
        j = self.reference_index(index)
        target = self.items[index]
        reference = target if j == index else self.items[j]
        return {**target, "ref_image": reference["image"], "ref_mask": reference["mask"],
                "ref_caption": reference["caption"], "ref_key": str(self.items.records[j].image)}  # fmt: skip

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: torch.stack([i[key] for i in items]) if torch.is_tensor(items[0][key]) else [i[key] for i in items]
                for key in items[0]}  # fmt: skip


def train_control(data_root: str | Path, captions: str | Path, output: str | Path = "control_run",
                  categories: list[str] | None = None, pairing: str = "self", base_model: str = SD15_INPAINTING,
                  vlm: str = BLIP2_ITM, max_steps: int = 1000, batch_size: int = 4, image_size: int = 512,
                  lr: float = 1e-4, num_tokens: int = 4, image_embed_dim: int = 1024, asea_steps: int = 5,
                  init_adapter: str | Path | None = None, exclude_categories: list[str] | None = None,
                  exclude_images: list[str | Path] | None = None, exclude_split: str | Path | None = None,
                  **trainer_options: Any) -> Path:  # fmt: skip
    """Train an SGA; returns ``OUTPUT/adapter``. Resumes from ``OUTPUT/checkpoints/last.ckpt``.

    ``init_adapter``: an IP-Adapter SD 1.5 checkpoint to start from (local file or Hub file ``OWNER/REPO/PATH``,
    e.g. ``h94/IP-Adapter/models/ip-adapter_sd15.safetensors``), as the official training; without it the SGA starts
    from the text K/V and random projections. ``exclude_*`` and the recorded ``training_data``: as in
    :func:`~anomalib_synth.training.xfusion.train_xfusion`.
    ``trainer_options``: ``precision``, ``accelerator``, ``devices``, ``strategy``, ``checkpoint_every``, ``seed``,
    ``progress``, ``num_workers`` (as in :func:`~anomalib_synth.training.xfusion.train_xfusion`).
    """
    from lightning.pytorch import seed_everything

    from .runner import fit_adapter
    from .xfusion import training_records

    options = dict(trainer_options)
    seed_everything(int(options.get("seed", 0)), workers=True, verbose=False)
    records, record = training_records(data_root, captions, categories, exclude_categories, exclude_images,
                                       exclude_split)  # fmt: skip
    dataset = ReferencePairs(records, (image_size, image_size), pairing, seed=int(options.get("seed", 0)))
    module = ControlTraining(base_model, vlm, num_tokens=num_tokens, image_embed_dim=image_embed_dim, lr=lr,
                             asea_steps=asea_steps, init_adapter=None if init_adapter is None else str(init_adapter))  # fmt: skip
    module.model.training_data = record
    return fit_adapter(module, dataset, ReferencePairs.collate, output, max_steps, batch_size, **options)
