"""The Lightning base of the adapter trainers (each method's ``lightning_model.py`` subclasses it).

As in anomalib, Lightning sits at the edge: the torch cores never import this module; only the methods' training
modules do, and :func:`~anomalib_synth.training.runner.fit_adapter` runs them.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

__all__ = ["AdapterModule"]


class AdapterModule(LightningModule):
    """Base of the adapter trainers: ``self.model`` has ``trainable_parameters()`` and ``save_adapter()``; AdamW on
    those parameters; checkpoints keep only them (the frozen base models are referenced, never copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False  # checkpoints hold only the trainable weights

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.model.trainable_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
