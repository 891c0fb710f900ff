"""Lightning module of AnomalyControl's SGA training (Sec. 3.5 of He et al., arXiv 2412.06510).

Only the SGA is trained (BLIP projection, image projection, new K/V), with AdamW (official: lr 1e-4, weight decay
1e-2). The CSM features of the references (with ASEA) come from the frozen BLIP-2 and are computed once per
reference image and cached for the run (the official code caches them to ``blip_cache/``). The data
(``ReferencePairs``) and the run (``train_control``) are in :mod:`anomalib_synth.training.control`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..lightning_module import AdapterModule
from ..loading import SD15_INPAINTING
from .modules import BLIP2_ITM
from .torch_model import AnomalyControlModel

__all__ = ["ControlTraining"]


class ControlTraining(AdapterModule):
    """LightningModule around :class:`AnomalyControlModel`: AdamW on the SGA, adapter-only checkpoints.

    Batches are ``ReferencePairs`` items collated: ``image``, ``mask``, ``caption`` of the targets and ``ref_image``,
    ``ref_mask``, ``ref_caption``, ``ref_key`` (names the reference image, for the feature cache) of their references.
    """

    def __init__(self, base_model: str = SD15_INPAINTING, vlm: str = BLIP2_ITM, num_tokens: int = 4,
                 image_embed_dim: int = 1024, lr: float = 1e-4, weight_decay: float = 1e-2, asea_steps: int = 5,
                 init_adapter: str | None = None, local_files_only: bool | None = None) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.model = AnomalyControlModel(base_model, vlm, num_tokens=num_tokens, image_embed_dim=image_embed_dim,
                                         asea_steps=asea_steps, init_adapter=init_adapter,
                                         local_files_only=local_files_only)  # fmt: skip
        self.feature_cache: dict[str, torch.Tensor] = {}
        """CSM (+ ASEA) feature of each reference image, computed at its first use (``ref_key`` -> ``[d]``)."""

    def reference_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's reference features, from the cache; the missing ones are computed (once) and kept."""
        keys = batch["ref_key"]
        todo = [i for i, key in enumerate(keys) if key not in self.feature_cache]
        todo = [i for n, i in enumerate(todo) if keys[i] not in {keys[j] for j in todo[:n]}]  # once per key
        if todo:
            features = self.model.reference_features(batch["ref_image"][todo], [batch["ref_caption"][i] for i in todo],
                                                     batch["ref_mask"][todo])  # fmt: skip
            for i, feature in zip(todo, features, strict=True):
                self.feature_cache[keys[i]] = feature.detach().cpu()
        return torch.stack([self.feature_cache[key] for key in keys]).to(batch["image"].device)

    def training_step(self, batch: dict[str, Any], _batch_idx: int) -> torch.Tensor:
        features = self.reference_features(batch)
        loss = self.model.training_loss(batch["image"], batch["mask"], batch["caption"], features)
        self.log("loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def on_train_epoch_start(self) -> None:
        """New references each epoch: the dataset's ``set_epoch`` (``ReferencePairs``), when it has one."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)
