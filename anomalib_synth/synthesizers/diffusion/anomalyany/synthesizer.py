"""AnomalyAny: training-free anomaly generation with attention-guided Stable Diffusion (Sun et al., CVPR 2025,
"Unseen Visual Anomaly Generation", arXiv 2406.01078; official code EPFL-IMOS/AnomalyAny).

Per image, with frozen Stable Diffusion 1.5 and CLIP ViT-L/14:

1. **Test-time normal-sample conditioning** (Sec. 3.1): the normal image is encoded and noised to the timestep
   of step ``N (1 - gamma)`` of the ``N``-step schedule (about ``gamma T``), and only the remaining
   ``n = int(N gamma)`` steps are denoised. With a foreground mask ``m`` the latent is blended after every step,
   ``z_t = m z_t + (1 - m) z_t^normal`` (``z_t^normal``: the normal latent noised to ``t`` with fresh noise, as the
   official code does). *Sampler:* always DDIM (eta 0) on the checkpoint's noise schedule
   (:func:`~anomalib_synth.synthesizers.diffusion.common.restartable_scheduler`), as in the Attend-and-Excite
   family. The official code keeps the checkpoint's scheduler, PNDM for SD 1.5, whose stateful PLMS step discards
   the guided update of the second executed step and then lags the schedule by one step (foreground and blended
   background end up at different noise levels); DDIM is stateless and correct when started partway in.
2. **Attention-guided anomaly optimisation** (Sec. 3.2, Eq. 3-4): the cross-attention maps of the anomaly prompt at
   16x16 (for other sizes: the cross-attention resolution closest to latent/4), averaged over heads and layers,
   without the start token, scaled by 100 and soft-maxed over the prompt tokens, Gaussian-smoothed (k=3,
   sigma=0.5). ``L_att = 1 - max(A_anomaly * m)``. As in the official code, every executed step is guided
   (``attention_steps=None``): ``inner_steps`` (10) gradient iterations on ``z_t``, ``lr = max(1e-4, 0.02 - 1e-4
   i)`` at executed step ``i``, update ``z -= 2 lr grad``. *Departures:* the paper's mask-weighted ``L_att``
   (the official code drops the mask); the token softmax runs over the prompt's own tokens (the official code also
   includes the end and padding tokens, ``[1:-1]`` of 77); the official extra Attend-and-Excite block (at executed
   steps ``i < 10`` while the map is not localised, 5 + 1 more latent steps of size ``scale_factor sqrt(...)``
   when ``i`` is a key of ``thresholds={0, 10, 20}`` and the peak attention is below ``thresholds[i]``, so in
   practice only at the first step and only if the peak is under 0.05) is not run.
3. **Localization-aware scheduler** (Sec. 3.2, Eq. 5), the weight ``alpha_t`` of ``L_att``:

   - ``attention_schedule="official"`` (default): ``alpha_i = lambda i / n`` with ``lambda = attention_scale``
     (0.5), *rising* from 0 over the executed steps: the weight the official code actually uses
     (``0.5 * (i / (N - t_start)) * loss_att``). Its ``n_t`` only gates the Attend-and-Excite block above.
   - ``attention_schedule="paper"``: Eq. 5, ``alpha_t = lambda (1 + delta_t t) n_t / n_{t_start}`` with ``n_t``
     the number of attention cells at or above the mean of the max-normalised map; ``t`` falls during sampling,
     so ``(1 + delta_t t)`` is taken as ``1 - attention_decay * i / (n - 1)``, *falling* from ``lambda`` to
     ``lambda (1 - attention_decay)`` (the direction of the official, unused, ``scale_range = (1.0, 0.5)`` step
     size, which is computed and never applied).

   The paper's stop rule is opt-in (``localized_range``, paper 10-50 of 256 cells): a sample whose map is
   localised gets no more ``L_att``. The official code uses it only to gate the block that we do not run, so by
   default (``None``) ``L_att`` applies at every step.
4. **Prompt-guided refinement** (Sec. 3.3, Eq. 6-7). As in the official code:

   - ``L_prompt = 1 - cos(E_anomaly, E_detailed)`` updates the anomaly prompt's embedding at every guided
     iteration with step ``max(1e-4, prompt_lr - 1e-4 i)`` (``prompt_lr`` 0.02), through the whole joint loss;
   - ``L_img = 1 - cos(CLIP_text(detailed), CLIP_image(decode(z_t)))`` joins the loss with weight
     ``image_loss_weight`` (0.1) in the executed steps ``i > (1 - refine_fraction) n`` (the last 30 %). It decodes
     ``z_t`` itself (``image_loss_input="latent"``), as the official code does: in those late steps ``z_t`` is
     only lightly noised, and its gradient does not go back through the UNet. ``"prediction"`` decodes the
     predicted clean latent ``x0_hat`` instead.

   The joint loss is ``alpha_t L_att + w_img L_img + w_prompt L_prompt``; one backward gives both the latent and
   the prompt gradients (the official code does two). *Departures:* ``E`` is the token-averaged text-encoder
   embedding over each prompt's own tokens (the official cosine runs over the 77-token axis, padding included);
   the official pre-alignment of the anomaly-token embedding (20 steps before sampling) is not done.
5. **Output mask** (Sec. 3.4): the last smoothed attention map of the anomaly words (from the conditional half of the
   final guided step), upsampled, thresholded (``mask_threshold``; ``None`` = at or above its mean, the official
   rule) and intersected with the foreground. *Departure:* the official code never saves a mask; we return it, and
   by default paste the input back outside it (``paste_back="mask"``) so that the label covers every changed pixel.

**Precision.** The optimised variables (latent, anomaly-prompt embedding) are float32 master copies, cast to the
weights' dtype for each forward: under ``torch_dtype="float16"`` an update of ``0.02 grad`` would fall below fp16
resolution and vanish.

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

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from torch import Tensor
from tqdm.auto import tqdm

from ...base import Params, SynthesisResult
from ...registry import register
from ...validation import check_choice, check_range
from ..attention import AttentionStore, attach_attention_store, cross_attention_resolutions
from ..common import DiffusionSynthesizer, composite, restartable_scheduler, to_model_size
from ..latents import (
    clip_pixels,
    decode,
    encode,
    generators_for,
    latent_mask,
    noise_like,
    noise_to_timestep,
    predicted_original,
    vae_scale_factor,
)
from ..loading import CLIP_VIT_L14, SD15, load_pretrained, resolve_dtype
from ..prompts import AnomalyPrompt

__all__ = ["AnomalyAnySynthesizer", "attention_resolution"]


def attention_resolution(unet: Any, latent_size: int) -> int:
    """The cross-attention resolution closest to ``latent_size / 4`` (16 for SD 1.5 at 512 px; coarser on ties)."""
    sizes = cross_attention_resolutions(unet, latent_size)
    if not sizes:
        msg = "the UNet has no cross-attention layers"
        raise ValueError(msg)
    target = latent_size / 4
    return min(sizes, key=lambda s: (abs(math.log(s / target)), s))


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

    # -- schedule -------------------------------------------------------------------------------------------------

    def make_scheduler(self) -> Any:
        """The sampler: DDIM on the checkpoint's noise schedule, whatever scheduler the checkpoint ships."""
        return restartable_scheduler(self.scheduler_config)

    def executed_steps(self) -> int:
        """Denoising steps run from the noised normal image: ``int(N * gamma)``."""
        return int(self.num_inference_steps * self.gamma)

    def guided(self, i: int) -> tuple[bool, bool]:
        """Whether executed step ``i`` gets attention guidance, and whether ``L_img`` joins (``i > (1 - f) n``)."""
        n = self.executed_steps()
        attend = self.attention_steps is None or i < self.attention_steps
        return attend, self.refine_fraction > 0 and i > (1 - self.refine_fraction) * n

    def attention_weight(self, i: int, n_t: Tensor, n_start: Tensor) -> Tensor:
        """``alpha`` of ``L_att`` at executed step ``i`` per sample (see ``attention_schedule``)."""
        n = self.executed_steps()
        if self.attention_schedule == "official":
            return torch.full_like(n_t, self.attention_scale * i / n, dtype=torch.float32)
        return self.attention_scale * (1 - self.attention_decay * i / max(n - 1, 1)) * n_t.float() / n_start

    def expected_costs(self) -> dict[str, int]:
        """Per image, when no map localises early: ``unet_forward``/``unet_backward`` (in images), and the
        ``vae_decode`` and ``clip_image`` forward+backward passes of ``L_img``."""
        n = self.executed_steps()
        flags = [self.guided(i) for i in range(n)]
        n_guided = sum(any(f) for f in flags) if self.inner_steps else 0
        n_refine = sum(refine for _, refine in flags)
        return {"unet_forward": 2 * n + self.inner_steps * n_guided, "unet_backward": self.inner_steps * n_guided,
                "vae_decode": self.inner_steps * n_refine, "clip_image": self.inner_steps * n_refine}  # fmt: skip

    def expected_unet_evaluations(self) -> tuple[int, int]:
        """``(forwards, backwards)`` of the UNet per image when no map localises early."""
        costs = self.expected_costs()
        return costs["unet_forward"], costs["unet_backward"]

    # -- text and attention ---------------------------------------------------------------------------------------

    def _tokens(self, texts: list[str]) -> Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids  # fmt: skip

    def _embed(self, ids: Tensor) -> Tensor:
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def _token_mean(self, embeddings: Tensor, ids: Tensor) -> Tensor:
        """Mean over each prompt's own tokens (start token up to the end token, no padding), float32 ``[B, d]``."""
        eos = self.tokenizer.eos_token_id
        positions = torch.arange(ids.shape[1])
        ends = torch.tensor([row.index(eos, 1) + 1 if eos in row[1:] else len(row) for row in ids.tolist()])
        keep = (positions[None] < ends[:, None]).to(embeddings.device, torch.float32).unsqueeze(-1)
        return (embeddings.float() * keep).sum(1) / keep.sum(1)

    def token_weights(self, prompts: list[AnomalyPrompt], ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights, valid)`` over the token axis: weights average the defect words' tokens; ``valid`` marks the
        prompt's own tokens (no start, end or padding token), over which the softmax runs."""
        weights = torch.zeros(ids.shape, dtype=torch.float32)
        valid = torch.zeros(ids.shape, dtype=torch.bool)
        eos = self.tokenizer.eos_token_id
        for row, prompt in enumerate(prompts):  # tokenisation is host-side string work, one row per prompt
            seq = ids[row].tolist()
            end = seq.index(eos, 1) if eos in seq[1:] else len(seq)
            valid[row, 1:end] = True
            word = self.tokenizer(" " + prompt.defect, add_special_tokens=False).input_ids
            starts = [s for s in range(1, end - len(word) + 1) if seq[s : s + len(word)] == word]
            if not word or not starts:
                msg = f"defect {prompt.defect!r} is not among the tokens of {prompt.anomaly_text!r} (truncated?)"
                raise ValueError(msg)
            weights[row, starts[-1] : starts[-1] + len(word)] = 1.0 / len(word)
        return weights, valid

    def anomaly_map(self, store: AttentionStore, weights: Tensor, valid: Tensor) -> Tensor:
        """Smoothed ``[B, 1, r, r]`` attention of the defect words (token softmax over the prompt's tokens)."""
        maps = store.maps().float()  # [B, T, r, r]
        logits = (maps * self.token_scale).masked_fill(~valid.to(maps.device)[:, :, None, None], float("-inf"))
        probs = logits.softmax(dim=1)
        amap = (probs * weights.to(maps.device)[:, :, None, None]).sum(1, keepdim=True)
        k, sigma = self.smoothing
        return gaussian_blur2d(amap, (k, k), (sigma, sigma), border_type="reflect")

    @staticmethod
    def attention_cells(amap: Tensor) -> Tensor:
        """``n_t``: cells of the max-normalised map at or above its mean, per sample."""
        norm = amap / amap.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        return (norm >= norm.mean(dim=(1, 2, 3), keepdim=True)).flatten(1).sum(1)

    def _clip_image_features(self, images: Tensor) -> Tensor:
        pixels = clip_pixels(images, self.clip.config.vision_config.image_size, self.clip.dtype)
        out = self.clip.get_image_features(pixel_values=pixels)
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)

    def _clip_text_features(self, texts: list[str]) -> Tensor:
        ids = self.clip_tokenizer(texts, padding=True, truncation=True, return_tensors="pt").input_ids
        out = self.clip.get_text_features(input_ids=ids.to(self.clip.device))
        return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)

    # -- sampling -------------------------------------------------------------------------------------------------

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        with torch.enable_grad():
            generated, amap, trace = self._sample(images, params)
        mask = self._output_mask(amap, params["fg"])
        keep = mask if self.paste_back == "mask" else params["fg"]
        out = composite(images, generated.to(images.device), keep)
        params = {**params, **{k: v.to(images.device) for k, v in trace.items()}}
        return self._result(images, out, mask, params, self._param_keys)

    def _output_mask(self, amap: Tensor, fg: Tensor) -> Tensor:
        """Final map -> binary mask at input size, inside the foreground, never empty (at least its peak)."""
        norm = amap / amap.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        up = F.interpolate(norm, size=fg.shape[-2:], mode="bilinear", align_corners=False).to(fg.device)
        threshold = norm.mean(dim=(1, 2, 3), keepdim=True) if self.mask_threshold is None else self.mask_threshold
        threshold = torch.as_tensor(threshold, device=fg.device, dtype=up.dtype)
        best = up.masked_fill(~fg, float("-inf")).amax(dim=(1, 2, 3), keepdim=True)
        return (up >= torch.minimum(threshold, best)) & fg

    def _sample(self, images: Tensor, params: Params) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        device, dtype = self.model_device, self.unet.dtype
        b, size = images.shape[0], self.resolution
        prompts = self.prompt_texts(params)
        latent_size = size // vae_scale_factor(self.vae)
        res = self.attention_res or attention_resolution(self.unet, latent_size)
        fg_att = (F.interpolate(params["fg"].float(), size=(res, res), mode="area") > 0).to(device)
        fg_latent = latent_mask(params["fg"], (latent_size, latent_size)).to(device)
        gens = generators_for(params["seed"])

        ids = self._tokens([p.anomaly_text for p in prompts])
        weights, valid = self.token_weights(prompts, ids)
        detailed_ids = self._tokens([p.detailed_text for p in prompts])
        with torch.no_grad():  # float32 master copies of everything that is optimised or blended
            cond = self._embed(ids).float()
            uncond = self._embed(self._tokens([""] * b)).float()
            detailed_mean = self._token_mean(self._embed(detailed_ids), detailed_ids)
            clip_text = self._clip_text_features([p.detailed_text for p in prompts])
            z0 = encode(self.vae, to_model_size(images, size).to(device), gens).float()

        scheduler = self.make_scheduler()
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        n = self.executed_steps()
        timesteps = scheduler.timesteps[len(scheduler.timesteps) - n :]
        z = noise_to_timestep(scheduler, z0, timesteps[0], noise_like(z0, gens)).float()

        forwards = backwards = 0
        logs: dict[str, list[Tensor]] = {key: [] for key in ("n_t", "attention_loss", "image_loss", "latent_step",
                                                             "prompt_step")}  # fmt: skip
        n_start: Tensor | None = None
        active = torch.ones(b, dtype=torch.bool, device=device)
        store = attach_attention_store(self.unet, AttentionStore(res))
        try:
            steps = tqdm(timesteps, desc="anomalyany", leave=False, disable=not self.progress)
            for i, t in enumerate(steps):
                attend, refine = self.guided(i)
                attend = attend and bool(active.any())
                if (attend or refine) and self.inner_steps > 0:
                    z_before, cond_before = z, cond
                    lr = max(self.lr_min, self.lr - self.lr_decay * i)
                    prompt_lr = max(self.lr_min, self.prompt_lr - self.lr_decay * i)
                    for _ in range(self.inner_steps):
                        z = z.detach().requires_grad_(True)
                        cond = cond.detach().requires_grad_(True)
                        store.reset()
                        store.cfg_batch = False
                        eps = self.unet(z.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()
                        forwards += 1
                        amap = self.anomaly_map(store, weights, valid)
                        n_t = self.attention_cells(amap)
                        n_start = n_t.clamp_min(1).float() if n_start is None else n_start
                        l_att = 1 - (amap * fg_att).flatten(1).amax(1)
                        loss = (self.attention_weight(i, n_t, n_start) * l_att * (active & attend)).sum()
                        logs["attention_loss"].append(l_att.detach())
                        if refine:
                            latent = self.image_loss_input == "latent"
                            source = z if latent else predicted_original(scheduler, z, eps, t)
                            l_img = 1 - (self._clip_image_features(decode(self.vae, source)) * clip_text).sum(-1)
                            loss = loss + self.image_loss_weight * l_img.sum()
                            logs["image_loss"].append(l_img.detach())
                        l_prompt = 1 - F.cosine_similarity(self._token_mean(cond, ids), detailed_mean, dim=-1)
                        loss = loss + self.prompt_loss_weight * l_prompt.sum()
                        grad_z, grad_cond = torch.autograd.grad(loss, [z, cond], allow_unused=True)
                        backwards += 1
                        if grad_z is not None:
                            z = z - 2 * lr * grad_z
                        if grad_cond is not None:
                            cond = cond - prompt_lr * grad_cond
                    z, cond = z.detach(), cond.detach()
                    logs["latent_step"].append((z - z_before).flatten(1).square().mean(1).sqrt())
                    logs["prompt_step"].append((cond - cond_before).flatten(1).square().mean(1).sqrt())
                    if attend and self.localized_range is not None:
                        lo, hi = (v * res * res for v in self.localized_range)
                        active = active & ~((n_t > lo) & (n_t < hi))
                with torch.no_grad():
                    store.reset()
                    store.cfg_batch = True
                    eps_u, eps_c = self.unet(torch.cat([z, z]).to(dtype), t,
                                             encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)
                                             ).sample.float().chunk(2)  # fmt: skip
                    forwards += 2
                    final_map = self.anomaly_map(store, weights, valid)
                    logs["n_t"].append(self.attention_cells(final_map))
                    eps = eps_u + self.guidance_scale * (eps_c - eps_u)
                    z = scheduler.step(eps, t, z).prev_sample.float()
                    if self.mask_blending:
                        reference = (noise_to_timestep(scheduler, z0, timesteps[i + 1], noise_like(z0, gens))
                                     if i + 1 < n else z0)  # fmt: skip
                        z = z * fg_latent + reference * (1 - fg_latent)
            with torch.no_grad():
                generated = decode(self.vae, z)
        finally:
            store.detach()

        def per_sample(log: list[Tensor]) -> Tensor:
            return torch.stack(log, 1).float() if log else torch.zeros(b, 0, device=device)

        trace = {key: per_sample(log) for key, log in logs.items()}
        trace["unet_forward"] = torch.full((b,), forwards, dtype=torch.long)
        trace["unet_backward"] = torch.full((b,), backwards, dtype=torch.long)
        return generated, final_map, trace
