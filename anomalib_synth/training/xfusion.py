"""Training AnomalyXFusion's adapter (MIF + DDF [+ LoRA]) on MVTec-Caption triples, with Lightning at the edge.

:class:`XFusionTraining` wraps :class:`~anomalib_synth.synthesizers.diffusion.xfusion.XFusionModel`; checkpoints
hold only the trainable weights (the frozen base models are referenced by id/path). :func:`train_xfusion` is what
``anomalib-synth train xfusion`` runs: a progress bar, checkpoints every ``checkpoint_every`` steps and at the end,
resume from ``OUTPUT/checkpoints/last.ckpt``, the loss per step in ``OUTPUT/logs/version_N/metrics.csv`` (one
version per run), mixed precision on CUDA, and any Lightning strategy for several GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from ..synthesizers.diffusion.loading import CLIP_VIT_L14, SD15

__all__ = ["XFusionTraining", "train_xfusion"]


class XFusionTraining(LightningModule):
    """LightningModule around ``XFusionModel``: AdamW on the adapter, Eq. 17 loss, adapter-only checkpoints."""

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
        from ..synthesizers.diffusion.xfusion import XFusionModel

        self.save_hyperparameters()
        self.model = XFusionModel(base_model, clip_model, num_tokens=num_tokens, lora_rank=lora_rank,
                                  background_weight=background_weight, caption_dropout=caption_dropout,
                                  local_files_only=local_files_only)  # fmt: skip
        self.strict_loading = False  # checkpoints hold only the trainable weights

    def training_step(self, batch: dict[str, Any], _batch_idx: int) -> torch.Tensor:
        loss = self.model.training_loss(batch["image"], batch["mask"], batch["caption"])
        self.log("loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.model.trainable_parameters()
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def train_xfusion(
    data_root: str | Path,
    captions: str | Path,
    output: str | Path = "xfusion_run",
    categories: list[str] | None = None,
    base_model: str = SD15,
    clip_model: str = CLIP_VIT_L14,
    max_steps: int = 1000,
    batch_size: int = 4,
    image_size: int = 512,
    lr: float = 1e-4,
    num_tokens: int = 4,
    lora_rank: int = 0,
    precision: str | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    checkpoint_every: int = 500,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
    local_files_only: bool | None = None,
) -> Path:
    """Train an adapter on the captioned anomalous images under ``data_root``; returns ``OUTPUT/adapter``.

    Rerunning the same command resumes from ``OUTPUT/checkpoints/last.ckpt`` (raise ``max_steps`` to continue).

    Raises:
        ValueError: when no captioned image is found (see :func:`~anomalib_synth.data.captions.match_captions`).
        ModelNotFoundError: when a base model cannot be loaded.
    """
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from ..data.captions import CaptionedDefects, match_captions

    if max_steps < 1 or batch_size < 1:
        msg = f"max_steps and batch_size must be positive, got {max_steps}, {batch_size}"
        raise ValueError(msg)
    output = Path(output)
    seed_everything(seed, workers=True, verbose=False)
    dataset = CaptionedDefects(match_captions(data_root, captions, categories), (image_size, image_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        collate_fn=CaptionedDefects.collate, drop_last=len(dataset) > batch_size)  # fmt: skip
    module = XFusionTraining(base_model, clip_model, num_tokens=num_tokens, lora_rank=lora_rank, lr=lr,
                             local_files_only=local_files_only)  # fmt: skip
    checkpoints = output / "checkpoints"
    last = checkpoints / "last.ckpt"
    trainer = Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator=accelerator, devices=devices, strategy=strategy,
        precision=precision or ("16-mixed" if torch.cuda.is_available() else "32-true"),
        default_root_dir=output, logger=CSVLogger(output, name="logs"), log_every_n_steps=1,
        enable_progress_bar=progress, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=checkpoint_every,
                                   enable_version_counter=False)],
    )  # fmt: skip
    trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)
    trainer.save_checkpoint(last)  # the final state, whatever checkpoint_every was, so that a rerun resumes from it
    if trainer.is_global_zero:
        module.model.save_adapter(output / "adapter")
    return output / "adapter"
