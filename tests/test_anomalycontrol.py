"""AnomalyControl: CSM, ASEA, SGA, training, save/load, sampling and CLI (tiny random models, CPU)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gen
from PIL import Image
from tiny_data import fake_captioned_mvtec, training_batch

from anomalib_synth.io import builtin_photo, resize, to_uint8
from anomalib_synth.synthesizers import get
from anomalib_synth.synthesizers.diffusion.anomalycontrol import (
    AnomalyControlModel,
    CrossModalSemanticModeling,
    SemanticGuidedAdapter,
    load_references,
)
from anomalib_synth.synthesizers.diffusion.loading import ModelNotFoundError
from anomalib_synth.training.captions import match_captions
from anomalib_synth.training.control import ReferencePairs
from anomalib_synth.training.leakage import training_images_of


@pytest.fixture(scope="module")
def csm(tiny) -> CrossModalSemanticModeling:
    return CrossModalSemanticModeling(tiny["blip2"])


def test_csm_features_and_asea_focuses_attention(csm) -> None:
    images = torch.stack([resize(builtin_photo(n), (32, 32)) for n in ("coffee", "brick")])
    features = csm(images, ["a stain on the cup", "a hole in the brick"])
    assert features.shape == (2, 32) and features.dtype == torch.float32
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, :16, :16] = 1
    masks[1, :, 16:, 8:24] = 1
    vision = csm.vision(csm.pixels(images))
    ids, attention_mask = csm.tokens(["a stain on the cup", "a hole in the brick"])
    assert (csm.asea.steps, csm.asea.lr) == (5, 0.1), "the official defaults"
    _, fractions = csm.asea.optimise(csm, vision, ids, attention_mask, masks)
    assert len(fractions) == 5 and torch.allclose(fractions[0], torch.tensor(0.25)), "uniform before: 4 of 16 cells"
    assert all((b >= a - 1e-6).all() for a, b in itertools.pairwise(fractions)), fractions
    assert (fractions[-1] > fractions[0] + 0.002).all(), fractions
    _, attention = csm.encode(vision, ids, attention_mask)
    assert attention.shape == (2, 4, 4) and (attention >= 0).all()
    guided = csm(images, ["a stain on the cup", "a hole in the brick"], masks)
    assert not torch.allclose(guided, features), "ASEA's e_g changes the reference features"


def test_asea_acts_on_the_detached_vision_output_and_no_gradient_reaches_the_vision_tower(tiny) -> None:
    """Official placement: e_g is added to ln_vision(visual_encoder(image)), detached; the tower runs once."""
    csm = CrossModalSemanticModeling(tiny["blip2"], asea_steps=3)
    vision = csm.vlm.vision_model
    vision.requires_grad_(True)  # even if the tower could learn, ASEA must not backpropagate into it
    runs, contexts = [], []
    vision.encoder.register_forward_hook(lambda *_: runs.append(1))
    csm.vlm.qformer.register_forward_pre_hook(lambda _m, _a, kw: contexts.append(kw["encoder_hidden_states"].detach()),
                                              with_kwargs=True)  # fmt: skip
    images = torch.stack([resize(builtin_photo(n), (32, 32)) for n in ("coffee", "brick")])
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, :16, :16] = 1
    csm(images, ["a stain on the cup", "a hole in the brick"], masks)
    assert len(runs) == 1, "the vision tower runs once per reference, not once per ASEA step"
    assert all(p.grad is None for p in vision.parameters()), "a gradient reached the vision tower"
    with torch.no_grad():
        output = vision(pixel_values=csm.pixels(images)).last_hidden_state  # post_layernorm = LAVIS's ln_vision
    assert len(contexts) == 3 and torch.allclose(contexts[0], output), "step 1: the tower's output (e_g = 0)"
    assert not torch.allclose(contexts[-1], output), "later steps: the output + e_g"


def test_transformers_floor_is_one_the_csm_runs_on() -> None:
    """The Q-Former's cross-attention is read with output_attentions=True, which works from 4.45 (the first release
    with Blip2ForImageTextRetrieval; checked on 4.45.2, 4.53.3, 4.56.2 and 5.x), not through a hook on the
    attention module (a (K, V) tuple in 4.45-4.53, nothing in 4.56)."""
    import re

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"transformers>=(\d+)\.(\d+)', pyproject)
    assert floor and (int(floor.group(1)), int(floor.group(2))) >= (4, 45), "transformers floor below 4.45"
    csm_source = Path(CrossModalSemanticModeling.__module__.replace(".", "/") + ".py")
    text = (Path(__file__).parents[1] / csm_source).read_text()
    assert "output_attentions=True" in text and "register_forward_hook" not in text


def test_sga_only_on_cross_attention_and_scale_zero_is_the_plain_unet(tiny) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet = UNet2DConditionModel.from_pretrained(tiny["sd-inpainting"], subfolder="unet")
    g = gen(0)
    sample, text = torch.randn(2, 9, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        plain = unet(sample, 50, encoder_hidden_states=text).sample
    sga = SemanticGuidedAdapter.for_unet(unet, feature_dim=32, image_embed_dim=48, num_tokens=4)
    sga.install(unet, scale=0.0)
    procs = unet.attn_processors
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) == (".attn2." in n) for n, p in procs.items())
    assert [procs[f"{name}.processor"] for name in sga.config.layers] == list(sga.ip_attention), "shared, not copied"
    assert unet.encoder_hid_proj.image_projection_layers[0] is sga.image_proj
    for name, proc in sga.processors().items():  # K_ip, V_ip start from the text K, V (the paper's initialisation)
        assert torch.equal(proc.to_k_ip[0].weight, unet.get_submodule(name).to_k.weight)
        assert torch.equal(proc.to_v_ip[0].weight, unet.get_submodule(name).to_v.weight)
    embeds = sga(torch.randn(2, 32, generator=g))
    with torch.no_grad():
        out = unet(sample, 50, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds]}).sample
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-4)
        SemanticGuidedAdapter.set_scale(unet, 1.0)
        steered = unet(sample, 50, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds]}).sample
    assert (steered - plain).abs().mean() > 1e-4, "with s = 1 the image tokens change the prediction"


def test_training_loss_falls_and_adapter_round_trip(tiny, tmp_path) -> None:
    torch.manual_seed(0)
    model = AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, asea_steps=2, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    sga_parts = ("sga.", "_ip.", "encoder_hid_proj.")  # projection, new K/V, image projection (shared with the UNet)
    assert trainable and all(any(part in n for part in sga_parts) for n in trainable), sorted(trainable)
    images, masks, captions = training_batch()
    features = model.reference_features(images.flip(0), captions[::-1], masks.flip(0))
    fixed = {"timesteps": torch.tensor([300, 700]), "noise": torch.randn(2, 4, 16, 16, generator=gen(1))}
    model.eval()
    with torch.no_grad():
        before = float(model.training_loss(images, masks, captions, features, **fixed))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    model.train()
    g = gen(0)
    for _ in range(30):
        loss = model.training_loss(images, masks, captions, features, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(model.training_loss(images, masks, captions, features, **fixed))
    assert after < 0.95 * before, (before, after)
    model.training_data = {
        "images": [{"image": "/data/bottle/test/crack/000.png"}],
        "keys": ["bottle/test/crack/000.png"],
    }
    folder = model.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = AnomalyControlModel(adapter=folder, asea_steps=2).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.sga.config) == public(model.sga.config), "identical config"
    assert loaded.sga.config.base_model == str(tiny["sd-inpainting"]) and loaded.sga.config.vlm == str(tiny["blip2"])
    assert loaded.sga.config.scale == loaded.scale == 1.0 and loaded.training_data == model.training_data
    trained = model.sga.state_dict()
    assert trained.keys() == loaded.sga.state_dict().keys()
    assert all(torch.equal(v, loaded.sga.state_dict()[k]) for k, v in trained.items()), "identical weights"
    assert not torch.equal(trained["ip_attention.0.to_k_ip.0.weight"],
                           model.unet.get_submodule(model.sga.config.layers[0]).to_k.weight), "K_ip trained"  # fmt: skip
    direct = SemanticGuidedAdapter.from_pretrained(folder)  # diffusers' own loading, no AnomalyControl code
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in trained.items())
    assert training_images_of(folder) == ["/data/bottle/test/crack/000.png"], "the leakage check reads config.json"
    with torch.no_grad():
        assert float(loaded.training_loss(images, masks, captions, features, **fixed)) == after
        seeds = torch.tensor([1, 2])
        a = model.sample(images, masks, captions, features, seeds, num_inference_steps=3)
        b = loaded.sample(images, masks, captions, features, seeds, num_inference_steps=3)
    assert torch.equal(a, b), "save/load reproduces the outputs"


def test_clear_errors_for_missing_models(tiny, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="BLIP-2"):
        AnomalyControlModel(tiny["sd-inpainting"], tmp_path / "no-vlm")
    with pytest.raises(ModelNotFoundError, match="inpainting"):
        AnomalyControlModel(tmp_path / "no-sd", tiny["blip2"])
    with pytest.raises(ModelNotFoundError, match="train control"):
        AnomalyControlModel(adapter=tmp_path / "no-adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="train control"):
        AnomalyControlModel(adapter=tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_references(tmp_path / "none.json")


def _write_old_format(model: AnomalyControlModel, folder: Path, scale: float | None) -> None:
    """An adapter folder as ``save_adapter`` wrote it before the SGA was a diffusers model."""
    from safetensors.torch import save_file

    folder.mkdir()
    state = {f"sga.{k}": v for k, v in model.sga.state_dict().items() if not k.startswith("ip_attention.")}
    state.update({f"unet.{k}": v for k, v in model.unet.state_dict().items() if "to_k_ip" in k or "to_v_ip" in k})
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "sga.safetensors")
    config = {"type": "anomalycontrol", "base_model": model.base_model, "vlm": model.vlm_name, "feature_dim": 32,
              "cross_attention_dim": 32, "image_embed_dim": 48, "num_tokens": 4, "init_adapter": None,
              "training_data": {"images": [{"image": "/data/bottle/test/crack/001.png"}]}}  # fmt: skip
    if scale is not None:
        config["scale"] = scale
    (folder / "sga_config.json").write_text(json.dumps(config))


def test_old_format_adapter_loads_with_a_deprecation_warning(tiny, tmp_path) -> None:
    torch.manual_seed(3)
    model = AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, asea_steps=0)
    with torch.no_grad():
        for p in model.trainable_parameters():  # "trained": K_ip/V_ip no longer equal to the text K/V
            p.add_(torch.randn(p.shape, generator=gen(len(p.shape))) * 0.1)
    _write_old_format(model, tmp_path / "old", scale=1.0)
    with pytest.warns(DeprecationWarning, match="old format"):
        loaded = AnomalyControlModel(adapter=tmp_path / "old", asea_steps=0)
    assert loaded.base_model == model.base_model and loaded.scale == 1.0
    assert training_images_of(loaded.sga.config) == ["/data/bottle/test/crack/001.png"]
    same = loaded.sga.state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.sga.state_dict().items()), "the same weights"
    kv = {k: v for k, v in loaded.unet.state_dict().items() if "_ip." in k}
    assert kv and all(torch.equal(v, model.unet.state_dict()[k]) for k, v in kv.items()), "installed in the UNet"
    images, masks, captions = training_batch()
    fixed = {"timesteps": torch.tensor([300, 700]), "noise": torch.randn(2, 4, 16, 16, generator=gen(1))}
    with torch.no_grad():
        features = torch.randn(2, 32, generator=gen(2))
        assert torch.equal(model.eval().training_loss(images, masks, captions, features, **fixed),
                           loaded.eval().training_loss(images, masks, captions, features, **fixed))  # fmt: skip
    resaved = loaded.save_adapter(tmp_path / "new")
    assert (resaved / "config.json").is_file() and not (resaved / "sga_config.json").exists()
    _write_old_format(model, tmp_path / "unrecorded", scale=None)
    with pytest.warns(DeprecationWarning):
        assert AnomalyControlModel(adapter=tmp_path / "unrecorded", asea_steps=0).scale == 0.5, "trained at 0.5"


def test_using_the_synthesizer_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = ("import sys, anomalib_synth.synthesizers.diffusion.anomalycontrol as m; "
            "from anomalib_synth.synthesizers import get_class; get_class('anomalycontrol'); "
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('lightning', 'pytorch_lightning')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout
    from anomalib_synth.synthesizers.diffusion.anomalycontrol.lightning_model import ControlTraining
    from anomalib_synth.training import control

    assert control.ControlTraining is ControlTraining, "re-exported where it was"


@pytest.fixture(scope="module")
def tiny_pndm(tiny, tmp_path_factory):
    """The tiny inpainting pipeline re-saved with the scheduler SD 1.5 inpainting ships: PNDM (``skip_prk_steps``)."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny["sd-inpainting"], safety_checker=None,
                                                          requires_safety_checker=False)  # fmt: skip
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    folder = tmp_path_factory.mktemp("tiny-pndm") / "sd-inpainting"
    pipe.save_pretrained(folder)
    return folder


def test_sampling_from_strength_keeps_each_latent_at_its_timestep(tiny, tiny_pndm, adapter) -> None:
    """Sampling starts partway in (strength 0.7). With an exact noise predictor for the clean latent 0
    (``eps = z_t / sqrt(1 - abar_t)``), a correct sampler hands the UNet, at each timestep ``t``, the first latent
    scaled by ``sqrt((1 - abar_t) / (1 - abar_t0))``. PNDM (what SD 1.5 ships, used by diffusers' pipeline) fails
    this from its third step on, when started after its repeated warm-up step; the model samples with DDIM."""
    model = AnomalyControlModel(tiny_pndm, tiny["blip2"], adapter=adapter, asea_steps=0)
    assert model.shipped_scheduler == "PNDMScheduler" and type(model.pipeline.scheduler).__name__ == "DDIMScheduler"
    abar = model.pipeline.scheduler.alphas_cumprod
    seen = []

    def exact(_module, args, _kwargs, _output):
        latents, t = args[0][:, :4], int(args[1])
        seen.append((t, latents.clone()))
        return (latents / (1 - abar[t]).sqrt(),)

    model.unet.register_forward_hook(exact, with_kwargs=True)
    images, masks, captions = training_batch()
    model.sample(images, masks, captions, torch.zeros(2, 32), torch.tensor([1, 2]), num_inference_steps=10)
    assert [t for t, _ in seen] == [601, 501, 401, 301, 201, 101, 1], "int(10 x 0.7) = 7 steps, from t = 601"
    t0, z0 = seen[0]
    for t, z in seen[1:]:
        torch.testing.assert_close(z, z0 * ((1 - abar[t]) / (1 - abar[t0])).sqrt(), rtol=1e-4, atol=1e-5)
    ddim = AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], adapter=adapter, asea_steps=0)
    pndm = AnomalyControlModel(tiny_pndm, tiny["blip2"], adapter=adapter, asea_steps=0)
    features, seeds = torch.randn(2, 32, generator=gen(0)), torch.tensor([3, 4])
    a = ddim.sample(images, masks, captions, features, seeds, num_inference_steps=4)
    b = pndm.sample(images, masks, captions, features, seeds, num_inference_steps=4)
    assert torch.equal(a, b), "the shipped scheduler does not matter"


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    torch.manual_seed(0)
    model = AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, asea_steps=1)
    return model.save_adapter(tmp_path_factory.mktemp("ctrl") / "adapter")


def test_synthesizer_keeps_the_input_outside_the_blurred_mask(adapter, object_on_background, tmp_path) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(to_uint8(resize(builtin_photo("brick"), (40, 40)))).save(refs / "brick.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 5:20] = 255
    Image.fromarray(mask).save(refs / "brick_mask.png")
    (refs / "refs.json").write_text(json.dumps([{"image": "brick.png", "text": "a crack in the brick",
                                                "mask": "brick_mask.png"}]))  # fmt: skip
    images, fg = object_on_background
    synth = get("anomalycontrol", adapter=adapter, references=refs / "refs.json", category="bottle",
                num_inference_steps=3, asea_steps=1)  # fmt: skip
    out = synth(images, generator=gen(0))
    mask = out.masks.bool()
    assert out.labels.all() and not (mask & ~fg).any()
    far = ~torch.nn.functional.max_pool2d(out.masks, 31, stride=1, padding=15).bool()  # beyond the blur's reach
    assert torch.equal(out.images[far.expand_as(images)], images[far.expand_as(images)])
    assert (out.images - images).abs()[mask.expand_as(images)].mean() > 1e-3
    assert torch.equal(synth(images, generator=gen(0)).images, out.images)
    folder = load_references(refs)
    assert [(r["text"], Path(r["mask"]).name) for r in folder] == [("brick", "brick_mask.png")], "masks pair up"


def _ip_scales(unet) -> list:
    """Record the SGA scale of every UNet forward."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    scales: list = []
    unet.register_forward_pre_hook(
        lambda *_: scales.append(
            {s for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0) for s in p.scale}
        )
    )
    return scales


def test_sga_trains_and_samples_at_the_same_scale(tiny, adapter, tmp_path) -> None:
    """The official SGA trains at scale 1 (its 0.5 is a LoRA scale its processors ignore) and samples at 1."""
    model = AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, asea_steps=0)
    trained = _ip_scales(model.unet)
    images, masks, captions = training_batch()
    model.training_loss(images, masks, captions, torch.zeros(2, 32))
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(to_uint8(resize(builtin_photo("grass"), (32, 32)))).save(refs / "stain.png")
    synth = get("anomalycontrol", adapter=adapter, references=refs, num_inference_steps=2, asea_steps=0)
    sampled = _ip_scales(synth.core.unet)
    synth(images, generator=gen(0))
    assert trained and sampled and all(s == trained[0] for s in trained + sampled), (trained, sampled)
    assert trained[0] == {1.0} and json.loads((adapter / "config.json").read_text())["scale"] == 1.0


def test_negative_branch_is_the_official_one(adapter, tmp_path) -> None:
    """Guidance's negative branch: the official negative prompt, and the SGA tokens of a zero CSM feature (the
    image condition dropped in training)."""
    from anomalib_synth.synthesizers.diffusion.anomalycontrol import NEGATIVE_PROMPT

    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(to_uint8(resize(builtin_photo("grass"), (32, 32)))).save(refs / "stain.png")
    synth = get("anomalycontrol", adapter=adapter, references=refs, num_inference_steps=2, asea_steps=0)
    calls = []
    pipeline = synth.core.pipeline

    class Spy:
        def __call__(self, **kwargs):
            calls.append(kwargs)
            return pipeline(**kwargs)

    synth.core.pipeline = Spy()
    synth(torch.rand(2, 3, 32, 32), generator=gen(0))
    assert NEGATIVE_PROMPT == "monochrome, lowres, bad anatomy, worst quality, low quality"
    assert calls[0]["negative_prompt"] == [NEGATIVE_PROMPT] * 2 and synth.config()["negative_prompt"] == NEGATIVE_PROMPT
    negative = calls[0]["ip_adapter_image_embeds"][0][:2]
    with torch.no_grad():
        assert torch.allclose(negative, synth.core.sga(torch.zeros(2, 32)))


def test_training_caches_reference_features(tiny, tmp_path, monkeypatch) -> None:
    """The CSM (+ ASEA) feature of a reference is computed once per image, not at every step (official: a cache)."""
    from anomalib_synth.training.control import ControlTraining

    fake = fake_captioned_mvtec(tmp_path)
    pairs = ReferencePairs(match_captions(fake["root"], fake["captions"]), (32, 32), "same_defect")
    module = ControlTraining(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, asea_steps=1)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    encoded = []
    module.model.csm.register_forward_hook(lambda _m, args, _o: encoded.append(len(args[0])))  # references encoded
    for _ in range(2):  # two epochs
        for indices in ([0, 1], [1, 2]):
            module.training_step(ReferencePairs.collate([pairs[i] for i in indices]), 0)
    assert sum(encoded) == 3, encoded  # references 1, 0 and 2 (juice/001 is its own reference)
    before = dict(module.feature_cache)
    batch = ReferencePairs.collate([pairs[2]])
    with torch.no_grad():
        fresh = module.model.reference_features(batch["ref_image"], batch["ref_caption"], batch["ref_mask"])
    assert torch.equal(before[str(pairs.items.records[2].image)], fresh[0]), "the cached feature is the feature"


def test_init_adapter_from_an_ip_adapter_checkpoint(tiny, tmp_path) -> None:
    """--init-adapter: start the SGA from IP-Adapter weights (.bin as released, or .safetensors), as officially."""
    from safetensors.torch import save_file

    from anomalib_synth.cli import main
    from anomalib_synth.synthesizers.diffusion.anomalycontrol import read_ip_adapter

    plain = AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, asea_steps=0)
    names = list(plain.unet.attn_processors)
    cross = [i for i, n in enumerate(names) if n.endswith("attn2.processor")]
    assert cross == list(range(1, 2 * len(cross), 2)), "IP-Adapter numbering: attn1/attn2 alternate (1, 3, ... 31)"
    g = gen(5)
    own = plain.sga.image_proj.state_dict()
    image_proj = {k.replace("image_embeds.", "proj."): torch.randn(v.shape, generator=g) for k, v in own.items()}
    layers = {}
    for i in cross:
        module = plain.unet.get_submodule(names[i].removesuffix(".processor"))
        for which in ("to_k_ip", "to_v_ip"):
            layers[f"{i}.{which}.weight"] = torch.randn(module.to_k.weight.shape, generator=g)
    torch.save({"image_proj": image_proj, "ip_adapter": layers}, tmp_path / "ip-adapter.bin")
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()} | {f"ip_adapter.{k}": v for k, v in layers.items()}
    save_file(flat, tmp_path / "ip-adapter.safetensors")
    for path in (tmp_path / "ip-adapter.bin", tmp_path / "ip-adapter.safetensors"):
        model = AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, asea_steps=0,
                                    init_adapter=path)  # fmt: skip
        assert torch.equal(model.sga.image_proj.image_embeds.weight, image_proj["proj.weight"])
        assert torch.equal(model.sga.image_proj.norm.bias, image_proj["norm.bias"])
        for i in cross:
            proc = model.unet.attn_processors[names[i]]
            assert torch.equal(proc.to_k_ip[0].weight, layers[f"{i}.to_k_ip.weight"])
            assert torch.equal(proc.to_v_ip[0].weight, layers[f"{i}.to_v_ip.weight"])
    wrong = {"image_proj": image_proj, "ip_adapter": {k: v[:, :8] for k, v in layers.items()}}
    torch.save(wrong, tmp_path / "sdxl.bin")
    with pytest.raises(ValueError, match="do not fit"):
        AnomalyControlModel(
            tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, init_adapter=tmp_path / "sdxl.bin"
        )
    with pytest.raises(ModelNotFoundError, match="init-adapter"):
        AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, init_adapter=tmp_path / "no.bin")
    with pytest.raises(ModelNotFoundError, match="Hugging Face cache"):  # a Hub file, offline and not cached
        read_ip_adapter("h94/IP-Adapter/models/no-such-file.safetensors", local_files_only=True)

    fake = fake_captioned_mvtec(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "control", "--data-root", str(fake["root"]), "--captions", str(fake["captions"]),
                 "--base-model", str(tiny["sd-inpainting"]), "--vlm", str(tiny["blip2"]), "--max-steps", "1",
                 "--batch-size", "1", "--image-size", "32", "--image-embed-dim", "48", "--asea-steps", "0",
                 "--init-adapter", str(tmp_path / "ip-adapter.bin"), "--output", str(out), "-q"]) == 0  # fmt: skip
    config = json.loads((out / "adapter" / "config.json").read_text())
    assert config["init_adapter"] == str(tmp_path / "ip-adapter.bin")


def test_reference_pairing_strategies(tmp_path) -> None:
    fake = fake_captioned_mvtec(tmp_path)
    records = match_captions(fake["root"], fake["captions"])
    itself = ReferencePairs(records, (32, 32))
    assert itself.pairing == "self" and [itself.reference_index(i) for i in range(3)] == [0, 1, 2], "official"
    item = itself[1]
    assert torch.equal(item["ref_image"], item["image"]) and item["ref_caption"] == item["caption"]
    import inspect

    from anomalib_synth.cli import build_train_parser
    from anomalib_synth.training.control import train_control

    assert inspect.signature(train_control).parameters["pairing"].default == "self"
    assert build_train_parser().parse_args(["control", "--data-root", "r", "--captions", "c"]).pairing == "self"
    same = ReferencePairs(records, (32, 32), "same_defect")
    assert [same.reference_index(i) for i in range(3)] == [1, 0, 2]  # juice has one image: itself
    anything = ReferencePairs(records, (32, 32), "random", seed=3)
    assert all(anything.reference_index(i) != i for i in range(3))
    item = anything[0]
    assert item["ref_image"].shape == (3, 32, 32) and isinstance(item["ref_caption"], str)
    with pytest.raises(ValueError, match="pairing"):
        ReferencePairs(records, (32, 32), "nearest")


def test_cli_train_control(tiny, tmp_path) -> None:
    from anomalib_synth.cli import main

    fake = fake_captioned_mvtec(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "control", "--data-root", str(fake["root"]), "--captions", str(fake["captions"]),
            "--base-model", str(tiny["sd-inpainting"]), "--vlm", str(tiny["blip2"]), "--max-steps", "2",
            "--batch-size", "2", "--image-size", "32", "--image-embed-dim", "48", "--asea-steps", "1",
            "--exclude-categories", "juice", "--output", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert (
        checkpoint["global_step"] == 2
        and checkpoint["state_dict"]
        and all(any(p in k for p in ("sga.", "_ip.", "encoder_hid_proj.")) for k in checkpoint["state_dict"])
    )
    config = json.loads((out / "adapter" / "config.json").read_text())
    assert config["vlm"] == str(tiny["blip2"]) and config["scale"] == 1.0 and config["init_adapter"] is None
    assert config["training_data"]["keys"] == ["bottle/test/crack/000.png", "bottle/test/crack/002.png"]
    assert config["training_data"]["excluded"] == ["juice/test/logical/001.png"]


def test_generate_cli_with_references(adapter, tmp_path) -> None:
    from anomalib_synth.cli import main

    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(to_uint8(resize(builtin_photo("grass"), (32, 32)))).save(refs / "green_stain.png")
    out = tmp_path / "out"
    assert main(["generate", "builtin:coffee", str(out), "-s", "anomalycontrol", "--model-path", str(adapter),
                 "-o", f"references={refs}", "-o", "num_inference_steps=2", "-o", "asea_steps=0", "-n", "2",
                 "--size", "32", "32", "-q"]) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == [True, True] and records[0]["params"]["reference"] == 0


def test_adapter_paths_a_user_types_get_the_local_message(tiny, tmp_path, monkeypatch) -> None:
    """A relative path that does not exist yet (`control_run/adapter`) is a local folder, not a Hub id; a folder
    with another model's config.json is refused with one line, not a constructor traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "control_run").mkdir()
    with pytest.raises(ModelNotFoundError, match="does not exist; train one"):
        AnomalyControlModel(adapter="control_run/adapter")
    with pytest.raises(ModelNotFoundError, match="not an AnomalyControl adapter"):
        AnomalyControlModel(adapter=Path(tiny["sd"]) / "unet")
