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

from anomalib_synth.data.captions import match_captions
from anomalib_synth.io import builtin_photo, resize, to_uint8
from anomalib_synth.synthesizers import get
from anomalib_synth.synthesizers.diffusion.anomalycontrol import (
    AnomalyControlModel,
    CrossModalSemanticModeling,
    SemanticGuidedAdapter,
    load_references,
)
from anomalib_synth.synthesizers.diffusion.loading import ModelNotFoundError
from anomalib_synth.training.control import ReferencePairs


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
    pixels = csm.pixels(images)
    ids, attention_mask = csm.tokens(["a stain on the cup", "a hole in the brick"])
    assert (csm.asea.steps, csm.asea.lr) == (5, 0.1), "the official defaults"
    _, fractions = csm.asea.optimise(csm, pixels, ids, attention_mask, masks)
    assert len(fractions) == 6 and torch.allclose(fractions[0], torch.tensor(0.25)), "uniform before: 4 of 16 cells"
    assert all((b >= a - 1e-6).all() for a, b in itertools.pairwise(fractions)), fractions
    assert (fractions[-1] > fractions[0] + 0.005).all(), fractions
    _, attention = csm.encode(pixels, ids, attention_mask)
    assert attention.shape == (2, 4, 4) and (attention >= 0).all()
    guided = csm(images, ["a stain on the cup", "a hole in the brick"], masks)
    assert not torch.allclose(guided, features), "ASEA's e_g changes the reference features"


def test_sga_only_on_cross_attention_and_scale_zero_is_the_plain_unet(tiny) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet = UNet2DConditionModel.from_pretrained(tiny["sd-inpainting"], subfolder="unet")
    g = gen(0)
    sample, text = torch.randn(2, 9, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        plain = unet(sample, 50, encoder_hidden_states=text).sample
    sga = SemanticGuidedAdapter(feature_dim=32, cross_attention_dim=32, image_embed_dim=48, num_tokens=4)
    sga.install(unet, scale=0.0)
    procs = unet.attn_processors
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) == (".attn2." in n) for n, p in procs.items())
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
    folder = model.save_adapter(tmp_path / "adapter")
    loaded = AnomalyControlModel(adapter=folder, asea_steps=2).eval()
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
    with pytest.raises(FileNotFoundError):
        load_references(tmp_path / "none.json")


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


def test_reference_pairing_strategies(tmp_path) -> None:
    fake = fake_captioned_mvtec(tmp_path)
    records = match_captions(fake["root"], fake["captions"])
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
            "--output", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert (
        checkpoint["global_step"] == 2
        and checkpoint["state_dict"]
        and all(any(p in k for p in ("sga.", "_ip.", "encoder_hid_proj.")) for k in checkpoint["state_dict"])
    )
    assert json.loads((out / "adapter" / "sga_config.json").read_text())["vlm"] == str(tiny["blip2"])


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
