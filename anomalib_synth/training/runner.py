"""The Lightning loop shared by the adapter trainers: progress bar, checkpoints, resume, precision, strategies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import Dataset

from ..synthesizers.diffusion.lightning_module import AdapterModule

__all__ = ["AdapterModule", "fit_adapter"]


def fit_adapter(
    module: LightningModule,
    dataset: Dataset,
    collate: Callable[[list[Any]], Any],
    output: str | Path,
    max_steps: int,
    batch_size: int,
    precision: str | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    strategy: str = "auto",
    checkpoint_every: int = 500,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train ``module`` (whose ``.model`` has ``save_adapter``) and write ``OUTPUT/adapter``; returns that folder.

    Checkpoints go to ``OUTPUT/checkpoints`` every ``checkpoint_every`` steps and at the end (``last.ckpt``); rerunning
    resumes from ``last.ckpt``, so raising ``max_steps`` continues a run. The loss per step is logged to
    ``OUTPUT/logs/version_N/metrics.csv`` (one version per run). Precision defaults to ``16-mixed`` on CUDA and
    ``32-true`` elsewhere; ``strategy`` takes any Lightning strategy (e.g. ``ddp`` on several GPUs).
    """
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    if max_steps < 1 or batch_size < 1:
        msg = f"max_steps and batch_size must be positive, got {max_steps}, {batch_size}"
        raise ValueError(msg)
    output = Path(output)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, collate_fn=collate,
                        drop_last=len(dataset) > batch_size, generator=generator)  # fmt: skip
    last = output / "checkpoints" / "last.ckpt"
    on_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    trainer = Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator=accelerator, devices=devices, strategy=strategy,
        precision=precision or ("16-mixed" if on_cuda else "32-true"),
        default_root_dir=output, logger=CSVLogger(output, name="logs"), log_every_n_steps=1,
        enable_progress_bar=progress, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=output / "checkpoints", save_last=True,
                                   every_n_train_steps=checkpoint_every, enable_version_counter=False)],
    )  # fmt: skip
    trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)
    trainer.save_checkpoint(last)  # the final state, whatever checkpoint_every was, so that a rerun resumes from it
    if trainer.is_global_zero:
        module.model.save_adapter(output / "adapter")
    return output / "adapter"
