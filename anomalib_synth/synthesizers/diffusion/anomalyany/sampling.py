"""The guided sampling loop of AnomalyAny (arXiv 2406.01078, Sec. 3.1-3.3), one call over a batch.

:class:`GuidedSampling` runs, in named steps:

1. :meth:`~GuidedSampling.prepare_text` and :meth:`~GuidedSampling.prepare_latents`: **test-time normal-sample
   conditioning** (Sec. 3.1). The normal image is encoded and noised to the first of the ``n = int(N gamma)``
   executed timesteps (:mod:`.schedule`); the prompts are embedded once.
2. Per executed step ``i``:

   - :meth:`~GuidedSampling.guide`: ``inner_steps`` (10) gradient iterations (:meth:`~GuidedSampling.iterate`) on
     the latent ``z_t`` and the anomaly-prompt embedding, each one conditional UNet forward with the cross-attention
     store, one joint loss ``alpha_t L_att + w_img L_img + w_prompt L_prompt`` (:mod:`.losses`; the terms:
     :meth:`~GuidedSampling.attention_term`, :meth:`~GuidedSampling.image_term`,
     :meth:`~GuidedSampling.prompt_term`) and one backward that gives both gradients (the official code runs two).
     Updates: ``z -= 2 lr grad`` and ``E -= prompt_lr grad`` (**attention-guided optimisation**, Sec. 3.2, Eq. 3-5,
     and **prompt-guided refinement**, Sec. 3.3, Eq. 6-7). Then the opt-in stop rule.
   - :meth:`~GuidedSampling.denoise`: one classifier-free-guided DDIM step; its conditional half's map is the
     candidate output map (Sec. 3.4).
   - :meth:`~GuidedSampling.blend_background`: ``z_t = m z_t + (1 - m) z_t^normal`` outside the foreground ``m``,
     with ``z_t^normal`` the normal latent noised to the next timestep with fresh noise, as the official code does.

3. :meth:`~GuidedSampling.trace`: per-sample logs and UNet counts for ``params``.

*Sampler:* always DDIM (eta 0) on the checkpoint's noise schedule, as in the Attend-and-Excite family. The official
code keeps the checkpoint's scheduler, PNDM for SD 1.5, whose stateful PLMS step discards the guided update of the
second executed step and then lags the schedule by one step; DDIM is stateless and correct when started partway in.

*Not run* (departures): the official extra Attend-and-Excite block (at executed steps ``i < 10`` while the map is
not localised, 5 + 1 more latent steps of size ``scale_factor sqrt(...)`` when ``i`` is a key of
``thresholds={0, 10, 20}`` and the peak attention is below ``thresholds[i]``, so in practice only at the first step
and only if the peak is under 0.05), and the official pre-alignment of the anomaly-token embedding (20 steps before
sampling). The official loop also runs a grad-enabled CFG forward whose output is unused, at every step.

**Precision.** The optimised variables (latent, anomaly-prompt embedding) are float32 master copies, cast to the
weights' dtype for each forward: under ``torch_dtype="float16"`` an update of ``0.02 grad`` would fall below fp16
resolution and vanish.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ...base import Params
from ..attention import AttentionStore, attach_attention_store
from ..common import to_model_size
from ..latents import (
    decode,
    encode,
    generators_for,
    latent_mask,
    noise_like,
    noise_to_timestep,
    predicted_original,
    vae_scale_factor,
)
from ..prompts import AnomalyPrompt
from .anomaly_map import attention_resolution
from .losses import attention_loss, clip_text_features, image_loss, prompt_loss, token_mean
from .schedule import localized, step_size

if TYPE_CHECKING:
    from .synthesizer import AnomalyAnySynthesizer

__all__ = ["GuidedSampling", "TRACE_KEYS"]

TRACE_KEYS = ("n_t", "attention_loss", "image_loss", "latent_step", "prompt_step")
"""Per-step logs of a call: ``n_t`` per executed step, the losses per guided iteration, the RMS latent and
prompt-embedding moves per guided step."""


class GuidedSampling:
    """One guided sampling call of :class:`~.synthesizer.AnomalyAnySynthesizer` over ``images`` ``[B, C, H, W]``.

    Reads the synthesizer's models and options; holds the loop state: the latent ``z``, the anomaly-prompt
    embedding ``cond`` (float32 master copies), the stop-rule flags ``active``, ``n_start``, the last maps, the logs
    and the UNet counts. :meth:`run` returns ``(generated images, final map, trace)``.
    """

    def __init__(self, synth: AnomalyAnySynthesizer, images: Tensor, params: Params) -> None:
        self.synth = synth
        self.device, self.dtype = synth.model_device, synth.unet.dtype
        self.batch = images.shape[0]
        latent_size = synth.resolution // vae_scale_factor(synth.vae)
        self.res = synth.attention_res or attention_resolution(synth.unet, latent_size)
        fg = params["fg"]
        self.fg_att = (F.interpolate(fg.float(), size=(self.res, self.res), mode="area") > 0).to(self.device)
        self.fg_latent = latent_mask(fg, (latent_size, latent_size)).to(self.device)
        self.generators = generators_for(params["seed"])
        self.prepare_text(synth.prompt_texts(params))
        self.prepare_latents(images)
        self.forwards = self.backwards = 0
        self.logs: dict[str, list[Tensor]] = {key: [] for key in TRACE_KEYS}
        self.n_start: Tensor | None = None
        self.n_t: Tensor | None = None
        self.final_map: Tensor | None = None
        self.active = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        self.store = AttentionStore(self.res)

    # -- preparation (Sec. 3.1) ---------------------------------------------------------------------------------

    def prepare_text(self, prompts: list[AnomalyPrompt]) -> None:
        """Token ids and defect-word weights of the anomaly prompts; float32 embeddings of the anomaly prompts
        (``cond``, optimised), the empty prompt (``uncond``) and the detailed prompts (``E_detailed`` and CLIP's)."""
        synth = self.synth
        self.ids = synth._tokens([p.anomaly_text for p in prompts])
        self.weights, self.valid = synth.token_weights(prompts, self.ids)
        detailed_ids = synth._tokens([p.detailed_text for p in prompts])
        with torch.no_grad():
            self.cond = synth._embed(self.ids).float()
            self.uncond = synth._embed(synth._tokens([""] * self.batch)).float()
            eos = synth.tokenizer.eos_token_id
            self.detailed_mean = token_mean(synth._embed(detailed_ids), detailed_ids, eos)
            self.clip_text = clip_text_features(synth.clip, synth.clip_tokenizer, [p.detailed_text for p in prompts])

    def prepare_latents(self, images: Tensor) -> None:
        """``z0`` of the normal images, the DDIM schedule's last ``n`` timesteps, and ``z`` = ``z0`` noised to the
        first of them (each sample's noise from its own generator)."""
        synth = self.synth
        with torch.no_grad():
            pixels = to_model_size(images, synth.resolution).to(self.device)
            self.z0 = encode(synth.vae, pixels, self.generators).float()
        self.scheduler = synth.make_scheduler()
        self.scheduler.set_timesteps(synth.num_inference_steps, device=self.device)
        self.n = synth.executed_steps()
        self.timesteps = self.scheduler.timesteps[len(self.scheduler.timesteps) - self.n :]
        self.z = self.noised_normal(0).float()

    def noised_normal(self, i: int) -> Tensor:
        """``z0`` noised to executed timestep ``i`` with fresh noise (``z0`` itself past the last one)."""
        if i >= self.n:
            return self.z0
        return noise_to_timestep(self.scheduler, self.z0, self.timesteps[i], noise_like(self.z0, self.generators))

    # -- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Guide, denoise and blend at every executed step, then decode: ``(images [B, 3, s, s], final map, trace)``."""
        with self.attached():
            steps = tqdm(self.timesteps, desc="anomalyany", leave=False, disable=not self.synth.progress)
            for i, t in enumerate(steps):
                self.guide(i, t)
                self.denoise(i, t)
            with torch.no_grad():
                generated = decode(self.synth.vae, self.z)
        return generated, self.final_map, self.trace()

    @contextmanager
    def attached(self) -> Iterator[None]:
        """The attention store on the UNet's cross-attention layers while inside (their processors back after);
        :meth:`guide` and :meth:`denoise` read the maps it captures."""
        attach_attention_store(self.synth.unet, self.store)
        try:
            yield
        finally:
            self.store.detach()

    def guide(self, i: int, t: Tensor) -> None:
        """The guided optimisation of executed step ``i``: ``inner_steps`` iterations when ``L_att`` (for a sample
        not yet localised) or ``L_img`` applies; logs the RMS moves; applies the stop rule."""
        synth = self.synth
        attend, refine = synth.guided(i)
        attend = attend and bool(self.active.any())
        if not (attend or refine) or synth.inner_steps <= 0:
            return
        z_before, cond_before = self.z, self.cond
        lr = step_size(i, synth.lr, synth.lr_decay, synth.lr_min)
        prompt_lr = step_size(i, synth.prompt_lr, synth.lr_decay, synth.lr_min)
        for _ in range(synth.inner_steps):
            self.iterate(i, t, attend, refine, lr, prompt_lr)
        self.z, self.cond = self.z.detach(), self.cond.detach()
        self.logs["latent_step"].append((self.z - z_before).flatten(1).square().mean(1).sqrt())
        self.logs["prompt_step"].append((self.cond - cond_before).flatten(1).square().mean(1).sqrt())
        if attend and synth.localized_range is not None:
            self.active = self.active & ~localized(self.n_t, synth.localized_range, self.res)

    def iterate(self, i: int, t: Tensor, attend: bool, refine: bool, lr: float, prompt_lr: float) -> None:
        """One guided iteration: the joint loss, one backward, ``z -= 2 lr grad_z``, ``cond -= prompt_lr grad_E``."""
        z = self.z.detach().requires_grad_(True)
        cond = self.cond.detach().requires_grad_(True)
        loss, eps = self.attention_term(z, cond, i, t, attend)
        if refine:
            loss = loss + self.image_term(z, eps, t)
        loss = loss + self.prompt_term(cond)
        grad_z, grad_cond = torch.autograd.grad(loss, [z, cond], allow_unused=True)
        self.backwards += 1
        self.z = z if grad_z is None else z - 2 * lr * grad_z
        self.cond = cond if grad_cond is None else cond - prompt_lr * grad_cond

    def attention_term(self, z: Tensor, cond: Tensor, i: int, t: Tensor, attend: bool) -> tuple[Tensor, Tensor]:
        """Conditional UNet forward with the store; ``sum_b alpha_t L_att`` (zero for samples that stopped, or when
        ``attend`` is off) and the noise prediction. Sets ``n_t``, and ``n_start`` at the first guided iteration."""
        synth = self.synth
        self.store.reset()
        self.store.cfg_batch = False
        eps = synth.unet(z.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample.float()
        self.forwards += 1
        amap = synth.anomaly_map(self.store, self.weights, self.valid)
        self.n_t = synth.attention_cells(amap)
        self.n_start = self.n_t.clamp_min(1).float() if self.n_start is None else self.n_start
        l_att = attention_loss(amap, self.fg_att)
        self.logs["attention_loss"].append(l_att.detach())
        return (synth.attention_weight(i, self.n_t, self.n_start) * l_att * (self.active & attend)).sum(), eps

    def image_term(self, z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``w_img sum_b L_img`` on the decoded ``z_t`` (``image_loss_input="latent"``, official) or on the decoded
        prediction ``x0_hat`` (``"prediction"``, whose gradient goes back through the UNet)."""
        synth = self.synth
        source = z if synth.image_loss_input == "latent" else predicted_original(self.scheduler, z, eps, t)
        l_img = image_loss(synth.clip, decode(synth.vae, source), self.clip_text)
        self.logs["image_loss"].append(l_img.detach())
        return synth.image_loss_weight * l_img.sum()

    def prompt_term(self, cond: Tensor) -> Tensor:
        """``w_prompt sum_b L_prompt`` of the anomaly-prompt embedding ``cond``."""
        l_prompt = prompt_loss(cond, self.ids, self.detailed_mean, self.synth.tokenizer.eos_token_id)
        return self.synth.prompt_loss_weight * l_prompt.sum()

    @torch.no_grad()
    def denoise(self, i: int, t: Tensor) -> None:
        """One classifier-free-guided DDIM step (two UNet forwards); keeps the conditional half's map as
        ``final_map`` and logs its ``n_t``; then :meth:`blend_background`."""
        synth = self.synth
        self.store.reset()
        self.store.cfg_batch = True
        latents = torch.cat([self.z, self.z]).to(self.dtype)
        context = torch.cat([self.uncond, self.cond]).to(self.dtype)
        eps_u, eps_c = synth.unet(latents, t, encoder_hidden_states=context).sample.float().chunk(2)
        self.forwards += 2
        self.final_map = synth.anomaly_map(self.store, self.weights, self.valid)
        self.logs["n_t"].append(synth.attention_cells(self.final_map))
        eps = eps_u + synth.guidance_scale * (eps_c - eps_u)
        self.z = self.scheduler.step(eps, t, self.z).prev_sample.float()
        if synth.mask_blending:
            self.blend_background(i)

    def blend_background(self, i: int) -> None:
        """``z = m z + (1 - m) z_{t-1}^normal``: the noised normal latent outside the foreground (Sec. 3.1)."""
        self.z = self.z * self.fg_latent + self.noised_normal(i + 1) * (1 - self.fg_latent)

    def trace(self) -> dict[str, Tensor]:
        """Per-sample ``[B, steps]`` logs (float32) and the UNet forward/backward counts of the call (long ``[B]``)."""

        def per_sample(log: list[Tensor]) -> Tensor:
            return torch.stack(log, 1).float() if log else torch.zeros(self.batch, 0, device=self.device)

        trace = {key: per_sample(log) for key, log in self.logs.items()}
        trace["unet_forward"] = torch.full((self.batch,), self.forwards, dtype=torch.long)
        trace["unet_backward"] = torch.full((self.batch,), self.backwards, dtype=torch.long)
        return trace
