"""Training AnomalyXFusion's adapter (MIF + DDF [+ LoRA]) on MVTec-Caption triples, with Lightning at the edge.

:func:`train_xfusion` is what ``anomalib-synth train xfusion`` runs: it finds the captioned images (with the
leakage exclusions), records them in the adapter's config, and trains
:class:`~anomalib_synth.synthesizers.diffusion.xfusion.lightning_model.XFusionTraining` (re-exported here) through
the shared loop of :func:`~anomalib_synth.training.runner.fit_adapter`
(progress bar, checkpoints and resume, mixed precision on CUDA, Lightning strategies for several GPUs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..synthesizers.diffusion.loading import CLIP_VIT_L14, SD15
from ..synthesizers.diffusion.xfusion.lightning_model import XFusionTraining

__all__ = ["XFusionTraining", "train_xfusion", "training_records"]


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
    local_files_only: bool | None = None,
    exclude_categories: list[str] | None = None,
    exclude_images: list[str | Path] | None = None,
    exclude_split: str | Path | None = None,
    **trainer_options: Any,
) -> Path:
    """Train an adapter on the captioned anomalous images under ``data_root``; returns ``OUTPUT/adapter``.

    Rerunning the same command resumes from ``OUTPUT/checkpoints/last.ckpt`` (raise ``max_steps`` to continue).
    ``trainer_options``: ``precision``, ``accelerator``, ``devices``, ``strategy``, ``checkpoint_every``,
    ``num_workers``, ``seed``, ``progress`` (see :func:`~anomalib_synth.training.runner.fit_adapter`).

    MVTec-Caption captions the *test* anomalies, so an adapter trained on them must not be evaluated on the same
    images: ``exclude_categories``, ``exclude_images`` (paths or path suffixes) and ``exclude_split`` (a file of
    image paths, e.g. the test images of the evaluation) leave images out (see
    :func:`~anomalib_synth.training.leakage.exclude_records`). The adapter's config records the images it was
    trained on (``training_data``), which the evaluation harness checks.

    Raises:
        ValueError: when no captioned image is found (see :func:`~anomalib_synth.data.captions.match_captions`), or
            when the exclusions leave none.
        ModelNotFoundError: when a base model cannot be loaded.
    """
    from lightning.pytorch import seed_everything

    from .captions import CaptionedDefects
    from .runner import fit_adapter

    seed_everything(int(trainer_options.get("seed", 0)), workers=True, verbose=False)
    records, record = training_records(data_root, captions, categories, exclude_categories, exclude_images,
                                       exclude_split)  # fmt: skip
    dataset = CaptionedDefects(records, (image_size, image_size))
    module = XFusionTraining(base_model, clip_model, num_tokens=num_tokens, lora_rank=lora_rank, lr=lr,
                             local_files_only=local_files_only)  # fmt: skip
    module.model.adapter.training_data = record
    return fit_adapter(module, dataset, CaptionedDefects.collate, output, max_steps, batch_size, **trainer_options)


def training_records(data_root: str | Path, captions: Any, categories: list[str] | None = None,
                     exclude_categories: list[str] | None = None, exclude_images: list[str | Path] | None = None,
                     exclude_split: str | Path | None = None) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    """The captioned images to train on (after the exclusions) and the ``training_data`` record of the config."""
    from .captions import match_captions
    from .leakage import exclude_records, training_data

    records = match_captions(data_root, captions, categories)
    kept, excluded = exclude_records(records, exclude_categories, exclude_images, exclude_split)
    return kept, training_data(kept, data_root, excluded)
