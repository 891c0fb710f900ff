"""Lightning module of AnomalyXFusion: trains the adapter (MIF + DDF [+ LoRA]) with the Eq. 17 loss.

Lightning stays at the edge, as in anomalib: the synthesizer never imports this module. The paper does not report
its optimiser settings; AdamW at ``1e-4`` (weight decay ``1e-2``) is ours.
"""

from __future__ import annotations

from typing import Any

import torch

from ..lightning_module import AdapterModule
from ..loading import CLIP_VIT_L14, SD15
from .torch_model import XFusionModel

__all__ = ["XFusionTraining"]


class XFusionTraining(AdapterModule):
    """LightningModule around :class:`XFusionModel`: AdamW on the adapter, Eq. 17 loss, adapter-only checkpoints."""

    def __init__(
        self,
        base_model: str = SD15,
        clip_model: str = CLIP_VIT_L14,
        num_tokens: int = 4,
        lora_rank: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        background_weight: float = 0.1,
        caption_dropout: float = 0.1,
        local_files_only: bool | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = XFusionModel(base_model, clip_model, num_tokens=num_tokens, lora_rank=lora_rank,
                                  background_weight=background_weight, caption_dropout=caption_dropout,
                                  local_files_only=local_files_only)  # fmt: skip

    def training_step(self, batch: dict[str, Any], _batch_idx: int) -> torch.Tensor:
        loss = self.model.training_loss(batch["image"], batch["mask"], batch["caption"])
        self.log("loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss
