"""Diffusion foundation, inpainting baseline and AnomalyAny, on tiny random models saved to a temp folder and loaded
through the public ``from_pretrained`` path. Tiny models prove mechanics, not image quality."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import gen
from PIL import Image
from tiny_data import ANOMALYANY_FAST

from anomalib_synth.synthesizers import get
from anomalib_synth.synthesizers.diffusion.anomalyany import attention_resolution
from anomalib_synth.synthesizers.diffusion.attention import (
    AttentionStore,
    StoreCrossAttnProcessor,
    attach_attention_store,
    cross_attention_resolutions,
)
from anomalib_synth.synthesizers.diffusion.loading import ModelNotFoundError, load_pretrained
from anomalib_synth.synthesizers.diffusion.prompts import load_captions, prompts_for

FAST = ANOMALYANY_FAST


@pytest.fixture(scope="module")
def anomalyany(tiny):
    return get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", **FAST)


@pytest.fixture(scope="module")
def inpainting(tiny):
    return get("inpainting", model=tiny["sd-inpainting"], category="bottle", num_inference_steps=3)


# -- loading ---------------------------------------------------------------------------------------------------------


def test_loading_round_trip_and_clear_errors(tiny, tmp_path) -> None:
    from diffusers import UNet2DConditionModel

    unet = load_pretrained(UNet2DConditionModel, tiny["sd"], "test UNet", subfolder="unet")
    assert unet.config.cross_attention_dim == 32
    with pytest.raises(ModelNotFoundError, match="does not exist") as missing:
        load_pretrained(UNet2DConditionModel, tmp_path / "nowhere", "my UNet", subfolder="unet")
    assert "my UNet" in str(missing.value) and str(tmp_path / "nowhere") in str(missing.value)
    with pytest.raises(ModelNotFoundError, match="hf download nobody/no-such-model"):
        load_pretrained(UNet2DConditionModel, "nobody/no-such-model", "my UNet", local_files_only=True)
    with pytest.raises(ModelNotFoundError, match="AnomalyAny: Stable Diffusion"):
        get("anomalyany", model=tmp_path / "empty-dir-that-is-missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="local folder"):
        get("inpainting", model=tmp_path / "empty")


def test_inpainting_refuses_a_text_to_image_model(tiny) -> None:
    with pytest.raises(ValueError, match="not an inpainting model"):
        get("inpainting", model=tiny["sd"])


# -- attention store -------------------------------------------------------------------------------------------------


def _unet_inputs(unet, batch: int = 2, seed: int = 0):
    g = gen(seed)
    latents = torch.randn(batch, 4, 16, 16, generator=g)
    context = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return latents, context


def test_attention_store_captures_cross_attention_only_and_changes_nothing(anomalyany) -> None:
    unet = anomalyany.unet
    latents, context = _unet_inputs(unet)
    with torch.no_grad():
        reference = unet(latents, 10, encoder_hidden_states=context).sample
    before = dict(unet.attn_processors)
    store = attach_attention_store(unet, AttentionStore(8))
    try:
        installed = unet.attn_processors
        assert all(isinstance(p, StoreCrossAttnProcessor) == (".attn2." in n) for n, p in installed.items())
        assert all(installed[n] is before[n] for n in installed if ".attn1." in n), "self-attention untouched"
        with torch.no_grad():
            out = unet(latents, 10, encoder_hidden_states=context).sample
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
        maps = store.maps()
        assert maps.shape == (2, 7, 8, 8) and store.num_layers == 4  # at 8x8: down 1, mid 1, up 2 layers
        torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8))
        with pytest.raises(RuntimeError, match="already attached"):
            attach_attention_store(unet, store)
    finally:
        store.detach()
    assert all(unet.attn_processors[n] is before[n] for n in before), "detach restores the original processors"


def test_attention_store_keeps_the_conditional_half_and_passes_gradients(anomalyany) -> None:
    unet = anomalyany.unet
    latents, context = _unet_inputs(unet, batch=1)
    store = attach_attention_store(unet, AttentionStore(8))
    try:
        with torch.no_grad():
            unet(latents, 10, encoder_hidden_states=context)
        alone = store.maps()
        store.reset()
        store.cfg_batch = True
        with torch.no_grad():
            unet(
                torch.cat([latents, latents]), 10, encoder_hidden_states=torch.cat([torch.zeros_like(context), context])
            )
        torch.testing.assert_close(store.maps(), alone, atol=1e-5, rtol=1e-4)
        store.reset()
        store.cfg_batch = False
        z = latents.clone().requires_grad_(True)
        unet(z, 10, encoder_hidden_states=context)
        store.maps()[:, 3].max().backward()
        assert z.grad is not None and z.grad.abs().sum() > 0
    finally:
        store.detach()


def test_cross_attention_resolutions() -> None:
    sd15 = SimpleNamespace(config=SimpleNamespace(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2DCrossAttn"))  # fmt: skip
    assert cross_attention_resolutions(sd15, 64) == [8, 16, 32, 64]
    assert attention_resolution(sd15, 64) == 16, "SD 1.5 at 512 px: 16x16 as in the paper"
    tiny = SimpleNamespace(config=SimpleNamespace(down_block_types=("CrossAttnDownBlock2D",) * 2,
                                                  up_block_types=("CrossAttnUpBlock2D",) * 2, mid_block_type=None))  # fmt: skip
    assert cross_attention_resolutions(tiny, 16) == [8, 16] and attention_resolution(tiny, 16) == 8


# -- prompts ---------------------------------------------------------------------------------------------------------


def test_prompts_vocabulary_custom_and_captions(tmp_path) -> None:
    bottle = prompts_for("bottle")
    assert {p.defect for p in bottle} >= {"crack"} and all(p.object == "bottle" for p in bottle)
    assert bottle[0].anomaly_text == f"a photo of a bottle with a {bottle[0].defect} on it"
    assert [p.defect for p in prompts_for("my_part", defects=["dent"])] == ["dent"]
    assert prompts_for("my_part")[0].object == "my part"
    captions = {"bottle": {"broken_large": ["a big break at the rim", "another"], "good": []}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(captions))
    from_captions = prompts_for("bottle", captions=path)
    assert [(p.defect, p.description) for p in from_captions] == [("broken large", "a big break at the rim"),
                                                                  ("broken large", "another")]  # fmt: skip
    with pytest.raises(FileNotFoundError):
        load_captions(tmp_path / "missing.json")
    path.write_text(json.dumps({"bottle": ["not", "a", "dict"]}))
    with pytest.raises(ValueError, match="caption JSON"):
        load_captions(path)


def test_token_weights_select_the_defect_words(anomalyany) -> None:
    prompts = anomalyany.prompts[:2]
    ids = anomalyany._tokens([p.anomaly_text for p in prompts])
    weights, valid = anomalyany.token_weights(prompts, ids)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    for row, prompt in enumerate(prompts):
        chosen = ids[row][weights[row] > 0]
        assert anomalyany.tokenizer.decode(chosen).replace(" ", "") == prompt.defect.replace(" ", "")
        assert not valid[row, 0] and valid[row].sum() == len(anomalyany.tokenizer(prompt.anomaly_text).input_ids) - 2


# -- inpainting ------------------------------------------------------------------------------------------------------


def test_inpainting_changes_only_the_mask_on_the_object(inpainting, object_on_background) -> None:
    images, fg = object_on_background
    out = inpainting(images, generator=gen(0))
    mask = out.masks.bool()
    assert out.labels.all() and set(out.masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.images[~mask.expand_as(images)], images[~mask.expand_as(images)])
    assert not (mask & ~fg).any(), "foreground='auto' keeps the defect on the object"
    changed = (out.images - images).abs().amax(1, keepdim=True) > 1e-3
    assert changed[mask].float().mean() > 0.5, "the mask marks what changed"
    again = inpainting(images, generator=gen(0))
    assert torch.equal(again.images, out.images) and torch.equal(again.masks, out.masks)
    other = inpainting(images, generator=gen(1))
    assert not torch.equal(other.masks, out.masks)


def test_inpainting_grayscale_and_given_foreground(inpainting, photos) -> None:
    gray = photos[:2].mean(1, keepdim=True)
    fg = torch.zeros_like(gray, dtype=torch.bool)
    fg[..., 10:40, 50:90] = True
    out = inpainting(gray, fg_masks=fg, generator=gen(3))
    assert out.images.shape == gray.shape and out.masks.any()
    assert not (out.masks.bool() & ~fg).any()
    assert torch.equal(out.images[~out.masks.bool()], gray[~out.masks.bool()])


# -- AnomalyAny ------------------------------------------------------------------------------------------------------


def test_anomalyany_attention_loss_falls_under_gradient_steps(tiny, photos) -> None:
    synth = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", num_inference_steps=10,
                gamma=0.2, attention_steps=1, inner_steps=5, refine_fraction=0.0, localized_range=None, lr=100.0,
                lr_min=0.0, attention_schedule="paper")  # fmt: skip
    # (the paper's weight: the official one is 0 at the first executed step)
    out = synth(photos[:1], generator=gen(0))
    losses = out.params[0]["attention_loss"]
    assert len(losses) == 5 and all(b < a for a, b in itertools.pairwise(losses)), losses
    assert out.params[0]["image_loss"] == [], "no refinement steps were asked for"


def test_anomalyany_output_mask_and_paste_back(anomalyany, object_on_background) -> None:
    images, fg = object_on_background
    out = anomalyany(images, generator=gen(0))
    mask = out.masks.bool()
    assert out.labels.all() and set(out.masks.unique().tolist()) == {0.0, 1.0}
    assert not (mask & ~fg).any(), "the mask is intersected with the foreground"
    assert torch.equal(out.images[~mask.expand_as(images)], images[~mask.expand_as(images)])
    assert (out.images - images).abs()[mask.expand_as(images)].mean() > 1e-3
    again = anomalyany(images, generator=gen(0))
    assert torch.equal(again.images, out.images) and torch.equal(again.masks, out.masks)
    assert not torch.equal(anomalyany(images, generator=gen(1)).images, out.images)


def test_anomalyany_foreground_paste_back_keeps_the_background(tiny, object_on_background) -> None:
    images, fg = object_on_background
    synth = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], paste_back="foreground", **FAST)
    out = synth(images, fg_masks=fg, generator=gen(2))
    assert torch.equal(out.images[~fg.expand_as(images)], images[~fg.expand_as(images)])
    assert not (out.masks.bool() & ~fg).any() and out.masks.flatten(1).any(1).all()


def test_anomalyany_counts_unet_evaluations(anomalyany, photos) -> None:
    calls = []
    handle = anomalyany.unet.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    try:
        out = anomalyany(photos[:2], generator=gen(0))
    finally:
        handle.remove()
    forwards, backwards = anomalyany.expected_unet_evaluations()
    # 4 executed steps, each 2 (CFG); guided steps 0, 1 (attention) and 3 (refinement) add 2 inner iterations each
    assert (forwards, backwards) == (2 * 4 + 2 * 3, 2 * 3)
    assert sum(calls) / 2 == forwards, "hooked UNet calls, in images, per input image"
    assert out.params[0]["unet_forward"] == forwards and out.params[1]["unet_backward"] == backwards
    assert len(out.params[0]["n_t"]) == 4 and len(out.params[0]["attention_loss"]) == 6
    assert len(out.params[0]["image_loss"]) == 2


def test_anomalyany_stop_rule_skips_localised_maps(tiny, photos) -> None:
    kwargs = {**FAST, "localized_range": (0.0, 1.0)}  # every map counts as localised after the first guided step
    synth = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], **kwargs)
    out = synth(photos[:1], generator=gen(0))
    forwards, _ = synth.expected_unet_evaluations()
    assert out.params[0]["unet_forward"] == forwards - 2, "step 1 lost its attention guidance"


@pytest.fixture(scope="module")
def tiny_pndm(tiny, tmp_path_factory):
    """The tiny SD pipeline re-saved with the scheduler SD 1.5 ships: PNDM (PLMS, ``skip_prk_steps``)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    folder = tmp_path_factory.mktemp("tiny-pndm") / "sd"
    pipe.save_pretrained(folder)
    return folder


def test_anomalyany_samples_with_ddim_whatever_the_checkpoint_ships(tiny, tiny_pndm, photos) -> None:
    # PNDM's second step would start again from the sample stored on the first call: the guided update made in
    # between would be lost and the latent would lag the schedule by one step. The sampler must not depend on it.
    kwargs = {**FAST, "lr": 10.0, "lr_min": 0.0}  # a visible guided update before the second executed step
    pndm = get("anomalyany", model=tiny_pndm, clip_model=tiny["clip"], category="bottle", **kwargs)
    ddim = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", **kwargs)
    a, b = pndm(photos[:1], generator=gen(3)), ddim(photos[:1], generator=gen(3))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert pndm.shipped_scheduler == "PNDMScheduler" and type(pndm.make_scheduler()).__name__ == "DDIMScheduler"
    assert pndm.make_scheduler().config.clip_sample is False
    assert a.params[0]["latent_step"][1] > 0, "the second executed step was guided"


def test_anomalyany_attention_weight_schedules(anomalyany, tiny) -> None:
    n = anomalyany.executed_steps()
    n_t, n_start = torch.tensor([30.0, 60.0]), torch.tensor([60.0, 60.0])
    official = [anomalyany.attention_weight(i, n_t, n_start) for i in range(n)]
    # the official code's 0.5 * (i / (N - t_start)): rising from 0, independent of n_t
    assert [w[0].item() for w in official] == pytest.approx([0.5 * i / n for i in range(n)])
    assert torch.equal(official[1][0], official[1][1])
    paper = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], **{**FAST, "attention_schedule": "paper"})
    weights = [paper.attention_weight(i, n_t, n_start) for i in range(n)]
    # Eq. 5: lambda (1 + delta t) n_t / n_start, falling as t falls, from lambda to lambda (1 - attention_decay)
    assert weights[0].tolist() == pytest.approx([0.25, 0.5]) and weights[-1].tolist() == pytest.approx([0.125, 0.25])
    assert all(b[1] < a[1] for a, b in itertools.pairwise(weights))
    with pytest.raises(ValueError, match="attention_schedule"):
        get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], attention_schedule="rising")


def test_anomalyany_guides_every_executed_step_by_default(tiny, photos) -> None:
    synth = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", num_inference_steps=60,
                gamma=0.5, inner_steps=1, lr=10.0, lr_min=0.0)  # fmt: skip
    n = synth.executed_steps()
    assert n == 30 and all(synth.guided(i)[0] for i in range(n)), "max_iter_to_alter (25) does not gate L_att"
    costs = synth.expected_costs()
    assert costs == {"unet_forward": 2 * n + n, "unet_backward": n, "vae_decode": 8, "clip_image": 8}
    out = synth(photos[:1], generator=gen(0))
    assert out.params[0]["unet_forward"] == costs["unet_forward"] and len(out.params[0]["image_loss"]) == 8
    # the official weight is 0 at the first step only; every later step moves the latent
    steps = out.params[0]["latent_step"]
    assert len(steps) == n and steps[0] == 0 and all(s > 0 for s in steps[1:])


def test_anomalyany_image_loss_decodes_z_t_and_the_prompt_moves_every_step(tiny, photos) -> None:
    synth = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", **FAST)
    assert (synth.image_loss_weight, synth.prompt_lr, synth.prompt_loss_weight) == (0.1, 0.02, 1.0)
    unet_in, decoded, contexts = [], [], []

    def keep_unet(_module, args, kwargs):
        if args[0].shape[0] == 1:  # the guided (conditional-only) forwards
            unet_in.append(args[0].detach().clone())
            contexts.append(kwargs["encoder_hidden_states"].detach().clone())

    original_decode = synth.vae.decode

    def keep_decode(latents, *args, **kwargs):
        decoded.append(latents.detach().clone() * synth.vae.config.scaling_factor)
        return original_decode(latents, *args, **kwargs)

    handle = synth.unet.register_forward_pre_hook(keep_unet, with_kwargs=True)
    synth.vae.decode = keep_decode
    try:
        synth(photos[:1], generator=gen(0))
    finally:
        handle.remove()
        del synth.vae.decode
    # FAST: guided steps 0, 1 (attention) and 3 (refinement), 2 iterations each; L_img only in step 3
    assert len(unet_in) == 6 and len(decoded) == 3  # 2 refinement decodes + the final one
    for latent, image_latent in zip(unet_in[4:], decoded[:2]):
        torch.testing.assert_close(image_latent, latent, rtol=1e-5, atol=1e-5)  # z_t itself, not x0_hat
    # L_prompt updates the anomaly embedding at every guided iteration, not only in the refinement steps
    assert not torch.equal(contexts[0], contexts[1]) and not torch.equal(contexts[2], contexts[3])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_anomalyany_low_precision_keeps_fp32_master_copies(tiny, photos, dtype) -> None:
    # inner steps of ~3e-5 (RMS) on the latent and ~2e-5 on the embedding: far below fp16/bf16 resolution near 1
    kwargs = {**FAST, "lr": 1.0, "lr_min": 0.0, "prompt_lr": 0.02}
    full = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", **kwargs)
    low = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", torch_dtype=dtype, **kwargs)
    assert low.unet.dtype == getattr(torch, dtype)
    a, b = full(photos[:1], generator=gen(0)).params[0], low(photos[:1], generator=gen(0)).params[0]
    # the official weight of L_att is 0 at the first executed step: the latent moves from the second one on
    assert (
        all(s > 0 for s in b["prompt_step"]) and b["latent_step"][0] == 0 and all(s > 0 for s in b["latent_step"][1:])
    )
    assert b["prompt_step"] == pytest.approx(a["prompt_step"], rel=0.1)
    assert b["latent_step"] == pytest.approx(a["latent_step"], rel=0.2)


def test_anomalyany_bad_options(tiny) -> None:
    with pytest.raises(ValueError, match="gamma|steps"):
        get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], num_inference_steps=10, gamma=0.01)
    with pytest.raises(ValueError, match="paste_back"):
        get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], paste_back="all")


# -- integration -----------------------------------------------------------------------------------------------------


def test_anomalyany_through_generate_cli(tiny, tmp_path) -> None:
    from anomalib_synth.cli import main

    out = tmp_path / "out"
    args = [
        "generate",
        "builtin:coffee,brick",
        str(out),
        "-s",
        "anomalyany",
        "--model-path",
        str(tiny["sd"]),
        "-o",
        f"clip_model={tiny['clip']}",
        "-n",
        "2",
        "--size",
        "40",
        "40",
        "--batch-size",
        "2",
        "-q",
    ]
    args += [f"-o{k}={v}" for k, v in FAST.items() if v is not None]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == [True, True]
    mask = np.asarray(Image.open(out / records[0]["mask"]))
    assert mask.shape == (40, 40) and set(np.unique(mask)) == {0, 255}


def test_anomalyany_in_datamodule_cache_mode(tiny, tmp_path) -> None:
    from tiny_data import folder_datamodule, make_folder_dataset

    from anomalib_synth.data import SyntheticAnomalyDataModule

    root = make_folder_dataset(tmp_path / "data", size=32, n_train=2, n_test=1)
    synth = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], **FAST)
    dm = SyntheticAnomalyDataModule(folder_datamodule(root), synthesizer=synth, mode="cache", n_shots=2,
                                    variants_per_image=1, synthetic_val=False, image_size=(32, 32),
                                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup()
    samples = dm.train_data.samples
    assert (samples.label_index == 1).sum() == 2
    item = dm.train_data[int((samples.label_index == 1).to_numpy().nonzero()[0][0])]
    assert bool(item.gt_label) and item.gt_mask.any()


def test_diffusion_configs_record_every_argument_that_changes_pixels(tiny) -> None:
    from anomalib_synth.data.cache import cache_key
    from anomalib_synth.synthesizers.registry import constructor_arguments

    kwargs = {"model": tiny["sd"], "clip_model": tiny["clip"], "category": "bottle"}
    synth = get("anomalyany", **kwargs)
    config = synth.config()
    expected = set(constructor_arguments(type(synth))) - set(synth.config_ignore)
    assert expected <= set(config) and "attention_slicing" in config and "device" not in config
    sliced = get("anomalyany", attention_slicing=True, **kwargs)
    assert cache_key(sliced, ["a.png"], 1, 0, (64, 64)) != cache_key(synth, ["a.png"], 1, 0, (64, 64))


def test_anomalyany_attention_slicing_gives_the_same_image(anomalyany, tiny, photos) -> None:
    sliced = get("anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", attention_slicing=True,
                 device="cpu", **FAST)  # fmt: skip
    assert any("Sliced" in type(p).__name__ for p in sliced.unet.attn_processors.values())
    a, b = anomalyany(photos[:1], generator=gen(5)), sliced(photos[:1], generator=gen(5))
    torch.testing.assert_close(a.images, b.images, atol=2e-3, rtol=0)
    assert not any(p.requires_grad for p in sliced.parameters()), "loaded models are frozen"


def test_lazy_registry_entries_match_their_classes() -> None:
    from anomalib_synth.synthesizers import available, get_class

    for name in ("inpainting", "anomalyany", "xfusion", "anomalycontrol"):
        cls = get_class(name)
        assert cls.name == name and available()[name] == cls.description


def test_only_diffusion_synthesizers_require_weights() -> None:
    from anomalib_synth.synthesizers import available, get_class

    needing = {name for name in available() if get_class(name).requires_weights}
    assert needing == {"inpainting", "anomalyany", "xfusion", "anomalycontrol"}
