"""Protocols on anomalib's own detectors with an offline ImageNet backbone (k shots, 256 px by default).

- ``patchcore``: PatchCore with the shots as memory bank (no synthetic anomalies; its maps are the
  ``control-patchcore`` row of every table). A synthesizer only sets the **image threshold**: anomalib's
  ``F1AdaptiveThreshold`` on a synthetic validation split (held-out normal images + that synthesizer's anomalies of
  them), and the row reports the image F1 on the real test set at that threshold. References:
  ``threshold-default`` (anomalib's fallback without anomalous validation images: the highest normal score, on
  the normal images a strict k-shot user has, the shots), ``threshold-views`` (normal-only: the highest score of
  augmented views of the shots) and ``threshold-oracle`` (the best F1 on the test set itself). Validation splits
  are made of augmented views of the shots unless the evaluation is given extra normal images (``extra_normals``).
- ``supersimplenet``: SuperSimpleNet in supervised mode, trained on the shots plus each synthesizer's anomalies
  through :class:`~anomalib_synth.data.SyntheticAnomalyDataModule` (online); it still adds its own feature-space
  anomalies. ``ssn-default`` is stock unsupervised SuperSimpleNet (its own anomalies only).
- ``glass``: GLASS with its image-level augmentor swapped for each synthesizer
  (:class:`~anomalib_synth.data.SynthesizerSwap`, probability 1 as GLASS calls it); ``anomalib-perlin`` is stock
  GLASS (its own ``PerlinAnomalyGenerator``, given the same textures).

Backbone: the evaluation's ``backbone`` (default ``efficientnet_lite0.local``, registered from a local file:
:mod:`anomalib_synth.backbones`); layers ``blocks.1,blocks.2`` for PatchCore and ``blocks.2,blocks.4`` for
SuperSimpleNet and GLASS unless the evaluation sets ``layers``. The frozen backbone's features of each image are
cached within a run (:mod:`.features`): the shot is seen in every batch.

Each run of SuperSimpleNet and GLASS trains for ``budget.steps`` batches (one batch per epoch, so that
SuperSimpleNet's epoch-based learning-rate schedule and GLASS's per-epoch center pass work as designed).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import Tensor

from .base import Budget, Outcome, Protocol, RunContext, register_protocol
from .data import load_images
from .features import FeatureCache, cache_frozen_features
from .protocols import _engine, make_synthesizer, shots_datamodule

GLASS_ARGS: dict[str, Any] = {"pretrain_embed_dim": 384, "target_embed_dim": 384, "discriminator_hidden": 256}
"""GLASS sized for the small backbone: anomalib's defaults (embeddings 1536, discriminator hidden 1024) are sized
for WideResNet-50's 1536 channels of ``layer2,layer3``; EfficientNet-Lite0's ``blocks.2,blocks.4`` give 152, so
both are scaled by 1/4. Everything else (20 gradient-ascent steps, radius, focal loss, ...) is GLASS's default.
Measured on one core at 256 px, batch 4: 4.5 s per step with hidden 1024, 1.4 s with 256 (CPU time)."""


def _predict(
    model: torch.nn.Module, images: Tensor, size: tuple[int, int], batch_size: int = 8
) -> tuple[Tensor, Tensor]:
    """Raw ``(maps [N, H, W], image scores [N])`` of an anomalib model (pre-processor on, post-processor skipped)."""
    model.eval()
    maps, scores = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            batch = model.pre_processor(batch) if model.pre_processor else batch
            out = model.model(batch)
            amap = out.anomaly_map.reshape(out.anomaly_map.shape[0], 1, *out.anomaly_map.shape[-2:]).float()
            maps.append(F.interpolate(amap, size=size, mode="bilinear", align_corners=False)[:, 0])
            scores.append(out.pred_score.reshape(-1).float())
    return torch.cat(maps), torch.cat(scores)


# --- PatchCore and thresholds --------------------------------------------------------------------------------------
def fit_patchcore(ctx: RunContext, cache: FeatureCache | None = None):
    """anomalib's PatchCore with the shots as memory bank (coreset ratio 1: every patch of every shot)."""
    from anomalib.models import Patchcore

    torch.manual_seed(ctx.seed)
    model = Patchcore(
        backbone=ctx.config.backbone,
        layers=ctx.config.layers_for("patchcore"),
        pre_trained=True,
        coreset_sampling_ratio=1.0,
        pre_processor=Patchcore.configure_pre_processor(image_size=ctx.size),
    )
    if cache is not None:
        cache_frozen_features(model, cache)
    model.model.train()
    with torch.no_grad():
        for i in range(0, len(ctx.shots), 8):
            model.model(model.pre_processor(ctx.shots[i : i + 8]))  # training mode: stores the patch embeddings
    # what Patchcore.fit() does, less the coreset selection, which keeps every patch at ratio 1 (and only reorders)
    model.model.memory_bank = torch.vstack(model.model.embedding_store)
    model.model.embedding_store.clear()
    return model


def patchcore_maps(ctx: RunContext) -> tuple[Tensor, Tensor]:
    """Maps and image scores of the test images by PatchCore on the shots (the ``control-patchcore`` row)."""
    return _predict(fit_patchcore(ctx), ctx.test_images, ctx.size)


def f1_adaptive_threshold(scores: Tensor, labels: Tensor) -> float:
    """anomalib's ``F1AdaptiveThreshold`` (what its post-processor computes on the validation set): the score that
    maximises F1; without anomalous images, the highest score (its documented fallback)."""
    from anomalib.metrics import F1AdaptiveThreshold

    metric = F1AdaptiveThreshold(fields=["pred_score", "gt_label"])
    metric.update(SimpleNamespace(pred_score=scores.float(), gt_label=labels.long()))
    return float(metric.compute())


def image_f1(scores: Tensor, labels: Tensor, threshold: float) -> float:
    """F1 of ``score > threshold`` (anomalib's rule) against ``labels``."""
    return _f1(scores > threshold, labels)


def _f1(predicted: Tensor, labels: Tensor) -> float:
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def best_f1(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """The oracle: ``(best F1 over all thresholds on these scores, the threshold)``."""
    best, where = 0.0, float("inf")
    for threshold in torch.unique(scores):
        f1 = _f1(scores >= threshold, labels)  # flag every image scoring at least this much
        if f1 > best:
            best, where = f1, float(threshold)
    return best, where


def validation_normals(ctx: RunContext, count: int | None = None) -> Tensor:
    """The normal images of a validation split: the extra normal images when the evaluation was given some
    (``extra_normals``), else ``count`` (default ``budget.val_images``) augmented views of the shots
    (:mod:`anomalib_synth.views`): strict k-shot."""
    from ..seeding import generator_for
    from ..views import augmented_views

    if ctx.val_paths:
        return load_images(ctx.val_paths, ctx.size)
    views, _ = augmented_views(ctx.shots, count or ctx.budget.val_images, generator_for(ctx.seed, "val", 1))
    return views


def synthetic_validation(ctx: RunContext, synthesizer: str | None) -> tuple[Tensor, Tensor]:
    """Validation images and labels: the normal images of :func:`validation_normals` and, with a synthesizer,
    ``budget.val_images`` anomalies made from them (cycled)."""
    from ..seeding import generator_for
    from ..transforms import synthesize_batch

    normals = validation_normals(ctx)
    labels = torch.zeros(len(normals), dtype=torch.bool)
    if synthesizer is None:
        return normals, labels
    sources = normals[torch.arange(ctx.budget.val_images) % len(normals)]
    generator = generator_for(ctx.seed, "val")
    synth = make_synthesizer(synthesizer, ctx.texture_dir, ctx.test_paths)
    anomalies, _, made = synthesize_batch(synth, sources, None, None, 1.0, generator)
    return torch.cat([normals, anomalies]), torch.cat([labels, made])


NORMAL_ONLY_VIEWS = 32
"""Augmented views of the shots scored by the normal-only threshold rule (``threshold-views``)."""


@register_protocol
class PatchcoreProtocol(Protocol):
    """PatchCore on the shots; a synthesizer sets its image threshold from a synthetic validation split."""

    name = "patchcore"
    budget = Budget(steps=0, batch_size=8, lr=0.0, anomaly_ratio=1.0, image_size=256, val_images=8)
    controls = ("control-shot-diff", "control-patchcore", "threshold-default", "threshold-views", "threshold-oracle")
    verdict_metric = "image_F1"
    needs_backbone = True
    description = "PatchCore on the shots; each synthesizer sets its image threshold (image F1 on the real test set)"

    def train(self, method: str, ctx: RunContext) -> Outcome:
        cache = FeatureCache()
        model = fit_patchcore(ctx, cache)
        _, test_scores = _predict(model, ctx.test_images, ctx.size)
        labels = ctx.test_labels
        info: dict[str, Any] = {}
        if method == "threshold-oracle":
            f1, threshold = best_f1(test_scores, labels)
        elif method == "threshold-views":  # normal-only: the highest score of augmented views of the shots
            _, view_scores = _predict(model, validation_normals(ctx, NORMAL_ONLY_VIEWS), ctx.size)
            threshold = float(view_scores.max())
            f1 = image_f1(test_scores, labels, threshold)
        else:
            if method == "threshold-default":  # anomalib's fallback on what a k-shot user's validation set holds
                images = load_images(ctx.val_paths, ctx.size) if ctx.val_paths else ctx.shots
                val_labels = torch.zeros(len(images), dtype=torch.bool)
            else:
                images, val_labels = synthetic_validation(ctx, method)
            _, val_scores = _predict(model, images, ctx.size)
            threshold = f1_adaptive_threshold(val_scores, val_labels)
            f1 = image_f1(test_scores, labels, threshold)
            info.update(val_normal=int((~val_labels).sum()), val_anomalous=int(val_labels.sum()),
                        extra_normals=len(ctx.val_paths))  # fmt: skip
        predicted = test_scores > threshold
        info.update(threshold=threshold, flagged_normal=int((predicted & ~labels).sum()),
                    missed_anomalous=int((~predicted & labels).sum()), feature_cache=cache.stats())  # fmt: skip
        return Outcome(None, metrics={"image_F1": f1}, info=info)

    def budget_text(self, budget: Budget) -> str:
        return (f"memory bank of the shots (coreset ratio 1); synthetic validation: {budget.val_images} augmented "
                f"views of the shots (or the extra normal images, if the evaluation gives some) + "
                f"{budget.val_images} anomalies of them per synthesizer; threshold-views: the highest score of "
                f"{NORMAL_ONLY_VIEWS} views")  # fmt: skip


# --- SuperSimpleNet and GLASS ----------------------------------------------------------------------------------------
class LossRecorder(Callback):
    """Keeps the training loss of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss))


def _train(model, ctx: RunContext, datamodule, callbacks: list, workdir: Path) -> tuple[Tensor, list[float], dict]:
    """Fit ``model`` for ``budget.steps`` one-batch epochs with the backbone cache; test maps, losses and stats."""
    cache = FeatureCache()
    if ctx.config.feature_cache:
        cache_frozen_features(model, cache)
    recorder = LossRecorder()
    batches_per_epoch = math.ceil(_rows(ctx) / ctx.budget.batch_size)
    epochs = max(1, math.ceil(ctx.budget.steps / batches_per_epoch))
    _engine(workdir, ctx.budget, [*callbacks, recorder], epochs=epochs).fit(model=model, datamodule=datamodule)
    maps, _ = _predict(model, ctx.test_images, ctx.size)
    return maps, recorder.losses, {"feature_cache": cache.stats(), "epochs": epochs}


def _rows(ctx: RunContext) -> int:
    """Training rows: the shots cycled to a whole number of batches (one batch per epoch when k <= batch)."""
    batch = ctx.budget.batch_size
    return batch * math.ceil(len(ctx.shot_paths) / batch)


@register_protocol
class SupersimplenetProtocol(Protocol):
    """SuperSimpleNet supervised on each synthesizer's anomalies, against stock unsupervised (``ssn-default``)."""

    name = "supersimplenet"
    budget = Budget(steps=40, batch_size=2, lr=0.0, anomaly_ratio=0.5, image_size=256)
    controls = ("control-shot-diff", "control-patchcore", "ssn-default")
    needs_backbone = True
    description = "SuperSimpleNet supervised on the shots + each synthesizer's anomalies (ssn-default: unsupervised)"

    def train(self, method: str, ctx: RunContext) -> Outcome:
        from anomalib.models import Supersimplenet
        from lightning.pytorch import seed_everything

        from ..data import SyntheticAnomalyDataModule

        seed_everything(ctx.seed, workers=True, verbose=False)
        supervised = method != "ssn-default"
        model = Supersimplenet(backbone=ctx.config.backbone, layers=ctx.config.layers_for("supersimplenet"), supervised=supervised,
                               pre_processor=Supersimplenet.configure_pre_processor(image_size=ctx.size))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            datamodule = shots_datamodule(ctx.shot_paths, 1, ctx.budget.batch_size, length=_rows(ctx))
            if supervised:
                datamodule = SyntheticAnomalyDataModule(
                    datamodule, make_synthesizer(method, ctx.texture_dir, ctx.test_paths), anomaly_ratio=ctx.budget.anomaly_ratio,
                    synthetic_val=False, cache_dir=str(Path(tmp) / "cache"), seed=ctx.seed, image_size=ctx.size,
                )  # fmt: skip
            maps, losses, info = _train(model, ctx, datamodule, [], Path(tmp))
        return Outcome(maps, losses, info=info)

    def budget_text(self, budget: Budget) -> str:
        return (f"{budget.steps} batches of {budget.batch_size} (SuperSimpleNet's own AdamW and schedule), anomaly "
                f"ratio {budget.anomaly_ratio} (plus its own feature-space anomalies)")  # fmt: skip


@register_protocol
class GlassProtocol(Protocol):
    """GLASS with its image-level augmentor swapped for each synthesizer; ``anomalib-perlin`` is stock GLASS."""

    name = "glass"
    budget = Budget(steps=24, batch_size=2, lr=1e-4, anomaly_ratio=1.0, image_size=256)
    needs_backbone = True
    description = "GLASS with its augmentor swapped for each synthesizer (anomalib-perlin: stock GLASS)"

    def train(self, method: str, ctx: RunContext) -> Outcome:
        from anomalib.models import Glass
        from lightning.pytorch import seed_everything

        from ..data import SynthesizerSwap

        seed_everything(ctx.seed, workers=True, verbose=False)
        stock = method == "anomalib-perlin"
        model = Glass(input_shape=ctx.size, backbone=ctx.config.backbone, layers=ctx.config.layers_for("glass"),
                      pre_trained=True, learning_rate=ctx.budget.lr,
                      anomaly_source_path=ctx.texture_dir if stock else None,
                      pre_processor=Glass.configure_pre_processor(image_size=ctx.size), **GLASS_ARGS)  # fmt: skip
        callbacks = []
        if not stock:  # GLASS calls its augmentor on every image: probability 1 keeps its contract
            synth = make_synthesizer(method, ctx.texture_dir, ctx.test_paths)
            callbacks.append(SynthesizerSwap(synth, probability=ctx.budget.anomaly_ratio, seed=ctx.seed))
        with tempfile.TemporaryDirectory() as tmp:
            datamodule = shots_datamodule(ctx.shot_paths, 1, ctx.budget.batch_size, length=_rows(ctx))
            maps, losses, info = _train(model, ctx, datamodule, callbacks, Path(tmp))
        return Outcome(maps, losses, info=info)

    def budget_text(self, budget: Budget) -> str:
        dims = GLASS_ARGS["target_embed_dim"]
        return (f"{budget.steps} batches of {budget.batch_size} (GLASS's own optimisers, lr {budget.lr}, embedding "
                f"{dims}), every image made anomalous (probability {budget.anomaly_ratio})")  # fmt: skip
