"""The one-shot protocols of the models that learn from synthetic anomalies (:mod:`anomalib_synth.models`).

- ``refiner``: :class:`~anomalib_synth.models.patchcore_refiner.torch_model.PatchcoreRefinerModel`, PatchCore on
  the shots plus a head trained on each synthesizer's anomalies of augmented views of the shots. Which training step
  to keep (0 = plain PatchCore, as the head starts at zero) is chosen on the synthetic validation split.
- ``segmenter``: the class-agnostic one-prompt segmenter, pretrained once per evaluated category on change pairs of
  normal images that leave that category out by name (every data root it reads), with the shot as its prompt.
- ``fusion``: PatchCore's map and the segmenter's, each standardised against augmented normal views of the shot,
  mixed with the weight (from a grid holding 0 and 1) that gives the best pixel AP on the synthetic validation split.

Every choice reads the synthetic validation split of :mod:`.selection`, never the test set. Each run also records
every candidate's pixel AP on the split and on the real test set (``info["candidates"]``), only to measure how well
the split ranks (:func:`.selection.ranking_quality`, reported per category).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..seeding import generator_for
from ..views import augmented_views
from .base import SHARED_CONTROLS, Budget, Outcome, Protocol, RunContext, register_protocol
from .detectors import _predict, fit_patchcore
from .protocols import make_synthesizer
from .selection import DEFAULT_DESIGN, DESIGNS, choose, pixel_ap, synthetic_split

__all__ = ["FUSION_WEIGHTS", "PRETRAIN_SYNTHESIZERS", "needs_segmenter", "pretrain_segmenter", "segmenter_folder"]

FUSION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Weights of the segmenter's map in the fusion (0: PatchCore alone, 1: the segmenter alone)."""

PRETRAIN_SYNTHESIZERS = "perlin+cutpaste+nsa+scar"
"""The anomalies of the segmenter's change pairs (a per-sample mix)."""

NORMALISING_VIEWS = 8
"""Augmented normal views of the shots whose map statistics standardise a map before fusion."""


def _validation_sets(ctx: RunContext) -> dict[str, tuple[Tensor, Tensor]]:
    """Every synthetic validation design's split of this run (the first is the one choices read)."""
    names = [DEFAULT_DESIGN, *(n for n in DESIGNS if n != DEFAULT_DESIGN)]
    return {n: synthetic_split(ctx.shots, DESIGNS[n], ctx.seed, ctx.texture_dir, ctx.test_paths) for n in names}


def _record(candidates: dict[str, dict[str, Tensor]], splits: dict[str, tuple[Tensor, Tensor]],
            ctx: RunContext) -> dict[str, dict[str, float]]:  # fmt: skip
    """``{candidate: {"val:<design>": AP, ..., "test": AP}}`` from each candidate's maps of every split and the test
    set (``candidates[name]["test"]``, ``candidates[name][design]``)."""
    out = {}
    for name, maps in candidates.items():
        row = {f"val:{design}": pixel_ap(maps[design], masks) for design, (_, masks) in splits.items()}
        row["test"] = pixel_ap(maps["test"], ctx.test_masks)
        out[name] = row
    return out


def _chosen(record: dict[str, dict[str, float]]) -> str:
    """The candidate the default design prefers (ties: the first candidate, the plainest)."""
    return choose({name: row[f"val:{DEFAULT_DESIGN}"] for name, row in record.items()})


# --- refiner -------------------------------------------------------------------------------------------------------
@register_protocol
class RefinerProtocol(Protocol):
    """PatchCore refined by a head trained on each synthesizer's anomalies; the step kept is chosen on synthetic
    validation (step 0 is plain PatchCore)."""

    name = "refiner"
    budget = Budget(steps=80, batch_size=4, lr=2e-3, anomaly_ratio=0.75, image_size=256)
    needs_backbone = True
    description = ("PatchCore + a head trained on each synthesizer's anomalies of views of the shot (step chosen on "
                   "synthetic validation; step 0 = PatchCore)")  # fmt: skip

    def train(self, method: str, ctx: RunContext) -> Outcome:
        from ..models.patchcore_refiner.torch_model import PatchcoreRefinerModel
        from ..models.patchcore_refiner.training import train_refiner

        torch.manual_seed(ctx.seed)
        model = PatchcoreRefinerModel(backbone=ctx.config.backbone, layers=ctx.config.layers_for("patchcore"))
        model.fit(ctx.shots, generator_for(ctx.seed, "train", 1))
        untrained = {k: v.clone() for k, v in model.head.state_dict().items()}
        steps = ctx.budget.steps
        checkpoints = sorted({steps // 3, 2 * steps // 3} - {0})
        synth = make_synthesizer(method, ctx.texture_dir, ctx.test_paths)
        losses, snapshots = train_refiner(
            model, ctx.shots, synth, steps=steps, batch_size=ctx.budget.batch_size, lr=ctx.budget.lr,
            anomaly_ratio=ctx.budget.anomaly_ratio, generator=generator_for(ctx.seed, "train", 2),
            checkpoints=checkpoints,
        )  # fmt: skip
        states = {"step0": untrained, **{f"step{s}": snapshots[s] for s in checkpoints},
                  f"step{steps}": {k: v.clone() for k, v in model.head.state_dict().items()}}  # fmt: skip
        splits = _validation_sets(ctx)
        model.eval()
        images = {**{design: images for design, (images, _) in splits.items()}, "test": ctx.test_images}
        inputs = {name: _batched(model._inputs, batch) for name, batch in images.items()}  # shared by every step
        candidates = {}
        with torch.no_grad():
            for name, state in states.items():
                model.head.load_state_dict(state)
                candidates[name] = {split: model.maps_from(x)[0] for split, x in inputs.items()}
        record = _record(candidates, splits, ctx)
        chosen = _chosen(record)
        return Outcome(candidates[chosen]["test"], losses,
                       info={"chosen": chosen, "candidates": record, "design": DEFAULT_DESIGN})  # fmt: skip

    def budget_text(self, budget: Budget) -> str:
        return (f"{budget.steps} steps of {budget.batch_size} augmented views of the shot (anomaly ratio "
                f"{budget.anomaly_ratio}, lr {budget.lr}); the step kept (0, 1/3, 2/3, all) is chosen on synthetic "
                f"validation ({DEFAULT_DESIGN})")  # fmt: skip


def _batched(function, images: Tensor, batch_size: int = 16) -> dict[str, Tensor]:
    """``function`` (images -> dict of tensors) over batches of ``images``, concatenated."""
    parts = [function(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


# --- segmenter -----------------------------------------------------------------------------------------------------
def segmenter_settings(config: Any, budget: Budget) -> dict[str, Any]:
    """What defines a pretrained segmenter of this evaluation (its folder name hashes it)."""
    return {"steps": budget.steps, "batch_size": budget.batch_size, "lr": budget.lr,
            "image_size": budget.image_size or 256, "synthesizers": PRETRAIN_SYNTHESIZERS,
            "anomaly_ratio": budget.anomaly_ratio, "texture_dir": config.texture_dir,
            "backbone": config.backbone, "layers": config.layers_for("patchcore"), "seed": 0}  # fmt: skip


def segmenter_folder(config: Any, budget: Budget, category: str) -> Path:
    """The pretrained segmenter that leaves ``category`` out (by its last path part, e.g. ``bottle``)."""
    name = Path(category).name
    digest = hashlib.sha1(json.dumps(segmenter_settings(config, budget), sort_keys=True).encode()).hexdigest()[:10]
    return Path(config.segmenter_dir) / f"exclude-{name}-{digest}"


def pretrain_segmenter(config: Any, budget: Budget, category: str, progress: bool = False) -> Path:
    """Pretrain (or finish, or reuse) the segmenter that leaves ``category`` out, on every normal image of the
    evaluation's data root and scikit-image's photos (:func:`~anomalib_synth.models.one_prompt_segmenter.pairs.
    pair_sources`)."""
    from ..models.one_prompt_segmenter.pretrain import pretrain_segmenter as pretrain

    settings = segmenter_settings(config, budget)
    folder = segmenter_folder(config, budget, category)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder  # written last and atomically: a finished pretraining
    pretrain(
        [config.data_root], [Path(category).name], folder, steps=settings["steps"],
        batch_size=settings["batch_size"], image_size=settings["image_size"], seed=settings["seed"],
        texture_dir=settings["texture_dir"], synthesizers=settings["synthesizers"],
        anomaly_ratio=budget.anomaly_ratio, lr=settings["lr"],
        model_args={"backbone": settings["backbone"], "layers": settings["layers"]}, progress=progress, threads=1,
    )  # fmt: skip
    return folder


def _segmenter(ctx: RunContext):
    from ..models.one_prompt_segmenter.pairs import check_segmenter_leakage
    from ..models.one_prompt_segmenter.torch_model import OnePromptSegmenterModel

    folder = segmenter_folder(ctx.config, ctx.config.budget("segmenter"), ctx.category)
    check_segmenter_leakage(folder, Path(ctx.category).name, ctx.test_paths)
    model = OnePromptSegmenterModel.from_pretrained(folder).eval()
    return model


def _segment(model: torch.nn.Module, images: Tensor, prompts: Tensor, batch_size: int = 8) -> Tensor:
    with torch.no_grad():
        return torch.cat([torch.sigmoid(model.segment(images[i : i + batch_size], prompts))[:, 0]
                          for i in range(0, len(images), batch_size)])  # fmt: skip


@register_protocol
class SegmenterProtocol(Protocol):
    """The one-prompt segmenter, pretrained without the evaluated category; the shot is its prompt."""

    name = "segmenter"
    budget = Budget(steps=600, batch_size=8, lr=1e-3, anomaly_ratio=0.75, image_size=256)
    needs_backbone = True
    needs_segmenter = True
    description = "one-prompt segmenter pretrained on change pairs of other categories; the shot is the prompt"

    def methods(self, synthesizers: list[str]) -> list[str]:
        return [*self.controls, "segmenter"]

    def train(self, method: str, ctx: RunContext) -> Outcome:
        model = _segmenter(ctx)
        return Outcome(_segment(model, ctx.test_images, ctx.shots), info={"pretrained": PRETRAIN_SYNTHESIZERS})

    def budget_text(self, budget: Budget) -> str:
        return (f"pretrained once per evaluated category, leaving it out: {budget.steps} steps of "
                f"{budget.batch_size} change pairs ({PRETRAIN_SYNTHESIZERS} on views of normal images, anomaly ratio "
                f"{budget.anomaly_ratio}); no training on the shot")  # fmt: skip


# --- fusion --------------------------------------------------------------------------------------------------------
def standardise(maps: Tensor, normal_maps: Tensor) -> Tensor:
    """``(maps - mean) / std`` with the statistics of a map's values on normal views."""
    return (maps - normal_maps.mean()) / normal_maps.std().clamp_min(1e-6)


@register_protocol
class FusionProtocol(Protocol):
    """PatchCore and the segmenter, standardised on normal views of the shot, mixed with the weight chosen on
    synthetic validation; also PatchCore with its layers chosen on synthetic validation (``patchcore-val-layers``)."""

    name = "fusion"
    budget = Budget(steps=0, batch_size=8, lr=0.0, anomaly_ratio=1.0, image_size=256)
    needs_backbone = True
    needs_segmenter = True
    layer_candidates = (("blocks.1", "blocks.2"), ("blocks.2", "blocks.4"), ("blocks.1",), ("blocks.2",),
                        ("blocks.1", "blocks.2", "blocks.4"))  # fmt: skip
    description = ("PatchCore + segmenter, weight chosen on synthetic validation; patchcore-val-layers: PatchCore's "
                   "layers chosen on synthetic validation")  # fmt: skip

    def methods(self, synthesizers: list[str]) -> list[str]:
        return [*SHARED_CONTROLS, "fusion", "patchcore-val-layers"]

    def _patchcore(self, ctx: RunContext, layers: tuple[str, ...], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        model = fit_patchcore(replace(ctx, config=replace(ctx.config, layers=list(layers))))
        return {name: _predict(model, images, ctx.size)[0] for name, images in inputs.items()}

    def train(self, method: str, ctx: RunContext) -> Outcome:
        splits = _validation_sets(ctx)
        normal_views, _ = augmented_views(ctx.shots, NORMALISING_VIEWS, generator_for(ctx.seed, "val", 2))
        inputs = {**{d: images for d, (images, _) in splits.items()}, "test": ctx.test_images, "normal": normal_views}
        if method == "patchcore-val-layers":
            candidates = {"+".join(layers): self._patchcore(ctx, layers, inputs) for layers in self.layer_candidates}
        else:
            patchcore = self._patchcore(ctx, tuple(ctx.config.layers_for("patchcore")), inputs)
            model = _segmenter(ctx)
            segmenter = {name: _segment(model, images, ctx.shots) for name, images in inputs.items()}
            candidates = {}
            for weight in FUSION_WEIGHTS:
                candidates[f"w{weight:g}"] = {
                    name: (1 - weight) * standardise(patchcore[name], patchcore["normal"])
                    + weight * standardise(segmenter[name], segmenter["normal"])
                    for name in inputs
                }
        record = _record(candidates, splits, ctx)
        chosen = _chosen(record)
        return Outcome(candidates[chosen]["test"],
                       info={"chosen": chosen, "candidates": record, "design": DEFAULT_DESIGN})  # fmt: skip

    def budget_text(self, budget: Budget) -> str:
        return (f"no training; fusion weight from {FUSION_WEIGHTS} (PatchCore ... segmenter) and PatchCore's layers "
                f"from {len(self.layer_candidates)} sets, each chosen by pixel AP on synthetic validation "
                f"({DEFAULT_DESIGN})")  # fmt: skip


def needs_segmenter(protocols: list[str]) -> bool:
    """Whether any of ``protocols`` reads a pretrained segmenter."""
    from .base import get_protocol

    return any(get_protocol(p).needs_segmenter for p in protocols)
