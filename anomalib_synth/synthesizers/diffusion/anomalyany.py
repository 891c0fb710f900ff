"""AnomalyAny: training-free anomaly generation with attention-guided Stable Diffusion (Sun et al., CVPR 2025,
"Unseen Visual Anomaly Generation", arXiv 2406.01078).

Per image, with frozen Stable Diffusion 1.5 and CLIP ViT-L/14:

1. **Test-time normal-sample conditioning** (Sec. 3.1): the normal image is encoded and noised to the timestep
   of step ``N (1 - gamma)`` of the ``N``-step schedule (about ``gamma T``), and only the remaining
   ``int(N gamma)`` steps are denoised. With a foreground mask ``m`` the latent is
   blended after every step, ``z_t = m z_t + (1 - m) z_t^normal`` (``z_t^normal``: the normal latent noised to ``t``
   with fresh noise, as the official code does).
2. **Attention-guided anomaly optimisation** (Sec. 3.2, Eq. 3-4): the cross-attention maps of the anomaly prompt at
   16x16 (for other sizes: the cross-attention resolution closest to latent/4), averaged over heads and layers,
   without the start token, scaled by 100 and soft-maxed over the prompt tokens, Gaussian-smoothed (k=3,
   sigma=0.5). ``L_att = 1 - max(A_anomaly * m)``; gradient steps on ``z_t`` in the first ``attention_steps``
   executed steps (10 inner iterations each, official ``lr = max(1e-4, 0.02 - 1e-4 i)``, update ``z -= 2 lr grad``).
3. **Localization-aware scheduler** (Sec. 3.2, Eq. 5): ``alpha_t = lambda (1 + delta_t t) n_t / n_{t_start}`` with
   ``n_t`` the number of attention cells at or above the mean of the max-normalised map. ``delta_t t`` is taken
   over the executed steps, ``1 - attention_decay * i / (n - 1)``, so the weight falls linearly from ``lambda`` to
   ``lambda (1 - attention_decay)`` as in the official ``scale_range = (1.0, 0.5)``. *Departure from the official
   code, on purpose:* the released code computes ``alpha_t`` and never uses it; we use it as the weight of
   ``L_att``. The stop rule is kept: a sample whose map is localised (``n_t`` within ``localized_range`` of the
   cells, official 10-50 of 256) gets no more attention guidance.
4. **Prompt-guided refinement** (Sec. 3.3, Eq. 6-7), in the last ``refine_fraction`` (30 %) of the executed steps:
   ``L_img = 1 - cos(CLIP_text(detailed), CLIP_image(x0_hat))`` on the decoded predicted clean image, and
   ``L_prompt = 1 - cos(E_anomaly, E_detailed)`` (token-averaged text-encoder embeddings), which also updates the
   anomaly prompt's embedding. The joint loss is ``w_img L_img + alpha_t L_att + w_prompt L_prompt``. *Departure:*
   the official pre-alignment of the anomaly-token embedding (20 steps before sampling) is not done; ``L_prompt``
   plays that role during refinement.
5. **Output mask** (Sec. 3.4): the last smoothed attention map of the anomaly words (from the conditional half of the
   final guided step), upsampled, thresholded (``mask_threshold``; ``None`` = at or above its mean, the official
   rule) and intersected with the foreground. *Departure:* the official code never saves a mask; we return it, and
   by default paste the input back outside it (``paste_back="mask"``) so that the label covers every changed pixel.

Cost per image (``params``): ``2 n_exec + I n_guided`` UNet forwards and ``I n_guided`` backwards, with ``n_exec =
int(N gamma)`` executed steps, ``I`` inner iterations and ``n_guided`` the steps with attention guidance or
refinement. Defaults (200 steps, gamma 0.25 -> 50 executed steps) stay within the official 200 x 0.3 = 60.
The official notebooks' setting is ``gamma=0.3``. On CPU this is for tiny test models only; real weights want a GPU
(the official code reports 1-2 min/image and ~30 GB on an A100 at 512 px; use ``torch_dtype="float16"``).
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

from ..base import Params, SynthesisResult
from ..registry import register
from ..validation import check_choice, check_range
from .attention import AttentionStore, attach_attention_store, cross_attention_resolutions
from .common import DiffusionSynthesizer, composite, to_model_size
from .latents import (
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
from .loading import CLIP_VIT_L14, SD15, load_pretrained, resolve_dtype
from .prompts import AnomalyPrompt

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
        attention_steps (int): executed steps with attention guidance. Defaults to ``25`` (``max_iter_to_alter``).
        inner_steps (int): gradient iterations per guided step. Defaults to ``10`` (official).
        lr (float), lr_decay (float), lr_min (float): inner step size ``max(lr_min, lr - lr_decay * i)`` at executed
            step ``i``; the update is ``z -= 2 * lr * grad`` (official). Defaults ``0.02``, ``1e-4``, ``1e-4``.
        attention_scale (float): ``lambda`` of the localization-aware weight. Defaults to ``0.5``.
        attention_decay (float): relative fall of that weight over the executed steps. Defaults to ``0.5``.
        localized_range (tuple[float, float] | None): fraction of attention cells with ``n_t`` inside which a map
            counts as localised and guidance stops; ``None`` never stops. Defaults to ``(10/256, 50/256)``.
        refine_fraction (float): last fraction of executed steps with prompt-guided refinement. Defaults to ``0.3``.
        image_loss_weight (float), prompt_loss_weight (float): weights of ``L_img`` and ``L_prompt``. Default ``1``.
        prompt_lr (float): step size of the prompt-embedding update. Defaults to ``0.1``.
        token_scale (float): attention logits are multiplied by this before the token softmax. Defaults to ``100``.
        smoothing (tuple[int, float]): Gaussian kernel size and sigma of the maps. Defaults to ``(3, 0.5)``.
        mask_threshold (float | None): threshold of the max-normalised final map; ``None`` = its mean.
        mask_blending (bool): blend the latent with the noised normal latent outside the foreground every step.
        paste_back (str): ``"mask"`` (input kept outside the returned mask) or ``"foreground"`` (kept outside the
            foreground only, as the paper's images; the label then misses benign changes). Defaults to ``"mask"``.
        torch_dtype (str | torch.dtype | None): weights dtype. Defaults to float32.
        local_files_only (bool | None): never contact the Hub (``None`` follows ``HF_HUB_OFFLINE``).
        attention_slicing (bool): sliced self-attention, to save memory at some speed. Defaults to ``False``.
        **kwargs: prompt and resolution options of
            :class:`~anomalib_synth.synthesizers.diffusion.common.DiffusionSynthesizer`.

    Raises:
        ModelNotFoundError: when weights are neither local nor reachable.
        ValueError: for out-of-range options, or a defect word that the tokenizer truncates away.
    """

    description = "AnomalyAny: training-free, attention-guided Stable Diffusion from one normal image"
    draws_masks = False
    _param_keys = ("prompt", "seed", "unet_forward", "unet_backward", "n_t", "attention_loss", "image_loss")

    def __init__(
        self,
        model: str | Path = SD15,
        clip_model: str | Path = CLIP_VIT_L14,
        num_inference_steps: int = 200,
        gamma: float = 0.25,
        guidance_scale: float = 12.5,
        attention_res: int | None = None,
        attention_steps: int = 25,
        inner_steps: int = 10,
        lr: float = 0.02,
        lr_decay: float = 1e-4,
        lr_min: float = 1e-4,
        attention_scale: float = 0.5,
        attention_decay: float = 0.5,
        localized_range: tuple[float, float] | None = (10 / 256, 50 / 256),
        refine_fraction: float = 0.3,
        image_loss_weight: float = 1.0,
        prompt_loss_weight: float = 1.0,
        prompt_lr: float = 0.1,
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
        if inner_steps < 0 or attention_steps < 0:
            msg = f"inner_steps and attention_steps must be >= 0, got {inner_steps}, {attention_steps}"
            raise ValueError(msg)
        check_range("refine_fraction", (refine_fraction, refine_fraction), 0.0, 1.0)
        self.model, self.clip_model = str(model), str(clip_model)
        self.num_inference_steps, self.gamma, self.guidance_scale = (
            int(num_inference_steps),
            float(gamma),
            guidance_scale,
        )
        self.attention_res, self.attention_steps, self.inner_steps = (
            attention_res,
            int(attention_steps),
            int(inner_steps),
        )
        self.lr, self.lr_decay, self.lr_min = lr, lr_decay, lr_min
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
        self.token_scale, self.smoothing = token_scale, (int(smoothing[0]), float(smoothing[1]))
        self.mask_threshold, self.mask_blending = mask_threshold, mask_blending
        self.paste_back = check_choice("paste_back", paste_back, ("mask", "foreground"))
        self.torch_dtype = resolve_dtype(torch_dtype)

        pipe = load_pretrained(StableDiffusionPipeline, self.model, "AnomalyAny: Stable Diffusion", local_files_only,
                               dtype=self.torch_dtype, safety_checker=None, requires_safety_checker=False)  # fmt: skip
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.tokenizer, self.scheduler_config, self._scheduler_cls = (
            pipe.tokenizer,
            pipe.scheduler.config,
            type(pipe.scheduler),
        )
        self.clip = load_pretrained(CLIPModel, self.clip_model, "AnomalyAny: CLIP image loss", local_files_only,
                                    dtype=self.torch_dtype)  # fmt: skip
        self.clip_tokenizer = load_pretrained(CLIPTokenizer, self.clip_model, "AnomalyAny: CLIP tokenizer",
                                              local_files_only)  # fmt: skip
        if attention_slicing:  # self-attention only: attach_attention_store replaces the attn2 processors per call
            self.unet.set_attention_slice("auto")
        self._loaded()

    def config(self) -> dict[str, Any]:
        keys = ("model", "clip_model", "num_inference_steps", "gamma", "guidance_scale", "attention_res",
                "attention_steps", "inner_steps", "lr", "lr_decay", "lr_min", "attention_scale", "attention_decay",
                "refine_fraction", "image_loss_weight", "prompt_loss_weight", "prompt_lr", "token_scale",
                "mask_threshold", "mask_blending", "paste_back")  # fmt: skip
        config = {key: getattr(self, key) for key in keys}
        config["localized_range"] = None if self.localized_range is None else list(self.localized_range)
        config["smoothing"] = list(self.smoothing)
        config["torch_dtype"] = str(self.torch_dtype).removeprefix("torch.")
        return {**config, **self._base_config()}

    # -- schedule -------------------------------------------------------------------------------------------------

    def executed_steps(self) -> int:
        """Denoising steps run from the noised normal image: ``int(N * gamma)``."""
        return int(self.num_inference_steps * self.gamma)

    def guided(self, i: int) -> tuple[bool, bool]:
        """Whether executed step ``i`` gets attention guidance, and whether it is a refinement step."""
        n = self.executed_steps()
        refine = i >= n - math.ceil(self.refine_fraction * n) if self.refine_fraction > 0 else False
        return i < self.attention_steps, refine

    def expected_unet_evaluations(self) -> tuple[int, int]:
        """``(forwards, backwards)`` per image when no map localises early (``localized_range=None``)."""
        n = self.executed_steps()
        n_guided = sum(any(self.guided(i)) for i in range(n))
        return 2 * n + self.inner_steps * n_guided, self.inner_steps * n_guided

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
        with torch.no_grad():
            cond = self._embed(ids)
            uncond = self._embed(self._tokens([""] * b))
            detailed_mean = self._token_mean(self._embed(detailed_ids), detailed_ids)
            clip_text = self._clip_text_features([p.detailed_text for p in prompts])
            z0 = encode(self.vae, to_model_size(images, size).to(device), gens)

        scheduler = self._scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        n = self.executed_steps()
        timesteps = scheduler.timesteps[len(scheduler.timesteps) - n :]
        z = noise_to_timestep(scheduler, z0, timesteps[0], noise_like(z0, gens))

        forwards = backwards = 0
        n_t_log, att_log, img_log = [], [], []
        n_start: Tensor | None = None
        n_t: Tensor | None = None
        active = torch.ones(b, dtype=torch.bool, device=device)
        store = attach_attention_store(self.unet, AttentionStore(res))
        try:
            steps = tqdm(timesteps, desc="anomalyany", leave=False, disable=not self.progress)
            for i, t in enumerate(steps):
                attend, refine = self.guided(i)
                attend = attend and bool(active.any())
                if attend or refine:
                    lr = max(self.lr_min, self.lr - self.lr_decay * i)
                    for _ in range(self.inner_steps):
                        z = z.detach().requires_grad_(True)
                        cond = cond.detach().requires_grad_(refine)
                        store.reset()
                        store.cfg_batch = False
                        eps = self.unet(z.to(dtype), t, encoder_hidden_states=cond).sample.float()
                        forwards += 1
                        amap = self.anomaly_map(store, weights, valid)
                        n_t = self.attention_cells(amap)
                        n_start = n_t.clamp_min(1).float() if n_start is None else n_start
                        alpha = self.attention_scale * (1 - self.attention_decay * i / max(n - 1, 1)) * n_t / n_start
                        l_att = 1 - (amap * fg_att).flatten(1).amax(1)
                        loss = (alpha * l_att * active).sum()  # joint with L_img in the refinement steps
                        att_log.append(l_att.detach())
                        if refine:
                            x0 = decode(self.vae, predicted_original(scheduler, z, eps, t))
                            l_img = 1 - (self._clip_image_features(x0) * clip_text).sum(-1)
                            l_prompt = 1 - F.cosine_similarity(self._token_mean(cond, ids), detailed_mean, dim=-1)
                            loss = loss + (self.image_loss_weight * l_img + self.prompt_loss_weight * l_prompt).sum()
                            img_log.append(l_img.detach())
                        inputs = [z, cond] if refine else [z]
                        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                        backwards += 1
                        z = (z - 2 * lr * (grads[0] if grads[0] is not None else torch.zeros_like(z))).detach()
                        if refine and grads[1] is not None:
                            cond = (cond - self.prompt_lr * grads[1]).detach()
                    if attend and n_t is not None and self.localized_range is not None:
                        lo, hi = (v * res * res for v in self.localized_range)
                        active = active & ~((n_t > lo) & (n_t < hi))
                z, cond = z.detach(), cond.detach()
                with torch.no_grad():
                    store.reset()
                    store.cfg_batch = True
                    eps_u, eps_c = self.unet(torch.cat([z, z]).to(dtype), t,
                                             encoder_hidden_states=torch.cat([uncond, cond])).sample.float().chunk(2)  # fmt: skip
                    forwards += 2
                    final_map = self.anomaly_map(store, weights, valid)
                    n_t_log.append(self.attention_cells(final_map))
                    eps = eps_u + self.guidance_scale * (eps_c - eps_u)
                    z = scheduler.step(eps, t, z).prev_sample
                    if self.mask_blending:
                        reference = (noise_to_timestep(scheduler, z0, timesteps[i + 1], noise_like(z0, gens))
                                     if i + 1 < n else z0)  # fmt: skip
                        z = z.float() * fg_latent + reference.float() * (1 - fg_latent)
            with torch.no_grad():
                generated = decode(self.vae, z)
        finally:
            store.detach()

        def per_sample(log: list[Tensor]) -> Tensor:
            return torch.stack(log, 1).float() if log else torch.zeros(b, 0, device=device)

        trace = {
            "unet_forward": torch.full((b,), forwards, dtype=torch.long),
            "unet_backward": torch.full((b,), backwards, dtype=torch.long),
            "n_t": per_sample(n_t_log),
            "attention_loss": per_sample(att_log),
            "image_loss": per_sample(img_log),
        }
        return generated, final_map, trace
