"""The protocol interface of the evaluation harness: a protocol class (name, default budget, its controls, ``run``)
and a registry.

A protocol turns k normal shots (+ a synthesizer, or a control) into anomaly maps of the real test images, and
optionally extra metrics (e.g. the image F1 at a threshold). The runner plans ``protocol.methods(synthesizers)`` for
each category and seed, hands each to :meth:`Protocol.run` with a :class:`RunContext`, and scores the maps.

Two controls are the same in every protocol and run here: ``control-shot-diff`` (blurred absolute difference to the
nearest shot) and ``control-patchcore`` (anomalib's PatchCore with the shots as memory bank, on the run's offline
ImageNet backbone, no synthetic anomalies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

SHARED_CONTROLS = ("control-shot-diff", "control-patchcore")
CONTROLS = ("control-untrained", "control-shot-diff", "control-patchcore", "threshold-default", "threshold-views",
            "threshold-oracle", "ssn-default")  # fmt: skip
"""Every row that is not trained on a synthesizer's anomalies (the report lists them first, hatched)."""

BASELINE = "anomalib-perlin"
"""anomalib's own generator: a reference row too (the question is whether *our* synthesizers beat anomalib's)."""


@dataclass
class Budget:
    """Training budget, the same for every synthesizer of a protocol.

    ``image_size`` (``None``: the protocol's default, unless the evaluation sets one) and ``val_images`` (normal
    images of the synthetic validation split that sets thresholds) complete it.
    """

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    anomaly_ratio: float = 0.5
    image_size: int | None = None
    val_images: int = 8
    accelerator: str = "cpu"  # Lightning's accelerator for the anomalib detectors ("auto", "gpu", ...)


@dataclass
class RunContext:
    """What a protocol gets for one (category, method, seed) run."""

    config: Any  # EvalConfig
    category: str
    seed: int
    budget: Budget
    size: tuple[int, int]
    shot_paths: list[Path]
    shots: Tensor  # [k, 3, H, W] in [0, 1]
    test_images: Tensor  # [N, 3, H, W]
    test_masks: Tensor  # bool [N, H, W]
    test_labels: Tensor  # bool [N]
    val_paths: list[Path] = field(default_factory=list)  # extra normal images (not shots, not test): opt-in only
    test_paths: list[Path] = field(default_factory=list)  # the test images' files (for the leakage check)

    def __post_init__(self) -> None:
        check_disjoint(self.test_paths, shots=self.shot_paths, validation=self.val_paths)

    @property
    def texture_dir(self) -> str | None:
        return self.config.texture_dir


@dataclass
class Outcome:
    """A run's result: ``maps`` ``[N, H, W]`` of the test images (``None`` for a row that only sets a threshold),
    training losses, extra metrics (e.g. ``image_F1``) and anything worth recording (``info``)."""

    maps: Tensor | None
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Protocol:
    """One evaluation protocol. Subclasses set the class attributes and implement :meth:`train`.

    Attributes:
        name: registry name (``--protocol``).
        budget: default budget (``--budget NAME:KEY=VALUE`` overrides a field).
        controls: rows run besides the synthesizers (shared ones are :data:`SHARED_CONTROLS`).
        accepts_none: whether the synthesizer name ``none`` makes a row (train without synthesis).
        verdict_metric: the metric the report's verdict compares.
        needs_backbone: whether it builds anomalib models on the evaluation's pretrained backbone.
        needs_segmenter: whether it reads the one-prompt segmenters, pretrained before the runs.
    """

    name: ClassVar[str]
    budget: ClassVar[Budget] = Budget()
    controls: ClassVar[tuple[str, ...]] = SHARED_CONTROLS
    accepts_none: ClassVar[bool] = False
    verdict_metric: ClassVar[str] = "pixel_AP"
    needs_backbone: ClassVar[bool] = False
    needs_segmenter: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def methods(self, synthesizers: list[str]) -> list[str]:
        """The rows of this protocol: its controls, then the synthesizers it runs."""
        return [*self.controls, *(s for s in synthesizers if s != "none" or self.accepts_none)]

    def run(self, method: str, ctx: RunContext) -> Outcome:
        """Run one row: the shared controls here, everything else in :meth:`train`."""
        if method == "control-shot-diff":
            from .protocols import shot_difference

            return Outcome(shot_difference(ctx.shots, ctx.test_images))
        if method == "control-patchcore":
            from .detectors import patchcore_maps

            maps, _ = patchcore_maps(ctx)
            return Outcome(maps)
        return self.train(method, ctx)

    def train(self, method: str, ctx: RunContext) -> Outcome:
        raise NotImplementedError

    def budget_text(self, budget: Budget) -> str:
        """How the report states the budget."""
        return f"at most {budget.steps} steps, batch {budget.batch_size}, anomaly ratio {budget.anomaly_ratio}"


def check_disjoint(test_paths: list, **others: list) -> None:
    """Refuse a run whose shots or validation images include a test image (by resolved path): ``LeakageError``."""
    from ..training.leakage import LeakageError

    test = {Path(p).resolve() for p in test_paths}
    for what, paths in others.items():
        shared = sorted(str(p) for p in paths if Path(p).resolve() in test)
        if shared:
            msg = f"{len(shared)} {what} image(s) are test images, e.g. {shared[0]}: a run must not see its test set"
            raise LeakageError(msg)


REGISTRY: dict[str, Protocol] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    """Class decorator: add an instance of ``cls`` to :data:`REGISTRY` under ``cls.name``."""
    REGISTRY[cls.name] = cls()
    return cls


def get_protocol(name: str) -> Protocol:
    try:
        return REGISTRY[name]
    except KeyError:
        msg = f"unknown protocol {name!r}; choose from {tuple(REGISTRY)}"
        raise ValueError(msg) from None
