"""Model-free quality figures of a :class:`~anomalib_synth.synthesizers.SynthesisResult` against its input.

All functions return one value per sample (``[B]``) so that they can be aggregated or filtered:

- :func:`background_psnr`: PSNR (dB) of the pixels *outside* the mask. ``inf`` when the background is untouched,
  which is what every synthesizer here guarantees. A damaged background inflates diversity metrics such as
  IC-LPIPS, so report it next to them.
- :func:`anomaly_visibility`: mean absolute change inside the mask (intensity in ``[0, 1]``, averaged over
  channels). Near 0 means the "anomaly" is invisible and the label is noise.
- :func:`mask_agreement`: IoU between the changed pixels (``max over channels |change| > tau``) and the mask. Near 1
  means the mask covers what changed and nothing else.
- :func:`background_pasted`: the fraction of changed pixels inside the mask that now have the colour of the plain
  background (the median of the image's 1-pixel border) and did not before: background pasted onto the object, as
  white bars on a dark bottle. No real defect looks like that. Near 0 on objects is what to expect.

Generation-quality figures of a set of generated images against real anomalous images (the ones the diffusion
papers report): :func:`inception_score` and :func:`kernel_inception_distance` (torchmetrics; Inception weights),
:func:`ic_lpips` (intra-cluster pairwise LPIPS; any pairwise :data:`Distance`, e.g. :class:`LPIPSDistance`), and
:func:`background_preservation` outside the masks. Pretrained weights load on first use; offline, a clear
:class:`~anomalib_synth.synthesizers.diffusion.loading.ModelNotFoundError` names the missing file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor

from .synthesizers.base import SynthesisResult


def _change(result: SynthesisResult, images: Tensor) -> Tensor:
    if result.images.shape != images.shape:
        msg = f"result images {tuple(result.images.shape)} and input images {tuple(images.shape)} differ in shape"
        raise ValueError(msg)
    return (result.images.float() - images.float()).abs()


def background_psnr(result: SynthesisResult, images: Tensor) -> Tensor:
    """PSNR in dB of the pixels outside the mask (``inf`` if they are unchanged or the mask covers everything)."""
    change = _change(result, images)
    outside = 1 - result.masks.float()
    squared = (change**2 * outside).sum((1, 2, 3))
    count = (outside.sum((1, 2, 3)) * change.shape[1]).clamp_min(1)
    mse = squared / count
    return torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-20)), torch.full_like(mse, math.inf))


def anomaly_visibility(result: SynthesisResult, images: Tensor) -> Tensor:
    """Mean absolute change inside the mask (0 for an empty mask)."""
    change = _change(result, images).mean(1, keepdim=True)
    inside = result.masks.float()
    return (change * inside).sum((1, 2, 3)) / inside.sum((1, 2, 3)).clamp_min(1)


def mask_agreement(result: SynthesisResult, images: Tensor, tau: float = 1 / 255) -> Tensor:
    """IoU between ``max_c |change| > tau`` and the mask (1 when both are empty)."""
    changed = _change(result, images).amax(1, keepdim=True) > tau
    mask = result.masks > 0.5
    intersection = (changed & mask).sum((1, 2, 3)).float()
    union = (changed | mask).sum((1, 2, 3)).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


BACKGROUND_TOLERANCE = 0.05
"""How close (max over channels, intensity in ``[0, 1]``) a pixel must be to the border's median colour to count as
having the background's colour in :func:`background_pasted`."""


def background_pasted_counts(
    result: SynthesisResult, images: Tensor, tau: float = 1 / 255, tolerance: float = BACKGROUND_TOLERANCE
) -> tuple[Tensor, Tensor]:
    """Per sample ``[B]``: ``(pasted, changed)`` pixel counts of :func:`background_pasted`."""
    from .synthesizers.placement import border_median

    change = _change(result, images).amax(1, keepdim=True)
    changed = (change > tau) & (result.masks > 0.5)
    colour = border_median(images.float())[:, :, None, None]  # [B, C, 1, 1]
    was = (images.float() - colour).abs().amax(1, keepdim=True) <= tolerance
    now = (result.images.float() - colour).abs().amax(1, keepdim=True) <= tolerance
    pasted = changed & now & ~was
    return pasted.sum((1, 2, 3)), changed.sum((1, 2, 3))


def background_pasted(
    result: SynthesisResult, images: Tensor, tau: float = 1 / 255, tolerance: float = BACKGROUND_TOLERANCE
) -> Tensor:
    """Fraction of the changed pixels inside the mask (``max_c |change| > tau``) whose colour is now the background's
    (within ``tolerance`` of the median of the input's 1-pixel border, max over channels) and was not before
    (0 when nothing changed). On an object photographed on a plain background, that is background pasted onto the
    object."""
    pasted, changed = background_pasted_counts(result, images, tau, tolerance)
    return pasted.float() / changed.clamp_min(1).float()


def summarize(result: SynthesisResult, images: Tensor, tau: float = 1 / 255) -> dict[str, float]:
    """Batch means of the three figures, plus the anomalous fraction, the mean mask area, and the fraction of the
    batch's changed pixels that are background pasted onto the object (:func:`background_pasted`, pooled over the
    batch)."""
    psnr = background_psnr(result, images)
    finite = psnr[psnr.isfinite()]
    pasted, changed = background_pasted_counts(result, images, tau)
    return {
        "anomalous": float(result.labels.float().mean()),
        "mask_area": float(result.masks.mean()),
        "background_psnr": float(finite.mean()) if finite.numel() else math.inf,
        "visibility": float(anomaly_visibility(result, images).mean()),
        "mask_iou": float(mask_agreement(result, images, tau).mean()),
        "background_pasted": float(pasted.sum() / changed.sum().clamp_min(1)),
    }


# -- generation quality: IS, KID, IC-LPIPS, background preservation ---------------------------------------------------

Distance = Callable[[Tensor, Tensor], Tensor]
"""``distance(a [N,3,H,W], b [M,3,H,W]) -> [N, M]`` for images in ``[0, 1]``."""


def pixel_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared pixel difference of every pair, ``[N, M]`` (a cheap stand-in for LPIPS in tests)."""
    return torch.cdist(a.flatten(1).float(), b.flatten(1).float()).pow(2) / a[0].numel()


WEIGHT_FILES = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "inception": "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
}
"""Where the metrics' pretrained weights come from (torchvision backbones of LPIPS; torch-fidelity's Inception)."""


def _loading(what: str, weights: str, build: Callable[[], Any]) -> Any:
    """``build()``, turning a failed weight download into a :class:`ModelNotFoundError` that names the file."""
    from .errors import ModelNotFoundError

    try:
        return build()
    except (OSError, RuntimeError, URLError) as error:
        url = WEIGHT_FILES[weights]
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        msg = (f"{what}: the pretrained weights {url.rsplit('/', 1)[-1]} could not be loaded "
               f"({type(error).__name__}: {error}). Download {url} on a machine with internet and copy it to {cache} "
               "(or set TORCH_HOME to a folder whose hub/checkpoints/ has it).")  # fmt: skip
        raise ModelNotFoundError(msg) from error


class LPIPSDistance:
    """LPIPS (torchmetrics' network, AlexNet or VGG backbone) as a pairwise :data:`Distance`.

    Raises:
        ModelNotFoundError: when the backbone or LPIPS weights are neither cached nor downloadable.
    """

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = _loading(
            f"LPIPS-{net}", net, lambda: LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
        )
        self.net, self.device, self.batch_size = metric.net.to(device).eval(), torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        i, j = torch.meshgrid(torch.arange(len(a)), torch.arange(len(b)), indexing="ij")
        i, j = i.flatten(), j.flatten()
        out = []
        for start in range(0, len(i), self.batch_size):
            x = a[i[start : start + self.batch_size]].to(self.device).float()
            y = b[j[start : start + self.batch_size]].to(self.device).float()
            out.append(self.net(x, y, normalize=True).flatten().cpu())
        return torch.cat(out).view(len(a), len(b)) if out else torch.zeros(len(a), len(b))


def ic_lpips(generated: Tensor, real: Tensor, distance: Distance) -> float:
    """Intra-cluster pairwise distance (IC-LPIPS with an LPIPS ``distance``; AnomalyDiffusion's diversity figure).

    1. Each generated image joins the cluster of its nearest real anomalous image.
    2. Each cluster with at least two members scores the mean distance over its distinct pairs.
    3. The result is the mean over those clusters (NaN if there is none).
    """
    if len(generated) == 0 or len(real) == 0:
        msg = f"ic_lpips needs generated and real images, got {len(generated)} and {len(real)}"
        raise ValueError(msg)
    nearest = distance(generated, real).argmin(1)
    scores = []
    for cluster in nearest.unique():
        members = generated[nearest == cluster]
        if len(members) < 2:
            continue
        d = distance(members, members)
        upper = torch.triu_indices(len(members), len(members), offset=1)
        scores.append(d[upper[0], upper[1]].mean())
    return float(torch.stack(scores).mean()) if scores else math.nan


def background_preservation(generated: Tensor, inputs: Tensor, masks: Tensor,
                            distance: Distance | None = None) -> dict[str, float]:  # fmt: skip
    """How much of the image *outside* the masks a generator kept: mean PSNR (dB, ``inf`` when untouched) and,
    with a ``distance`` (e.g. :class:`LPIPSDistance`), the mean distance between the input and the generated image
    with its mask region restored from the input. IC-LPIPS rewards damaged backgrounds; report this next to it."""
    masks = masks.float()
    outside = 1 - masks
    mse = ((generated.float() - inputs.float()) ** 2 * outside).sum((1, 2, 3)) / (
        outside.sum((1, 2, 3)) * inputs.shape[1]
    ).clamp_min(1)
    psnr = torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-20)), torch.full_like(mse, math.inf))
    out = {"background_psnr": float(psnr.mean())}
    if distance is not None:
        restored = torch.where(masks > 0.5, inputs.float(), generated.float())
        pairs = [distance(restored[i : i + 1], inputs[i : i + 1].float())[0, 0] for i in range(len(inputs))]
        out["background_lpips"] = float(torch.stack(pairs).mean())
    return out


def _uint8(images: Tensor) -> Tensor:
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def inception_score(images: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) with torchmetrics (Inception weights of torch-fidelity).

    Raises:
        ModelNotFoundError: when the Inception weights are neither cached nor downloadable.
    """
    from torchmetrics.image.inception import InceptionScore

    metric = _loading("Inception (IS)", "inception", lambda: InceptionScore(splits=max(1, min(splits, len(images)))))
    metric.update(_uint8(images))
    mean, std = metric.compute()
    return float(mean), float(std)


def kernel_inception_distance(generated: Tensor, real: Tensor, subset_size: int = 50) -> tuple[float, float]:
    """KID (mean, std over subsets) with torchmetrics; ``subset_size`` is capped by the smaller set.

    Raises:
        ModelNotFoundError: when the Inception weights are neither cached nor downloadable.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    size = max(2, min(subset_size, len(generated), len(real)))
    metric = _loading("Inception (KID)", "inception", lambda: KernelInceptionDistance(subset_size=size))
    metric.update(_uint8(real), real=True)
    metric.update(_uint8(generated), real=False)
    mean, std = metric.compute()
    return float(mean), float(std)
