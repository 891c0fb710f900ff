"""When and how strongly AnomalyAny guides (arXiv 2406.01078, Sec. 3.1-3.3): pure functions of the step index.

- **Executed steps** (Sec. 3.1, test-time normal-sample conditioning): of the ``N``-step schedule only the last
  ``n = int(N gamma)`` steps run, from the normal image noised to step ``N (1 - gamma)`` (about ``gamma T``).
- **Which steps are guided** (:func:`step_kinds`): ``L_att`` at every executed step by default (``attention_steps``
  ``None``, as the official code), ``L_img`` in the steps ``i > (1 - refine_fraction) n`` (the last 30 %).
- **Step sizes** (:func:`step_size`): ``max(lr_min, lr - lr_decay i)`` at executed step ``i`` (official: 0.02, 1e-4,
  1e-4), for the latent (applied as ``2 lr grad``) and for the anomaly-prompt embedding.
- **Localization-aware scheduler** (Sec. 3.2, Eq. 5), the weight ``alpha_t`` of ``L_att``
  (:func:`attention_weight`):

  - ``"official"`` (our default): ``alpha_i = lambda i / n``, *rising* from 0 over the executed steps: the weight the
    official code actually uses (``0.5 * (i / (N - t_start)) * loss_att``); its ``n_t`` only gates the
    Attend-and-Excite block that we do not run.
  - ``"paper"``: Eq. 5, ``alpha_t = lambda (1 + delta_t t) n_t / n_{t_start}``. ``t`` falls during sampling, so
    ``(1 + delta_t t)`` is taken as ``1 - decay i / (n - 1)``, *falling* from ``lambda`` to ``lambda (1 - decay)``
    (the direction of the official ``scale_range = (1.0, 0.5)`` step size, which is computed and never applied).

- **Stop rule** (Sec. 3.2, opt-in, :func:`localized`): a sample whose map covers a fraction of cells inside
  ``localized_range`` (paper 10-50 of 256) gets no more ``L_att``. The official code uses it only to gate the block
  we do not run, so by default ``L_att`` applies at every step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention_weight", "executed_steps", "localized", "step_kinds", "step_size", "unet_costs"]


def executed_steps(num_inference_steps: int, gamma: float) -> int:
    """``n = int(N gamma)``: the denoising steps run from the noised normal image."""
    return int(num_inference_steps * gamma)


def step_kinds(i: int, n: int, attention_steps: int | None, refine_fraction: float) -> tuple[bool, bool]:
    """Whether executed step ``i`` of ``n`` gets ``L_att`` (the first ``attention_steps``, all when ``None``), and
    whether ``L_img`` joins (``i > (1 - refine_fraction) n``)."""
    attend = attention_steps is None or i < attention_steps
    return attend, refine_fraction > 0 and i > (1 - refine_fraction) * n


def step_size(i: int, base: float, decay: float, minimum: float) -> float:
    """``max(minimum, base - decay i)`` at executed step ``i``."""
    return max(minimum, base - decay * i)


def attention_weight(i: int, n: int, n_t: Tensor, n_start: Tensor, schedule: str, scale: float, decay: float) -> Tensor:
    """``alpha`` of ``L_att`` at executed step ``i`` of ``n``, per sample (float32 ``[B]``).

    Args:
        n_t (Tensor): attention cells of the current maps (:func:`~.anomaly_map.attention_cells`).
        n_start (Tensor): ``n_{t_start}``, those of the first guided iteration (at least 1).
        schedule (str): ``"official"`` (``scale i / n``) or ``"paper"`` (Eq. 5).
        scale (float): ``lambda``. decay (float): relative fall of the ``"paper"`` weight over the steps.
    """
    if schedule == "official":
        return torch.full_like(n_t, scale * i / n, dtype=torch.float32)
    return scale * (1 - decay * i / max(n - 1, 1)) * n_t.float() / n_start


def localized(n_t: Tensor, localized_range: tuple[float, float], resolution: int) -> Tensor:
    """The stop rule: bool ``[B]``, ``n_t`` strictly inside ``localized_range`` (fractions of the ``r x r`` cells)."""
    lo, hi = (v * resolution * resolution for v in localized_range)
    return (n_t > lo) & (n_t < hi)


def unet_costs(flags: list[tuple[bool, bool]], inner_steps: int) -> dict[str, int]:
    """Per image, when no map localises early, for the ``(attend, refine)`` flags of the executed steps: UNet
    forwards and backwards (in images; two forwards per step for classifier-free guidance, one forward and one
    backward per guided iteration) and the ``vae_decode`` and ``clip_image`` forward+backward passes of ``L_img``."""
    n = len(flags)
    n_guided = sum(any(f) for f in flags) if inner_steps else 0
    n_refine = sum(refine for _, refine in flags)
    return {"unet_forward": 2 * n + inner_steps * n_guided, "unet_backward": inner_steps * n_guided,
            "vae_decode": inner_steps * n_refine, "clip_image": inner_steps * n_refine}  # fmt: skip
