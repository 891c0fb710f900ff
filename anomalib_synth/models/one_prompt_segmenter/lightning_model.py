"""The one-prompt segmenter as an anomalib model: the training images become the prompts, nothing is optimised.

After MetaUAS (Gao, "MetaUAS: Universal Anomaly Segmentation with One-Prompt Meta-Learning", NeurIPS 2024): the
segmenter is trained once, beforehand, on synthetic change pairs (``anomalib-synth pretrain-segmenter``, see
:mod:`.pretrain`), and is then used on a new category with no further training: its normal image(s) are the prompt.
In anomalib terms that is a one-class model that, like PatchCore, only *stores* its training images (one epoch, no
optimiser), and compares every validation/test image with them.

Departures from MetaUAS are listed in :mod:`.torch_model` (backbone, alignment, decoder) and :mod:`.pairs`
(training pairs). Here: with more than one training image, every query attends over the positions of all stored
prompts together (MetaUAS averages per-prompt alignments); at most ``max_prompts`` are kept (evenly spaced in the
order they were seen), because the cost grows linearly with them.

Example:
    >>> from anomalib.engine import Engine                                    # doctest: +SKIP
    >>> model = OnePromptSegmenter(pretrained="runs/exclude_bottle")          # doctest: +SKIP
    >>> Engine().fit(model, datamodule=one_shot_bottle)                       # doctest: +SKIP

Command line: ``anomalib-synth train --model anomalib_synth.models.OnePromptSegmenter --model.pretrained DIR
--data ...`` or ``--model configs/model/one_prompt_segmenter.yaml``.

Leakage: the folder's ``config.json`` records the images the segmenter was pretrained on;
:func:`~.pairs.check_segmenter_leakage` (``check_segmenter_leakage(model, category, test_paths)``) refuses a
segmenter that saw the evaluated category or a test image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.models.components.base import DynamicBufferMixin
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import Tensor, nn

from ..components import OneEpochOneClassMixin
from .torch_model import OnePromptSegmenterModel

__all__ = ["OnePromptSegmenter"]

DEFAULT_BACKBONE = "efficientnet_lite0.local"
DEFAULT_LAYERS = ("blocks.1", "blocks.2")


class PromptStore(DynamicBufferMixin, nn.Module):
    """The stored prompt images ``[k, 3, H, W]`` in ``[0, 1]``, a buffer (saved in Lightning checkpoints, resized on
    load)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("images", torch.empty(0, 3, 1, 1))


class OnePromptSegmenter(OneEpochOneClassMixin, AnomalibModule):
    """One-prompt anomaly segmentation with a segmenter pretrained on other categories.

    Args:
        pretrained (str | None): folder written by ``anomalib-synth pretrain-segmenter`` (or
            ``OnePromptSegmenterModel.save_pretrained``). ``None``: an untrained segmenter (for wiring tests only).
            Defaults to ``None``.
        backbone (str | None): timm backbone; with ``pretrained``, must match the folder's (``None``: the folder's,
            else ``"efficientnet_lite0.local"``). Defaults to ``None``.
        layers (Sequence[str] | None): two feature layers, as ``backbone``. Defaults to ``None``
            (``("blocks.1", "blocks.2")``).
        pre_trained (bool): ImageNet weights for the backbone of an untrained segmenter. Defaults to ``True``.
        score (str): image score: ``"top1"`` (mean of the top 1 % of the map) or ``"max"``. Defaults to ``"top1"``.
        max_prompts (int): most training images kept as prompts. Defaults to ``8``.
        pre_processor (PreProcessor | bool): Defaults to ``True`` (resize to 256 only: the model normalises).
        post_processor (PostProcessor | bool): Defaults to ``True``.
        evaluator (Evaluator | bool): Defaults to ``True``.
        visualizer (Visualizer | bool): Defaults to ``True``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        backbone: str | None = None,
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        score: str = "top1",
        max_prompts: int = 8,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)  # fmt: skip
        if int(max_prompts) < 1:
            msg = f"max_prompts must be a positive integer, got {max_prompts}"
            raise ValueError(msg)
        self.max_prompts = int(max_prompts)
        if pretrained:
            self.model = OnePromptSegmenterModel.from_pretrained(pretrained, score=score)
            saved = self.model.config
            for name, given in (("backbone", backbone), ("layers", layers)):
                if given is not None and (list(given) if name == "layers" else given) != saved[name]:
                    msg = f"{name}={given!r} differs from the pretrained segmenter's {saved[name]!r} ({pretrained})"
                    raise ValueError(msg)
        else:
            self.model = OnePromptSegmenterModel(backbone=backbone or DEFAULT_BACKBONE,
                                                 layers=tuple(layers or DEFAULT_LAYERS), pre_trained=pre_trained,
                                                 score=score)  # fmt: skip
        self.prompts = PromptStore()
        self._seen: list[Tensor] = []
        self._prompts_set = False



    def training_step(self, batch: Batch, *args, **kwargs) -> Tensor:
        """Store the batch's (normal) images as prompts."""
        del args, kwargs
        self._seen.append(batch.image.detach())
        self._prompts_set = False
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    def _store_seen(self) -> None:
        """The images of the training steps so far become the prompts (at most ``max_prompts``, evenly spaced in
        the order seen). Lightning validates before ``on_train_epoch_end``, so this runs on the first validation or
        test step as well."""
        if not self._seen:
            return
        images = torch.cat(self._seen)
        if len(images) > self.max_prompts:
            images = images[torch.linspace(0, len(images) - 1, self.max_prompts).round().long()]
        self.prompts.images = images.to(self.device)
        self._seen = []
        self._prompts_set = False

    def on_train_epoch_end(self) -> None:
        self._store_seen()

    def _ensure_prompts(self) -> None:
        self._store_seen()
        if self._prompts_set:
            return
        if len(self.prompts.images) == 0:
            msg = "OnePromptSegmenter has no prompts: fit it on normal images first (Engine().fit)"
            raise RuntimeError(msg)
        self.model.set_prompts(self.prompts.images.to(self.device))
        self._prompts_set = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._prompts_set = False

    def validation_step(self, batch: Batch, *args, **kwargs) -> Batch:
        """Fill the batch's ``anomaly_map`` (probabilities ``[B, 1, H, W]``) and ``pred_score``."""
        del args, kwargs
        self._ensure_prompts()
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def test_step(self, batch: Batch, *args, **kwargs) -> Batch:
        return self.validation_step(batch, *args, **kwargs)

    def predict_step(self, batch: Batch, *args, **kwargs) -> Batch:
        return self.validation_step(batch, *args, **kwargs)


