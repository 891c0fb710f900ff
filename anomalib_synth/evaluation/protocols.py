"""Evaluation protocols: each turns k normal shots (+ a synthesizer) into anomaly maps of the real test images.

- ``segmentation`` (AnomalyDiffusion / AnomalyXFusion protocol): a compact U-Net is trained from scratch on
  (synthetic image, mask) pairs made from the shots (each sample anomalous with probability ``anomaly_ratio``), with
  BCE + Dice, AdamW, a fixed number of steps. Its sigmoid map is the anomaly map.
- ``draem``: anomalib's ``Draem`` trained through the ``Engine`` on the shots for a fixed number of steps, with its
  built-in generator swapped for the synthesizer under test (:class:`~anomalib_synth.data.SynthesizerSwap`);
  ``anomalib-perlin`` leaves DRAEM stock (its own generator, given the same textures).
- ``anomalib``: any anomalib model (class path + init args) trained through
  :class:`~anomalib_synth.data.SyntheticAnomalyDataModule` on the shots: models that learn from labelled anomalies
  (:data:`LABEL_CONSUMERS`) get online synthesis, the others (which would store synthetic anomalies as normal) only a
  synthetic validation split; ``none`` trains it without synthesis.

Maps are the models' raw outputs (anomalib's post-processor is skipped) and are scored after min-max normalisation
over the test set, the same for every row.

Controls, trained on nothing synthetic: ``control-untrained`` (the protocol's network, initialised, not trained),
``control-shot-diff`` (the blurred absolute difference to the nearest shot image) and ``control-patchcore``
(PatchCore on the shots, :mod:`.detectors`).

The protocols on anomalib's detectors with an ImageNet backbone (``patchcore``, ``supersimplenet``, ``glass``) are in
:mod:`.detectors`; every protocol is a :class:`~.base.Protocol` in :data:`~.base.REGISTRY`.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from ..synthesizers import Synthesizer, get, get_class
from ..transforms import synthesize_batch
from .base import CONTROLS, Budget, Outcome, Protocol, RunContext, register_protocol
from .mix import SEPARATOR, MixSynthesizer
from .unet import UNet

__all__ = ["CONTROLS", "Budget", "anomalib_model", "draem", "make_synthesizer", "segmentation", "shot_difference"]


def make_synthesizer(name: str, texture_dir: str | None, test_images: list | None = None, **kwargs: Any) -> Synthesizer:
    """Build ``name``, giving ``texture_dir`` to every synthesizer that takes an anomaly source; ``a+b+c`` is a
    per-sample mix of them (:class:`~.mix.MixSynthesizer`).

    Ours place defects on the estimated object (their default ``foreground="auto"``); anomalib's baseline has no such
    option.
    With ``test_images``, a synthesizer that has seen any of them (an adapter trained on them, or references among
    them) is refused (:func:`~anomalib_synth.training.leakage.check_leakage`).
    """
    if SEPARATOR in name:  # a per-sample mix, e.g. "perlin+cutpaste+nsa"
        parts = name.split(SEPARATOR)
        return MixSynthesizer([make_synthesizer(part, texture_dir, test_images, **kwargs) for part in parts])
    argument = get_class(name).texture_argument
    if texture_dir is not None and argument is not None:
        kwargs.setdefault(argument, texture_dir)
    synth = get(name, **kwargs)
    if test_images is not None:
        from ..training.leakage import check_leakage

        check_leakage(synth, test_images, what=name)
    return synth


def _predict(net: torch.nn.Module, images: Tensor, batch_size: int = 16) -> Tensor:
    net.eval()
    with torch.no_grad():
        return torch.cat(
            [torch.sigmoid(net(images[i : i + batch_size]))[:, 0] for i in range(0, len(images), batch_size)]
        )


def dice_loss(probabilities: Tensor, target: Tensor) -> Tensor:
    inter = (probabilities * target).sum((1, 2, 3))
    total = probabilities.sum((1, 2, 3)) + target.sum((1, 2, 3))
    return (1 - (2 * inter + 1) / (total + 1)).mean()


def segmentation(
    shots: Tensor, test_images: Tensor, synthesizer: Synthesizer | None, seed: int, budget: Budget
) -> tuple[Tensor, list[float]]:
    """Train a U-Net on synthetic pairs from ``shots`` (``None``: untrained control); maps ``[N, H, W]`` and losses."""
    torch.manual_seed(seed)
    net = UNet()
    losses: list[float] = []
    if synthesizer is not None:
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.AdamW(net.parameters(), lr=budget.lr, weight_decay=1e-4)
        net.train()
        for _ in range(budget.steps):
            index = torch.randint(len(shots), (budget.batch_size,), generator=generator)
            images, masks, _ = synthesize_batch(synthesizer, shots[index], None, None, budget.anomaly_ratio, generator)
            target = masks.float()
            logits = net(images)
            loss = F.binary_cross_entropy_with_logits(logits, target) + dice_loss(torch.sigmoid(logits), target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    return _predict(net, test_images), losses


def shot_difference(shots: Tensor, test_images: Tensor, sigma: float = 2.0) -> Tensor:
    """Blurred mean absolute difference of each test image to its nearest shot (the ``control-shot-diff`` row)."""
    from kornia.filters import gaussian_blur2d

    k = 2 * round(3 * sigma) + 1
    maps = []
    for image in test_images:
        diff = (image[None] - shots).abs().mean(1, keepdim=True)  # [k, 1, H, W]
        nearest = diff.mean((1, 2, 3)).argmin()
        maps.append(gaussian_blur2d(diff[nearest : nearest + 1], (k, k), (sigma, sigma))[0, 0])
    return torch.stack(maps)


def _samples_dataset(paths: list[str], split: str):
    from anomalib.data.datasets.base import AnomalibDataset

    dataset = AnomalibDataset()
    samples = pd.DataFrame({"image_path": paths, "label": "normal", "label_index": 0, "mask_path": "", "split": split})
    samples.attrs["task"] = "segmentation"
    dataset.samples = samples
    return dataset


def shots_datamodule(shot_paths: list[Path], repeats: int, batch_size: int, length: int | None = None):
    """An anomalib datamodule whose training set is the shots repeated ``repeats`` times, or cycled to ``length``
    rows (no validation)."""
    from anomalib.data import AnomalibDataModule

    class Shots(AnomalibDataModule):
        def _setup(self, _stage: str | None = None) -> None:
            paths = [str(p) for p in shot_paths] * repeats
            if length is not None:
                paths = [str(shot_paths[i % len(shot_paths)]) for i in range(length)]
            self.train_data = _samples_dataset(paths, "train")
            self.test_data = _samples_dataset([str(p) for p in shot_paths], "test")

        def _create_test_split(self) -> None:  # the real test set is scored outside anomalib
            pass

        def val_dataloader(self):
            return []

        @property
        def name(self) -> str:
            return "shots"

    return Shots(train_batch_size=batch_size, eval_batch_size=batch_size, num_workers=0)


def _anomaly_maps(model: torch.nn.Module, images: Tensor, size: tuple[int, int], batch_size: int = 8) -> Tensor:
    """Raw maps of the torch model after the pre-processor: anomalib's post-processor is skipped on purpose, as its
    normalisation (and clamping) depends on whether a validation set set its statistics, which differs between runs."""
    model.eval()
    maps = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            batch = model.pre_processor(batch) if model.pre_processor else batch
            out = model.model(batch).anomaly_map
            out = out.reshape(out.shape[0], 1, *out.shape[-2:]).float()
            maps.append(F.interpolate(out, size=size, mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(maps)


def _engine(workdir: Path, budget: Budget, callbacks: list, epochs: int | None = None) -> Any:
    """A barebones CPU ``Engine``: ``budget.steps`` optimiser steps, or ``epochs`` epochs (for models whose
    schedules count epochs, or that step several optimisers per batch)."""
    from anomalib.engine import Engine

    # barebones: no checkpoint is needed, and saving DRAEM's 97 M parameters with their Adam state took 60 % of a run
    limits = {"max_steps": budget.steps, "max_epochs": -1} if epochs is None else {"max_epochs": epochs}
    return Engine(**limits, accelerator=budget.accelerator, logger=False, barebones=True, default_root_dir=str(workdir),
                  callbacks=callbacks, num_sanity_val_steps=0)  # fmt: skip


def _resize_only(size: tuple[int, int]):
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Resize

    return PreProcessor(transform=Resize(size))


def draem(
    shot_paths: list[Path],
    test_images: Tensor,
    synthesizer: str,
    seed: int,
    budget: Budget,
    size: tuple[int, int],
    texture_dir: str | None,
    train: bool = True,
    test_paths: list | None = None,
) -> Tensor:
    """Train anomalib's DRAEM on the shots with ``synthesizer`` as its generator; maps of ``test_images``.

    With ``test_paths``, a synthesizer that has seen any test image is refused (the leakage check)."""
    from anomalib.models import Draem
    from lightning.pytorch import seed_everything

    from ..data import SynthesizerSwap

    seed_everything(seed, workers=True, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        dtd = texture_dir or str(Path(tmp) / "empty-dtd")
        Path(dtd).mkdir(exist_ok=True)
        model = Draem(dtd_dir=dtd, pre_processor=_resize_only(size))
        if not train:
            return _anomaly_maps(model, test_images, size)
        callbacks = []
        if synthesizer != "anomalib-perlin":  # stock DRAEM keeps its own generator (probability 0.5)
            synth = make_synthesizer(synthesizer, texture_dir, test_paths)
            callbacks.append(SynthesizerSwap(synth, probability=budget.anomaly_ratio, seed=seed))
        datamodule = shots_datamodule(shot_paths, repeats=budget.batch_size, batch_size=budget.batch_size)
        _engine(Path(tmp), budget, callbacks).fit(model=model, datamodule=datamodule)
        return _anomaly_maps(model, test_images, size)


LABEL_CONSUMERS = ("Supersimplenet", "UniNet")
"""anomalib models that learn from labelled anomalous training samples; all others (Patchcore, Padim, ...) would
store synthetic anomalies as normal, so they only get a synthetic validation split."""


def _build_model(model: str, init_args: dict[str, Any], size: tuple[int, int]):
    """Build ``model`` with its default pre-processor at ``size`` (train and test at the same resolution)."""
    module, _, name = model.rpartition(".")
    cls = getattr(importlib.import_module(module or "anomalib.models"), name)
    init_args.setdefault("pre_processor", cls.configure_pre_processor(image_size=size))
    return cls(**init_args)


def anomalib_model(
    shot_paths: list[Path],
    test_images: Tensor,
    synthesizer: str,
    seed: int,
    budget: Budget,
    size: tuple[int, int],
    texture_dir: str | None,
    model: str = "anomalib.models.Patchcore",
    init_args: dict[str, Any] | None = None,
    train: bool = True,
    test_paths: list | None = None,
) -> Tensor:
    """Train any anomalib model through :class:`SyntheticAnomalyDataModule` (``synthesizer="none"``: plain).

    With ``test_paths``, a synthesizer that has seen any test image is refused (the leakage check)."""
    from lightning.pytorch import seed_everything

    from ..data import SyntheticAnomalyDataModule

    seed_everything(seed, workers=True, verbose=False)
    net = _build_model(model, dict(init_args or {}), size)
    if not train:
        return _anomaly_maps(net, test_images, size)
    consumes_labels = type(net).__name__ in LABEL_CONSUMERS
    with tempfile.TemporaryDirectory() as tmp:
        # no repeated rows when wrapped: the wrapper would hold out a copy of a shot as "unseen" validation image
        repeats = 1 if synthesizer != "none" else budget.batch_size
        datamodule = shots_datamodule(shot_paths, repeats=repeats, batch_size=budget.batch_size)
        if synthesizer != "none":
            datamodule = SyntheticAnomalyDataModule(
                datamodule, make_synthesizer(synthesizer, texture_dir, test_paths),
                anomaly_ratio=budget.anomaly_ratio if consumes_labels else 0.0,
                synthetic_val=True, cache_dir=str(Path(tmp) / "cache"), seed=seed, image_size=size,
            )  # fmt: skip
        _engine(Path(tmp), budget, []).fit(model=net, datamodule=datamodule)
        return _anomaly_maps(net, test_images, size)


# --- the protocols of this module, registered ----------------------------------------------------------------------
@register_protocol
class SegmentationProtocol(Protocol):
    """A compact U-Net trained from scratch on synthetic pairs: isolates the synthesizer."""

    name = "segmentation"
    budget = Budget(steps=300, batch_size=8, lr=1e-3, image_size=128)
    controls = ("control-untrained", "control-shot-diff", "control-patchcore")
    description = "U-Net from scratch on synthetic pairs (isolates the synthesizer)"

    def train(self, method: str, ctx: RunContext) -> Outcome:
        synth = None if method == "control-untrained" else make_synthesizer(method, ctx.texture_dir, ctx.test_paths)
        maps, losses = segmentation(ctx.shots, ctx.test_images, synth, ctx.seed, ctx.budget)
        return Outcome(maps, losses)

    def budget_text(self, budget: Budget) -> str:
        return (f"{budget.steps} AdamW steps, batch {budget.batch_size}, lr {budget.lr}, anomaly ratio "
                f"{budget.anomaly_ratio}")  # fmt: skip


@register_protocol
class DraemProtocol(Protocol):
    """anomalib's DRAEM with its generator swapped; ``anomalib-perlin`` is stock DRAEM."""

    name = "draem"
    budget = Budget(steps=40, batch_size=4, lr=1e-4, image_size=128)
    controls = ("control-untrained", "control-shot-diff", "control-patchcore")
    description = "anomalib's DRAEM with its generator swapped (anomalib-perlin: stock DRAEM)"

    def train(self, method: str, ctx: RunContext) -> Outcome:
        maps = draem(ctx.shot_paths, ctx.test_images, method, ctx.seed, ctx.budget, ctx.size, ctx.texture_dir,
                     train=method != "control-untrained", test_paths=ctx.test_paths)  # fmt: skip
        return Outcome(maps)


@register_protocol
class AnomalibProtocol(Protocol):
    """Any anomalib model (``--model``, ``--model-arg``) through :class:`SyntheticAnomalyDataModule`."""

    name = "anomalib"
    budget = Budget(steps=40, batch_size=4, lr=1e-4, image_size=128)
    controls = ("control-shot-diff", "control-patchcore")
    accepts_none = True
    description = "any anomalib model through SyntheticAnomalyDataModule (none: without synthesis)"

    def train(self, method: str, ctx: RunContext) -> Outcome:
        maps = anomalib_model(ctx.shot_paths, ctx.test_images, method, ctx.seed, ctx.budget, ctx.size,
                              ctx.texture_dir, ctx.config.model, ctx.config.model_args,
                              test_paths=ctx.test_paths)  # fmt: skip
        return Outcome(maps)
