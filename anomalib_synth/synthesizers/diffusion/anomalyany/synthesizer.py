"""AnomalyAny (Sun et al., CVPR 2025, "Unseen Visual Anomaly Generation", arXiv 2406.01078; official code
EPFL-IMOS/AnomalyAny): the synthesizer, its options and its output.

Per image, with frozen Stable Diffusion 1.5 and CLIP ViT-L/14, training-free (the modules of this package hold the
details, each with its departures):

1. **Test-time normal-sample conditioning** (Sec. 3.1, :mod:`.sampling`): the normal image is encoded and noised to
   the timestep of step ``N (1 - gamma)`` (about ``gamma T``); only the last ``n = int(N gamma)`` steps are
   denoised, and the noised normal latent is blended back outside the foreground after every step.
2. **Attention-guided anomaly optimisation** (Sec. 3.2, Eq. 3-4, :mod:`.anomaly_map`, :mod:`.losses`): at every
   executed step (``attention_steps=None``, as the official code), ``inner_steps`` (10) gradient iterations on
   ``z_t`` of ``L_att = 1 - max(A_anomaly * m)``, with ``A_anomaly`` the smoothed cross-attention of the defect
   words.
3. **Localization-aware scheduler** (Sec. 3.2, Eq. 5, :mod:`.schedule`): the weight ``alpha_t`` of ``L_att``, the
   official code's rising ``lambda i / n`` by default, Eq. 5 with ``attention_schedule="paper"``; the paper's stop
   rule is opt-in (``localized_range``).
4. **Prompt-guided refinement** (Sec. 3.3, Eq. 6-7, :mod:`.losses`): ``L_prompt`` moves the anomaly prompt's
   embedding at every guided iteration; ``L_img`` (CLIP, on the decoded ``z_t``) joins in the last 30 % of the
   executed steps. One backward of ``alpha_t L_att + w_img L_img + w_prompt L_prompt`` gives both gradients.
5. **Output mask** (Sec. 3.4, :func:`~.anomaly_map.output_mask`): the last smoothed map of the defect words,
   upsampled, thresholded (at or above its mean by default, the official rule) and intersected with the
   foreground; the input is pasted back outside it (``paste_back="mask"``), so the label covers every changed pixel.

*Departures from the official code*, and why:

- the sampler is always DDIM on the checkpoint's noise schedule: the PNDM scheduler SD 1.5 ships is stateful and
  would discard the guided update of the second executed step (:mod:`.sampling`);
- ``L_att`` is the paper's mask-weighted form (the code drops the mask), and the token softmax runs over the
  prompt's own tokens (the code includes end and padding tokens) (:mod:`.losses`, :mod:`.anomaly_map`);
- the ``E`` of ``L_prompt`` is the mean over the prompt's own tokens (the code's cosine runs over the padded
  77-token axis) (:mod:`.losses`);
- the extra Attend-and-Excite block (in practice at most once, at the first step) and the 20-step pre-alignment of
  the anomaly-token embedding are not run; one backward instead of two per iteration (:mod:`.sampling`);
- the code never saves a mask; we return one (Sec. 3.4);
- the optimised latent and embedding are float32 master copies, so ``torch_dtype="float16"`` does not lose the
  small updates (:mod:`.sampling`).

**Cost per image** (:meth:`AnomalyAnySynthesizer.expected_costs`): ``2 n + I g`` UNet forwards and ``I g``
backwards, with ``I`` inner iterations and ``g`` the guided steps (all ``n`` by default), plus ``I r`` VAE-decoder
and CLIP-image forward+backward passes in the ``r`` refinement steps. Defaults (200 steps, gamma 0.25 -> 50
executed steps): 600 forwards, 500 backwards, 140 decoder passes. The official loop (gamma 0.3, 60 steps) runs
840-866 forwards and about 1200 backwards: it also runs a grad-enabled CFG forward whose output is unused at
every step, and a second backward per iteration for the prompt. ``benchmarks/diffusion_cost.py`` measures what
this means in time and memory at 512 px (docs/diffusion.md). Real weights want a GPU; ``attention_slicing`` does
not help here (see the ``attention_slicing`` argument).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...base import Params, SynthesisResult
from ...registry import register
from ...validation import check_choice, check_range
from ..attention import AttentionStore
from ..common import DiffusionSynthesizer, composite, restartable_scheduler
from ..loading import CLIP_VIT_L14, SD15, load_pretrained, resolve_dtype
from ..prompts import AnomalyPrompt
from . import anomaly_map as maps
from . import schedule
from .anomaly_map import attention_resolution
from .sampling import GuidedSampling

__all__ = ["AnomalyAnySynthesizer", "attention_resolution"]


@register("anomalyany")
class AnomalyAnySynthesizer(DiffusionSynthesizer):
    """AnomalyAny (arXiv 2406.01078): training-free, attention-guided Stable Diffusion from one normal image.

    Args:
        model (str | Path): Stable Diffusion pipeline (Hub id or folder). Defaults to SD 1.5.
        clip_model (str | Path): CLIP model for the image loss. Defaults to ``openai/clip-vit-large-patch14``.
        num_inference_steps (int): scheduler steps ``N``. Defaults to ``200`` (official).
        gamma (float): fraction of the steps executed from the noised normal image (paper 0.25, notebooks 0.3).
        guidance_scale (float): classifier-free guidance. Defaults to ``12.5`` (official).
        attention_res (int | None): side of the guided attention maps. Defaults to the UNet's closest to latent/4.
        attention_steps (int | None): executed steps with attention guidance (the first ones); ``None`` = every
            executed step, as the official code. Defaults to ``None``.
        inner_steps (int): gradient iterations per guided step. Defaults to ``10`` (official).
        lr (float), lr_decay (float), lr_min (float): inner step size ``max(lr_min, lr - lr_decay * i)`` at executed
            step ``i``; the update is ``z -= 2 * lr * grad`` (official). Defaults ``0.02``, ``1e-4``, ``1e-4``.
        attention_schedule (str): weight of ``L_att``: ``"official"`` (``lambda i / n``, rising) or ``"paper"``
            (Eq. 5, ``lambda (1 - attention_decay i / (n - 1)) n_t / n_start``, falling). Defaults to ``"official"``.
        attention_scale (float): ``lambda``. Defaults to ``0.5``.
        attention_decay (float): relative fall of the ``"paper"`` weight over the executed steps. Defaults to ``0.5``.
        localized_range (tuple[float, float] | None): the paper's stop rule: fraction of attention cells with ``n_t``
            inside which a map counts as localised and gets no more ``L_att`` (paper ``(10/256, 50/256)``);
            ``None`` never stops, as the official code's ``L_att``. Defaults to ``None``.
        refine_fraction (float): ``L_img`` joins in the executed steps ``i > (1 - refine_fraction) n``. Defaults
            to ``0.3``.
        image_loss_weight (float): weight of ``L_img``. Defaults to ``0.1`` (official).
        image_loss_input (str): what ``L_img`` decodes: ``"latent"`` (``z_t``, official) or ``"prediction"``
            (``x0_hat``, through the UNet). Defaults to ``"latent"``.
        prompt_loss_weight (float): weight of ``L_prompt``. Defaults to ``1.0`` (official).
        prompt_lr (float): step size ``max(lr_min, prompt_lr - lr_decay * i)`` of the prompt-embedding update, at
            every guided iteration. Defaults to ``0.02`` (official).
        token_scale (float): attention logits are multiplied by this before the token softmax. Defaults to ``100``.
        smoothing (tuple[int, float]): Gaussian kernel size and sigma of the maps. Defaults to ``(3, 0.5)``.
        mask_threshold (float | None): threshold of the max-normalised final map; ``None`` = its mean.
        mask_blending (bool): blend the latent with the noised normal latent outside the foreground every step.
        paste_back (str): ``"mask"`` (input kept outside the returned mask) or ``"foreground"`` (kept outside the
            foreground only, as the paper's images; the label then misses benign changes). Defaults to ``"mask"``.
        torch_dtype (str | torch.dtype | None): weights dtype. Defaults to float32.
        local_files_only (bool | None): never contact the Hub (``None`` follows ``HF_HUB_OFFLINE``).
        attention_slicing (bool): sliced self-attention. Defaults to ``False``. *Not advised here:* under autograd
            the slices keep their full attention probabilities for the backward, so the peak memory of a guided
            iteration rises (measured in docs/diffusion.md), while the default SDPA attention does not store them.
        **kwargs: prompt and resolution options of
            :class:`~anomalib_synth.synthesizers.diffusion.common.DiffusionSynthesizer`.

    Raises:
        ModelNotFoundError: when weights are neither local nor reachable.
        ValueError: for out-of-range options, or a defect word that the tokenizer truncates away.
    """

    description = "AnomalyAny: training-free, attention-guided Stable Diffusion from one normal image"
    cost = (
        "`2 n + I g` UNet forwards and `I g` backwards per image (`n = int(N gamma)` executed steps, "
        "`I` inner iterations, `g` guided steps, all `n` by default), plus a VAE decode and a CLIP image pass, forward "
        "and backward, per refinement iteration. Reported in `params`. Defaults: 600 forwards, 500 backwards and 140 "
        "decoder passes; the official loop runs about 850 forwards and 1200 backwards. Measured at 512 px in "
        "docs/diffusion.md (Cost at full size): about 0.7 of the official loop's time, which reports 1-2 min per image "
        "and about 30 GB on an A100."
    )
    draws_masks = False
    _param_keys = ("prompt", "seed", "unet_forward", "unet_backward", "n_t", "attention_loss", "image_loss",
                   "latent_step", "prompt_step")  # fmt: skip

    def __init__(
        self,
        model: str | Path = SD15,
        clip_model: str | Path = CLIP_VIT_L14,
        num_inference_steps: int = 200,
        gamma: float = 0.25,
        guidance_scale: float = 12.5,
        attention_res: int | None = None,
        attention_steps: int | None = None,
        inner_steps: int = 10,
        lr: float = 0.02,
        lr_decay: float = 1e-4,
        lr_min: float = 1e-4,
        attention_schedule: str = "official",
        attention_scale: float = 0.5,
        attention_decay: float = 0.5,
        localized_range: tuple[float, float] | None = None,
        refine_fraction: float = 0.3,
        image_loss_weight: float = 0.1,
        image_loss_input: str = "latent",
        prompt_loss_weight: float = 1.0,
        prompt_lr: float = 0.02,
        token_scale: float = 100.0,
        smoothing: tuple[int, float] = (3, 0.5),
        mask_threshold: float | None = None,
        mask_blending: bool = True,
        paste_back: str = "mask",
        torch_dtype: str | torch.dtype | None = None,
        local_files_only: bool | None = None,
        attention_slicing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPModel, CLIPTokenizer

        if num_inference_steps < 1 or not 0 < int(num_inference_steps * gamma) <= num_inference_steps:
            msg = (
                f"need num_inference_steps >= 1 and 0 < int(steps * gamma) <= steps, got {num_inference_steps}, {gamma}"
            )
            raise ValueError(msg)
        if inner_steps < 0 or (attention_steps is not None and attention_steps < 0):
            msg = f"inner_steps and attention_steps must be >= 0, got {inner_steps}, {attention_steps}"
            raise ValueError(msg)
        check_range("refine_fraction", (refine_fraction, refine_fraction), 0.0, 1.0)
        self.model, self.clip_model = str(model), str(clip_model)
        self.num_inference_steps, self.gamma, self.guidance_scale = (
            int(num_inference_steps),
            float(gamma),
            guidance_scale,
        )
        self.attention_res, self.inner_steps = attention_res, int(inner_steps)
        self.attention_steps = None if attention_steps is None else int(attention_steps)
        self.lr, self.lr_decay, self.lr_min = lr, lr_decay, lr_min
        self.attention_schedule = check_choice("attention_schedule", attention_schedule, ("official", "paper"))
        self.attention_scale, self.attention_decay = attention_scale, attention_decay
        self.localized_range = (
            None if localized_range is None else check_range("localized_range", localized_range, 0, 1)
        )
        self.refine_fraction = refine_fraction
        self.image_loss_weight, self.prompt_loss_weight, self.prompt_lr = (
            image_loss_weight,
            prompt_loss_weight,
            prompt_lr,
        )
        self.image_loss_input = check_choice("image_loss_input", image_loss_input, ("latent", "prediction"))
        self.token_scale, self.smoothing = token_scale, (int(smoothing[0]), float(smoothing[1]))
        self.mask_threshold, self.mask_blending = mask_threshold, mask_blending
        self.paste_back = check_choice("paste_back", paste_back, ("mask", "foreground"))
        self.torch_dtype = resolve_dtype(torch_dtype)

        pipe = load_pretrained(StableDiffusionPipeline, self.model, "AnomalyAny: Stable Diffusion", local_files_only,
                               dtype=self.torch_dtype, safety_checker=None, requires_safety_checker=False)  # fmt: skip
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.tokenizer, self.scheduler_config = pipe.tokenizer, pipe.scheduler.config
        self.shipped_scheduler = type(pipe.scheduler).__name__
        self.clip = load_pretrained(CLIPModel, self.clip_model, "AnomalyAny: CLIP image loss", local_files_only,
                                    dtype=self.torch_dtype)  # fmt: skip
        self.clip_tokenizer = load_pretrained(CLIPTokenizer, self.clip_model, "AnomalyAny: CLIP tokenizer",
                                              local_files_only)  # fmt: skip
        if attention_slicing:  # self-attention only: attach_attention_store replaces the attn2 processors per call
            self.unet.set_attention_slice("auto")
        self._loaded()

    # -- schedule (Sec. 3.1-3.3, Eq. 5: see .schedule) --------------------------------------------------------

    def make_scheduler(self) -> Any:
        """The sampler: DDIM on the checkpoint's noise schedule, whatever scheduler the checkpoint ships."""
        return restartable_scheduler(self.scheduler_config)

    def executed_steps(self) -> int:
        """Denoising steps run from the noised normal image: ``int(N * gamma)``."""
        return schedule.executed_steps(self.num_inference_steps, self.gamma)

    def guided(self, i: int) -> tuple[bool, bool]:
        """Whether executed step ``i`` gets attention guidance, and whether ``L_img`` joins (``i > (1 - f) n``)."""
        return schedule.step_kinds(i, self.executed_steps(), self.attention_steps, self.refine_fraction)

    def attention_weight(self, i: int, n_t: Tensor, n_start: Tensor) -> Tensor:
        """``alpha`` of ``L_att`` at executed step ``i`` per sample (see ``attention_schedule``)."""
        return schedule.attention_weight(i, self.executed_steps(), n_t, n_start, self.attention_schedule,
                                         self.attention_scale, self.attention_decay)  # fmt: skip

    def expected_costs(self) -> dict[str, int]:
        """Per image, when no map localises early: ``unet_forward``/``unet_backward`` (in images), and the
        ``vae_decode`` and ``clip_image`` forward+backward passes of ``L_img``."""
        return schedule.unet_costs([self.guided(i) for i in range(self.executed_steps())], self.inner_steps)

    def expected_unet_evaluations(self) -> tuple[int, int]:
        """``(forwards, backwards)`` of the UNet per image when no map localises early."""
        costs = self.expected_costs()
        return costs["unet_forward"], costs["unet_backward"]

    # -- text and attention (Sec. 3.2: see .anomaly_map) -----------------------------------------------------------

    def _tokens(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids  # fmt: skip

    def _embed(self, ids: Tensor) -> Tensor:
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def token_weights(self, prompts: list[AnomalyPrompt], ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights, valid)`` over the token axis: weights average the defect words' tokens; ``valid`` marks the
        prompt's own tokens (no start, end or padding token), over which the softmax runs."""
        return maps.token_weights(self.tokenizer, prompts, ids)

    def anomaly_map(self, store: AttentionStore, weights: Tensor, valid: Tensor) -> Tensor:
        """Smoothed ``[B, 1, r, r]`` attention of the defect words (token softmax over the prompt's tokens)."""
        return maps.anomaly_map(store.maps(), weights, valid, self.token_scale, self.smoothing)

    @staticmethod
    def attention_cells(amap: Tensor) -> Tensor:
        """``n_t``: cells of the max-normalised map at or above its mean, per sample."""
        return maps.attention_cells(amap)

    # -- synthesis ------------------------------------------------------------------------------------------------

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        with torch.enable_grad():
            generated, amap, trace = GuidedSampling(self, images, params).run()
        mask = maps.output_mask(amap, params["fg"], self.mask_threshold)
        keep = mask if self.paste_back == "mask" else params["fg"]
        out = composite(images, generated.to(images.device), keep)
        params = {**params, **{k: v.to(images.device) for k, v in trace.items()}}
        return self._result(images, out, mask, params, self._param_keys)
