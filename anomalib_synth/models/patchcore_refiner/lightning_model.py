"""anomalib model of the PatchCore refiner: one epoch over the normal images, then PatchCore plus a head trained on
synthetic anomalies made from them.

The refiner follows PatchCore (Roth et al., CVPR 2022, Sec. 3), PCSNet (Jiang et al., TNNLS 2024,
``yuxin-jiang/PCSNet``) and PNI (Bae et al., ICCV 2023, its anomaly-map refinement network); :mod:`.torch_model`
says what it takes from each and where it departs.

Like anomalib's ``Patchcore``, it runs one epoch that only collects the training (normal) images; at the epoch's end
:meth:`PatchcoreRefiner.fit` builds the memory bank from them (every patch, no coreset), measures the normalisation
on augmented views of them, and trains the head on its own synthetic pairs (:func:`.training.train_refiner`). It
therefore needs plain normal training data (``configs/data/mvtec.yaml``, ``folder.yaml``), not the
``SyntheticAnomalyDataModule`` wrapper, which would put anomalies into the memory bank.

Its pre-processor only resizes: the model takes images in ``[0, 1]`` (the synthesizers need them so) and applies the
ImageNet normalisation itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule, MemoryBankMixin
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn

from ..components import OneEpochOneClassMixin
from ...seeding import generator_for
from ...synthesizers import Synthesizer
from ...synthesizers.mix import build
from .torch_model import PatchcoreRefinerModel
from .training import DEFAULTS, train_refiner

__all__ = ["PatchcoreRefiner"]

logger = logging.getLogger(__name__)


class PatchcoreRefiner(MemoryBankMixin, OneEpochOneClassMixin, AnomalibModule):
    """PatchCore on the normal training images, refined by a head trained per category on synthetic anomalies.

    Args:
        backbone (str, optional): timm backbone. Defaults to ``"efficientnet_lite0.local"`` (ImageNet weights from a
            local file; the plugin registers it).
        layers (Sequence[str], optional): backbone layers. Defaults to ``("blocks.1", "blocks.2")``.
        pre_trained (bool, optional): ImageNet weights. Defaults to ``True``.
        synthesizer (str | Synthesizer, optional): the training anomalies: a registered name, ``a+b`` for a
            per-sample mix, or an instance. Defaults to ``"nsa+cutpaste"``.
        texture_dir (str | None, optional): anomaly-source folder for the synthesizers that take one (e.g. a DTD
            folder for ``perlin``). Defaults to ``None``.
        steps (int, optional): training steps of the head. Defaults to ``80``.
        batch_size (int, optional): augmented views per step. Defaults to ``4``.
        lr (float, optional): Adam learning rate of the head. Defaults to ``2e-3``.
        anomaly_ratio (float, optional): fraction of the views made anomalous. Defaults to ``0.75``.
        n_views (int, optional): augmented views that measure the normalisation. Defaults to ``16``.
        use_query_features (bool, optional): also give the head the query features. Defaults to ``False``.
        seed (int, optional): seed of the head's initialisation, the views and the anomalies. Defaults to ``0``.
        pre_processor (nn.Module | bool, optional): defaults to a resize to 256 px (no normalisation).
        post_processor (nn.Module | bool, optional): defaults to anomalib's one-class ``PostProcessor``.
        evaluator (Evaluator | bool, optional): anomalib's evaluator. Defaults to ``True``.
        visualizer (Visualizer | bool, optional): anomalib's visualizer. Defaults to ``True``.

    Example:
        >>> from anomalib.engine import Engine                                   # doctest: +SKIP
        >>> from anomalib_synth.models import PatchcoreRefiner                   # doctest: +SKIP
        >>> Engine().train(PatchcoreRefiner(), datamodule=MVTecAD(category="bottle"))   # doctest: +SKIP

    Notes:
        The memory bank holds every patch of every training image, and the head trains on views of them: it is
        meant for few shots (training a head on a full training set works but is slower than ``steps`` suggests
        only because the nearest-neighbour search grows with the bank).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0.local",
        layers: Sequence[str] = ("blocks.1", "blocks.2"),
        pre_trained: bool = True,
        synthesizer: str | Synthesizer = "nsa+cutpaste",
        texture_dir: str | None = None,
        steps: int = DEFAULTS["steps"],
        batch_size: int = DEFAULTS["batch_size"],
        lr: float = DEFAULTS["lr"],
        anomaly_ratio: float = DEFAULTS["anomaly_ratio"],
        n_views: int = 16,
        use_query_features: bool = False,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Any = True,  # noqa: ANN401 (anomalib's Evaluator | bool)
        visualizer: Any = True,  # noqa: ANN401 (anomalib's Visualizer | bool)
    ) -> None:
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)  # fmt: skip
        self.model: PatchcoreRefinerModel = PatchcoreRefinerModel(
            backbone=backbone, layers=layers, pre_trained=pre_trained, use_query_features=use_query_features, seed=seed
        )
        # kept out of the module tree: a synthesizer is no part of the trained model (nor of its checkpoint)
        self._synthesizer: list[str | Synthesizer] = [synthesizer]
        self.texture_dir = texture_dir
        self.train_args = {"steps": steps, "batch_size": batch_size, "lr": lr, "anomaly_ratio": anomaly_ratio}
        self.n_views = n_views
        self.seed = seed
        self._images: list[Tensor] = []
        self.losses: list[float] = []



    @property
    def synthesizer(self) -> Synthesizer:
        """The training synthesizer (built from its name on first use)."""
        spec = self._synthesizer[0]
        if isinstance(spec, str):
            self._synthesizer[0] = spec = build(spec, self.texture_dir)
        return spec

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Collect the batch's (normal) images; returns a dummy loss, as anomalib's ``Patchcore`` does."""
        del args, kwargs
        self._images.append(batch.image.detach().cpu())
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    def fit(self) -> None:
        """Memory bank and normalisation from the collected images, then the head on synthetic anomalies of them."""
        if not self._images:
            msg = "PatchcoreRefiner.fit: no training images were collected (is the training set empty?)"
            raise RuntimeError(msg)
        shots = torch.cat(self._images).to(self.device)
        self._images.clear()
        generator = generator_for(self.seed, "train")
        logger.info("PatchcoreRefiner: memory bank of %d images, then %d head steps", len(shots),
                    self.train_args["steps"])  # fmt: skip
        with torch.inference_mode(False), torch.enable_grad():
            shots = shots.clone()  # a normal tensor even if the images were made under inference mode
            self.model.fit(shots, generator, n_views=self.n_views)
            self.losses, _ = train_refiner(self.model, shots, self.synthesizer, generator=generator,
                                           **self.train_args)  # fmt: skip

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Refined map and score of the batch."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())


