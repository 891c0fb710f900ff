"""Pretraining of the one-prompt segmenter on synthetic change pairs (``anomalib-synth pretrain-segmenter``).

A plain torch loop, as MetaUAS trains its segmenter once, offline, before any category is seen (Gao, NeurIPS 2024,
one-prompt meta-learning). Departures: the pairs come from this project's synthesizers on normal images of other
categories (:mod:`.pairs`) rather than from a generic change-segmentation data set, and the budget is CPU minutes
(a few hundred batches of 8 at 256 px) rather than GPU days.

- Loss: binary cross-entropy plus soft dice over the batch (the dice term keeps small defects from drowning in the
  background; over the whole batch, so that an all-normal sample does not divide by zero). AdamW with a cosine
  decay of the learning rate.
- The frozen backbone's features of every source image are computed once (prompts are un-augmented source images);
  queries are new views and are embedded at every step.
- Reproducible and resumable: the model's initial weights come from ``seed``; every random draw of the pairs comes
  from one ``torch.Generator`` seeded from ``seed``. Every ``checkpoint_every`` steps, the trained weights, the
  optimiser, the schedule, the generator state and the losses so far are written atomically to
  ``OUTPUT/checkpoints/last.pt``; rerunning the same command resumes there and ends with the same weights as an
  uninterrupted run. A folder made with other settings is refused (:class:`~anomalib_synth.errors.RunMismatchError`).
- The result is ``OUTPUT/config.json`` + ``OUTPUT/model.safetensors`` (``OnePromptSegmenterModel.from_pretrained``);
  ``config.json`` records the training images (``training_data``) for the leakage check, and ``pretraining`` the
  settings, the final loss and the CPU time.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import RunMismatchError
from ...io import atomic_path
from ...seeding import derive_seed
from .pairs import DEFAULT_SYNTHESIZERS, PairMaker, load_sources, make_synthesizers, pair_sources, source_name
from .torch_model import OnePromptSegmenterModel

__all__ = ["DEFAULT_STEPS", "PretrainResult", "pretrain_segmenter", "segmentation_loss"]

DEFAULT_STEPS = 600
"""Default number of batches. Measured: 600 batches of 8 at 256 px from 121 source images (``../shared/data``
without bottle, plus the 8 photos) took 9.5 CPU-minutes with one thread (570 s of process time; 362 s user + 212 s
system for the whole command), 28 minutes of wall time on a 2-core machine shared with other jobs (33 % of a core)."""
CHECKPOINT = Path("checkpoints") / "last.pt"


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Binary cross-entropy plus soft dice (over the whole batch) of mask logits against ``{0, 1}`` masks."""
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * masks).sum() + 1) / (prob.sum() + masks.sum() + 1)
    return bce + dice


@dataclass
class PretrainResult:
    """What :func:`pretrain_segmenter` returns."""

    model: OnePromptSegmenterModel
    folder: Path
    losses: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    resumed_from: int = 0


def _embed_all(model: OnePromptSegmenterModel, images: Tensor, batch: int = 16) -> dict[str, Tensor]:
    parts = [model.embed(images[i : i + batch]) for i in range(0, len(images), batch)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def pretrain_segmenter(
    data_roots: Sequence[str | Path],
    exclude: Sequence[str],
    output: str | Path,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 8,
    image_size: int = 256,
    seed: int = 0,
    texture_dir: str | None = None,
    synthesizers: str = DEFAULT_SYNTHESIZERS,
    anomaly_ratio: float = 0.75,
    lr: float = 1e-3,
    checkpoint_every: int = 100,
    builtin_photos: bool = True,
    model_args: dict[str, Any] | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    threads: int | None = None,
) -> PretrainResult:
    """Pretrain a :class:`OnePromptSegmenterModel` on change pairs and save it to ``output``.

    Args:
        data_roots: folders searched for normal images (:func:`~.pairs.pair_sources`).
        exclude: categories left out by name, in every root (the ones you will evaluate on).
        output: the run folder: the final model (``config.json``, ``model.safetensors``) and ``checkpoints/``.
        steps: batches to train. Defaults to :data:`DEFAULT_STEPS`.
        batch_size: pairs per batch. Defaults to ``8``.
        image_size: side of the square images. Defaults to ``256``.
        seed: seed of the initial weights and of the pairs. Defaults to ``0``.
        texture_dir: anomaly-source textures (e.g. DTD ``images/``) for the synthesizers that take them.
        synthesizers: ``+``-separated synthesizer names, drawn per sample. Defaults to ``perlin+cutpaste+nsa+scar``.
        anomaly_ratio: fraction of queries with an anomaly. Defaults to ``0.75``.
        lr: AdamW learning rate (cosine-decayed to a tenth). Defaults to ``1e-3``.
        checkpoint_every: steps between checkpoints. Defaults to ``100``.
        builtin_photos: add scikit-image's photos to the sources. Defaults to ``True``.
        model_args: init arguments of the model (``backbone``, ``layers``, ``pre_trained``, ...).
        progress: show a tqdm progress bar. Defaults to ``True``.
        callback: called as ``callback(step, loss)`` after every step (``step`` counts from 1).
        threads: torch CPU threads during the run (restored after); ``None`` keeps the current setting. On a shared
            machine one thread spends the least CPU time per step (idle OpenMP threads spin).

    Returns:
        PretrainResult: the trained model, its folder, the loss of every step, and the CPU and wall seconds
        (summed over resumed runs).

    Raises:
        RunMismatchError: ``output`` holds a checkpoint made with other settings.
        ValueError: bad arguments, a missing root, or no images left.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("image_size", image_size),
                        ("checkpoint_every", checkpoint_every)):  # fmt: skip
        if int(value) < 1:
            msg = f"{name} must be a positive integer, got {value}"
            raise ValueError(msg)
    if image_size % 8:
        msg = f"image_size must be a multiple of 8 (the alignment runs at stride 8), got {image_size}"
        raise ValueError(msg)
    if threads is not None and int(threads) < 1:
        msg = f"threads must be a positive integer, got {threads}"
        raise ValueError(msg)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _pretrain(data_roots, exclude, Path(output), int(steps), int(batch_size), int(image_size), int(seed),
                         texture_dir, synthesizers, float(anomaly_ratio), float(lr), int(checkpoint_every),
                         bool(builtin_photos), dict(model_args or {}), progress, callback)  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(data_roots, exclude, output, steps, batch_size, image_size, seed, texture_dir, synthesizers,
              anomaly_ratio, lr, checkpoint_every, builtin_photos, model_args, progress, callback) -> PretrainResult:  # fmt: skip
    from tqdm.auto import tqdm

    start_cpu, start_wall = time.process_time(), time.perf_counter()
    sources = pair_sources(data_roots, exclude, builtin_photos=builtin_photos)
    names = [source_name(s) for s in sources]
    settings = {
        "data_roots": [str(Path(r).resolve()) for r in data_roots], "exclude": sorted(exclude), "steps": int(steps),
        "batch_size": int(batch_size), "image_size": int(image_size), "seed": int(seed),
        "texture_dir": str(Path(texture_dir).resolve()) if texture_dir else None, "synthesizers": synthesizers,
        "anomaly_ratio": float(anomaly_ratio), "lr": float(lr), "builtin_photos": bool(builtin_photos),
        "model_args": model_args, "sources": len(names),
    }  # fmt: skip

    with torch.random.fork_rng(devices=[]):  # the initial weights come from the seed, the global RNG is restored
        torch.manual_seed(derive_seed(seed, "train"))
        model = OnePromptSegmenterModel(**model_args)
    model.training_data = names
    maker = PairMaker(load_sources(sources, image_size), make_synthesizers(synthesizers, texture_dir), anomaly_ratio)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator = torch.Generator().manual_seed(derive_seed(seed, "online"))
    losses: list[float] = []
    step, spent_cpu, spent_wall = 0, 0.0, 0.0

    checkpoint = output / CHECKPOINT
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("settings") != settings or state.get("training_data") != names:
            msg = (f"{str(output)!r} holds a pretraining run with other settings or images; use another --output, "
                   "or delete it to start over")  # fmt: skip
            raise RunMismatchError(msg)
        with torch.no_grad():
            for name, tensor in model.trainable_state().items():
                tensor.copy_(state["model"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        losses = list(state["losses"])
        step, spent_cpu, spent_wall = int(state["step"]), float(state["cpu_seconds"]), float(state["wall_seconds"])
    resumed_from = step

    def elapsed() -> tuple[float, float]:
        return spent_cpu + time.process_time() - start_cpu, spent_wall + time.perf_counter() - start_wall

    def save_checkpoint() -> None:
        cpu, wall = elapsed()
        state = {"settings": settings, "training_data": names, "step": step,
                 "model": {k: v.detach().clone() for k, v in model.trainable_state().items()},
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "generator": generator.get_state(), "losses": losses, "cpu_seconds": cpu, "wall_seconds": wall}  # fmt: skip
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    if step < steps:
        cache = _embed_all(model, maker.images)
        model.train()
        with tqdm(total=steps, initial=step, desc="pretrain segmenter", unit="step", disable=not progress) as bar:
            while step < steps:
                batch = maker(batch_size, generator)
                prompts = {key: value[batch.source] for key, value in cache.items()}
                logits = model.segment_features(batch.queries, prompts, paired=True)
                loss = segmentation_loss(logits, batch.masks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if step % checkpoint_every == 0 or step == steps:
                    save_checkpoint()
                if callback is not None:
                    callback(step, losses[-1])
    model.eval()
    cpu, wall = elapsed()
    tail = losses[-max(1, len(losses) // 10) :]
    extra = {"pretraining": {**settings, "final_loss": sum(tail) / len(tail), "cpu_seconds": round(cpu, 1),
                             "wall_seconds": round(wall, 1), "torch_threads": torch.get_num_threads(),
                             "cpu_count": os.cpu_count(), "losses_every_10": losses[::10]}}  # fmt: skip
    model.save_pretrained(output, extra=extra)
    return PretrainResult(model, output, losses, cpu, wall, resumed_from)
