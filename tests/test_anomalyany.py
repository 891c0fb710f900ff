"""AnomalyAny's parts, one module at a time: the anomaly map, the losses, the schedule, and the named steps of the
guided sampling loop (on the tiny random-weight models). End-to-end behaviour is in test_diffusion.py."""

from __future__ import annotations

import pytest
import torch
from conftest import gen
from tiny_data import ANOMALYANY_FAST

from anomalib_synth.synthesizers import get
from anomalib_synth.synthesizers.diffusion import anomalyany
from anomalib_synth.synthesizers.diffusion.anomalyany import GuidedSampling
from anomalib_synth.synthesizers.diffusion.anomalyany.anomaly_map import anomaly_map, attention_cells, output_mask
from anomalib_synth.synthesizers.diffusion.anomalyany.losses import (
    attention_loss,
    clip_image_features,
    image_loss,
    prompt_loss,
    token_mean,
)
from anomalib_synth.synthesizers.diffusion.anomalyany.schedule import localized, step_kinds, step_size, unet_costs
from anomalib_synth.synthesizers.diffusion.attention import StoreCrossAttnProcessor
from anomalib_synth.synthesizers.diffusion.latents import noise_to_timestep

FAST = ANOMALYANY_FAST
NO_BLUR = (1, 1.0)  # a 1x1 Gaussian kernel: the identity


@pytest.fixture(scope="module")
def synth(tiny):
    return get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", **FAST)


def test_package_exports_and_registry_target() -> None:
    from anomalib_synth.synthesizers import get_class

    assert set(anomalyany.__all__) == {"AnomalyAnySynthesizer", "GuidedSampling", "attention_resolution"}
    assert get_class("anomalyany") is anomalyany.AnomalyAnySynthesizer
    assert "training-free" in anomalyany.__doc__ and "no Lightning module" in " ".join(anomalyany.__doc__.split())


# -- anomaly map (Sec. 3.2, 3.4) --------------------------------------------------------------------------------------


def test_anomaly_map_softmax_runs_over_the_prompts_own_tokens_only() -> None:
    maps = torch.zeros(1, 6, 4, 4)
    maps[0, 2, 1, 1] = 0.5  # the defect word (token 2) attends to one cell
    maps[0, 5] = 3.0  # padding: huge everywhere, but outside the softmax
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[False, True, True, True, False, False]])
    amap = anomaly_map(maps, weights, valid, token_scale=100.0, smoothing=NO_BLUR)
    assert amap.shape == (1, 1, 4, 4) and amap.dtype == torch.float32
    expected = torch.full((4, 4), 1 / 3)  # three valid tokens, equal logits
    expected[1, 1] = 1 / (1 + 2 * torch.exp(torch.tensor(-50.0)))
    torch.testing.assert_close(amap[0, 0], expected)
    assert attention_cells(amap).tolist() == [1], "the flat 1/3 cells lie under the mean (0.375) of the normalised map"
    smoothed = anomaly_map(maps, weights, valid, token_scale=100.0, smoothing=(3, 0.5))
    assert smoothed.flatten().argmax() == 5 and smoothed.max() < amap.max(), "smoothing spreads the peak"


def test_attention_cells_and_output_mask() -> None:
    amap = torch.zeros(2, 1, 4, 4)
    amap[0, 0, 0, 0] = 1.0  # one hot cell
    amap[1, 0, 2:, 2:] = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    assert attention_cells(amap).tolist() == [1, 4]  # sample 1: normalised 0.25-1 over a mean of 2.5 / 16
    fg = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    fg[0, :, :4, :4] = False  # the foreground misses sample 0's peak
    mask = output_mask(amap, fg, threshold=0.5)
    assert not (mask & ~fg).any() and mask.flatten(1).any(1).all(), "inside the foreground and never empty"
    assert mask[1, 0, 7, 7] and not mask[1, 0, 0, 0]
    assert output_mask(amap, fg, threshold=None)[1].sum() > mask[1].sum(), "the mean is a lower threshold here"


# -- losses (Sec. 3.2, Eq. 3-4; Sec. 3.3, Eq. 6-7) ----------------------------------------------------------------------


def test_attention_loss_is_one_minus_the_peak_inside_the_foreground() -> None:
    amap = torch.zeros(1, 1, 4, 4)
    amap[0, 0, 0, 0], amap[0, 0, 3, 3] = 0.9, 0.8
    fg = torch.zeros(1, 1, 4, 4)
    fg[..., 2:, 2:] = 1
    torch.testing.assert_close(attention_loss(amap, fg), torch.tensor([0.2]))
    torch.testing.assert_close(attention_loss(amap, torch.ones_like(fg)), torch.tensor([0.1]))


def test_token_mean_and_prompt_loss() -> None:
    eos = 9
    ids = torch.tensor([[1, 5, 6, eos, eos, eos], [1, 5, eos, eos, eos, eos]])
    embeddings = torch.arange(12.0).reshape(1, 6, 2).expand(2, -1, -1)
    # start token up to and including the end token, no padding
    torch.testing.assert_close(token_mean(embeddings, ids, eos), torch.tensor([[3.0, 4.0], [2.0, 3.0]]))
    target = token_mean(embeddings, ids, eos)
    torch.testing.assert_close(prompt_loss(embeddings, ids, target, eos), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(prompt_loss(embeddings, ids, -target, eos), torch.full((2,), 2.0))


def test_image_loss_is_zero_for_the_images_own_features(synth, photos) -> None:
    images = photos[:2]
    with torch.no_grad():
        own = clip_image_features(synth.clip, images)
        torch.testing.assert_close(own.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(image_loss(synth.clip, images, own), torch.zeros(2), atol=1e-6, rtol=0)
        swapped = image_loss(synth.clip, images, own.flip(0))
    assert (swapped > 1e-4).all()


# -- schedule (Sec. 3.1-3.3, Eq. 5) -----------------------------------------------------------------------------------


def test_schedule_steps_sizes_stop_rule_and_costs() -> None:
    flags = [step_kinds(i, 4, attention_steps=2, refine_fraction=0.5) for i in range(4)]
    assert flags == [(True, False), (True, False), (False, False), (False, True)]
    assert [step_kinds(i, 4, None, 0.0) for i in range(4)] == [(True, False)] * 4
    assert step_size(0, 0.02, 1e-4, 1e-4) == 0.02 and step_size(10, 0.02, 1e-4, 1e-4) == pytest.approx(0.019)
    assert step_size(1000, 0.02, 1e-4, 1e-4) == 1e-4
    n_t = torch.tensor([5, 10, 30, 50, 60])
    assert localized(n_t, (10 / 256, 50 / 256), 16).tolist() == [False, False, True, False, False]
    assert unet_costs(flags, inner_steps=2) == {"unet_forward": 14, "unet_backward": 6, "vae_decode": 2,
                                                "clip_image": 2}  # fmt: skip
    assert unet_costs(flags, inner_steps=0)["unet_forward"] == 8


# -- the sampling loop, step by step ---------------------------------------------------------------------------------


def _sampling(synth, photos, fg=None, seed=0) -> GuidedSampling:
    images = photos[:2]
    return GuidedSampling(synth, images, synth.sample_params(images, fg, gen(seed)))


def test_prepare_starts_from_the_normal_latent_noised_to_the_first_executed_step(synth, photos) -> None:
    s = _sampling(synth, photos)
    assert s.n == 4 and s.timesteps.tolist() == [376, 251, 126, 1]  # the last 4 of DDIM's 8 (leading, offset 1)
    assert s.z.dtype == s.cond.dtype == torch.float32 and s.cond.shape == s.uncond.shape
    again = _sampling(synth, photos)
    assert torch.equal(again.z0, s.z0) and torch.equal(again.z, s.z), "same seed, same start"
    noise_seen = (s.z - noise_to_timestep(s.scheduler, s.z0, s.timesteps[0], torch.zeros_like(s.z0))).abs().mean()
    assert noise_seen > 0.1, "noised, not the clean latent"
    assert not torch.equal(_sampling(synth, photos, seed=1).z, s.z)


def test_gradients_reach_the_latent_and_the_prompt(synth, photos) -> None:
    s = _sampling(synth, photos)
    z = s.z.detach().requires_grad_(True)
    cond = s.cond.detach().requires_grad_(True)
    t = s.timesteps[1]
    with s.attached(), torch.enable_grad():
        att, eps = s.attention_term(z, cond, 1, t, attend=True)  # the official weight is > 0 from step 1 on
        grad_z, grad_cond = torch.autograd.grad(att, [z, cond])
        (img_grad,) = torch.autograd.grad(s.image_term(z, eps, t), [z])
        (prompt_grad,) = torch.autograd.grad(s.prompt_term(cond), [cond])
    for grad in (grad_z, grad_cond, img_grad, prompt_grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert s.forwards == 1 and len(s.logs["attention_loss"]) == 1 and len(s.logs["image_loss"]) == 1
    assert s.n_start is not None and torch.equal(s.n_start, s.n_t.clamp_min(1).float())
    with s.attached():
        stopped, _ = s.attention_term(z.detach(), cond.detach(), 1, t, attend=False)
    assert stopped.item() == 0.0, "no L_att when attention guidance is off"


def test_guided_iterations_lower_the_prompt_loss_and_count_passes(synth, photos) -> None:
    s = _sampling(synth, photos)
    t = s.timesteps[2]
    losses = []
    with s.attached(), torch.enable_grad():
        for _ in range(3):
            losses.append(s.prompt_term(s.cond).item())
            s.iterate(2, t, attend=False, refine=False, lr=0.02, prompt_lr=0.5)
    losses.append(s.prompt_term(s.cond).item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert (s.forwards, s.backwards) == (3, 3)


def test_guide_and_denoise_follow_the_schedule(synth, photos) -> None:
    s = _sampling(synth, photos)
    with s.attached(), torch.enable_grad():
        s.guide(2, s.timesteps[2])  # FAST: step 2 is neither attention-guided nor a refinement step
    assert (s.forwards, s.backwards) == (0, 0) and s.logs["latent_step"] == []
    with s.attached(), torch.enable_grad():
        s.guide(1, s.timesteps[1])
    assert (s.forwards, s.backwards) == (2, 2) and len(s.logs["latent_step"]) == 1
    assert s.logs["latent_step"][0].gt(0).all() and not s.z.requires_grad
    z = s.z.clone()
    with s.attached():
        s.denoise(1, s.timesteps[1])
    assert s.forwards == 4 and len(s.logs["n_t"]) == 1 and s.final_map.shape == (2, 1, s.res, s.res)
    assert not torch.equal(s.z, z)


def test_the_last_step_blends_the_clean_normal_latent_back_outside_the_foreground(synth, photos) -> None:
    fg = torch.zeros(2, 1, 96, 96, dtype=torch.bool)
    fg[..., 24:72, 24:72] = True
    s = _sampling(synth, photos, fg=fg)
    outside = s.fg_latent.expand_as(s.z) == 0
    assert outside.any() and (~outside).any()
    with s.attached():
        s.denoise(s.n - 1, s.timesteps[-1])
    assert torch.equal(s.z[outside], s.z0[outside])
    assert not torch.equal(s.z[~outside], s.z0[~outside])


def test_run_counts_equal_the_expected_evaluations(synth, photos) -> None:
    s = _sampling(synth, photos)
    generated, final_map, trace = s.run()
    forwards, backwards = synth.expected_unet_evaluations()
    assert trace["unet_forward"].tolist() == [forwards] * 2 and trace["unet_backward"].tolist() == [backwards] * 2
    assert (
        trace["n_t"].shape == (2, 4) and trace["attention_loss"].shape == (2, 6) and trace["image_loss"].shape == (2, 2)
    )
    assert generated.shape[:2] == (2, 3) and 0 <= generated.min() and generated.max() <= 1
    assert torch.equal(final_map, s.final_map)
    processors = synth.unet.attn_processors.values()
    assert not any(isinstance(p, StoreCrossAttnProcessor) for p in processors), "the store is detached"
