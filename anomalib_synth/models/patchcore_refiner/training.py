"""Training loop of the PatchCore refiner: plain torch, per category, on synthetic anomalies of augmented views.

Each step draws ``batch_size`` augmented views of the shots (:func:`~anomalib_synth.views.augmented_views`; never
the shots themselves, which would match their own memory at distance 0), makes a fraction ``anomaly_ratio`` of them
anomalous with the synthesizer (:func:`~anomalib_synth.transforms.synthesize_batch`), and takes one Adam step on the
focal + dice loss of the refined map against the synthetic masks, as PCSNet (a pixel loss on its pseudo
anomalies) and DRAEM (Zavrtanik et al., ICCV 2021: focal loss on its discriminative map) do; the dice term keeps small defects from being
swamped by the many normal pixels. The backbone and the memory bank stay frozen: only the head trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ...synthesizers import Synthesizer
from ...transforms import synthesize_batch
from ...views import ViewRanges, augmented_views
from .torch_model import PatchcoreRefinerModel

__all__ = ["DEFAULTS", "focal_dice_loss", "train_refiner"]

DEFAULTS = {"steps": 80, "batch_size": 4, "lr": 2e-3, "anomaly_ratio": 0.75}
"""The default budget. Measured on one core at 256 px, 1 shot, ``efficientnet_lite0.local`` with ``blocks.1,blocks.2``
and ``nsa+cutpaste``: see ``docs`` / the issue report for the seconds."""


def focal_dice_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al., ICCV 2017, ``gamma``) plus soft dice (per image, smoothed by 1) on ``[B, H, W]``."""
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    focal = ((1 - torch.exp(-bce)) ** gamma * bce).mean()
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(1).sum(1)
    total = p.flatten(1).sum(1) + target.flatten(1).sum(1)
    dice = (1 - (2 * inter + 1) / (total + 1)).mean()
    return focal + dice


def train_refiner(
    model: PatchcoreRefinerModel,
    shots: Tensor,
    synthesizer: Synthesizer,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    anomaly_ratio: float = DEFAULTS["anomaly_ratio"],
    generator: torch.Generator | None = None,
    views: ViewRanges = ViewRanges(),  # noqa: B008 (frozen dataclass)
    checkpoints: Sequence[int] = (),
    progress: bool = False,
) -> tuple[list[float], dict[int, dict[str, Tensor]]]:
    """Train ``model``'s head on synthetic anomalies of augmented views of ``shots``.

    Args:
        model (PatchcoreRefinerModel): the refiner; fitted on ``shots`` here first if it has no memory bank yet.
        shots (Tensor): the normal shots ``[k, 3, H, W]`` in ``[0, 1]``.
        synthesizer (Synthesizer): makes the training anomalies (e.g. ``synthesizers.mix.build("nsa+cutpaste")``).
        steps (int, optional): optimiser steps. Defaults to ``80``.
        batch_size (int, optional): views per step. Defaults to ``4``.
        lr (float, optional): Adam learning rate. Defaults to ``2e-3``.
        anomaly_ratio (float, optional): probability that a view is made anomalous. Defaults to ``0.75``.
        generator (torch.Generator | None, optional): the only source of randomness (views, anomalies); ``None``
            seeds one with 0. Defaults to ``None``.
        views (ViewRanges, optional): how far a view departs from its shot. Defaults to ``ViewRanges()``.
        checkpoints (Sequence[int], optional): steps after which to keep a copy of the head's state (``0``: the
            untrained head, i.e. PatchCore). Defaults to ``()``.
        progress (bool, optional): show a progress bar. Defaults to ``False``.

    Returns:
        ``(loss of every step, {step: head state_dict})`` for the requested ``checkpoints``.
    """
    if steps < 0 or batch_size < 1 or not 0 <= anomaly_ratio <= 1:
        msg = f"need steps >= 0, batch_size >= 1 and 0 <= anomaly_ratio <= 1, got {steps}, {batch_size}, {anomaly_ratio}"
        raise ValueError(msg)
    bad = [s for s in checkpoints if not 0 <= s <= steps]
    if bad:
        msg = f"checkpoints must lie in [0, steps={steps}], got {bad}"
        raise ValueError(msg)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if not model.is_fitted:
        model.fit(shots, generator, views=views)
    wanted = set(checkpoints)
    snapshots: dict[int, dict[str, Tensor]] = {}

    def keep(step: int) -> None:
        if step in wanted:
            snapshots[step] = {k: v.detach().clone() for k, v in model.head.state_dict().items()}

    model.eval()  # no dropout or batch norm; the backbone stays in inference mode
    model.head.train()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=lr)
    losses: list[float] = []
    keep(0)
    for step in tqdm(range(1, steps + 1), desc="refiner", disable=not progress):
        images, _ = augmented_views(shots, batch_size, generator, views)
        images, masks, _ = synthesize_batch(synthesizer, images, None, None, anomaly_ratio, generator)
        refined, _ = model.maps(images)
        logits = model.head.log_a.exp() * (refined - model.head.b)
        loss = focal_dice_loss(logits, masks[:, 0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        keep(step)
    model.head.eval()
    return losses, snapshots
