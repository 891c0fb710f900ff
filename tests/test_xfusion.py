"""AnomalyXFusion: modules, captions, training, adapter save/load, sampling, CLI (tiny random models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import gen
from PIL import Image
from tiny_data import fake_captioned_mvtec, training_batch

from anomalib_synth.data.captions import CaptionedDefects, match_captions
from anomalib_synth.io import builtin_photo, resize, to_uint8
from anomalib_synth.synthesizers import get
from anomalib_synth.synthesizers.diffusion.loading import ModelNotFoundError
from anomalib_synth.synthesizers.diffusion.xfusion import (
    DynamicDifFusion,
    MultiModalInFusion,
    XFusionAdapter,
    XFusionModel,
)


def test_caption_loader_matches_files(tmp_path) -> None:
    fake = fake_captioned_mvtec(tmp_path)
    records = match_captions(fake["root"], fake["captions"])
    assert [(r.category, r.defect, r.image.name, r.caption) for r in records] == [
        ("bottle", "crack", "000.png", "crack caption 0"),
        ("bottle", "crack", "002.png", "crack caption 2"),  # 005.png has no caption (only 3) and is skipped
        ("juice", "logical", "001.png", "wrong label 1"),
    ]
    item = CaptionedDefects(records, (32, 32))[2]
    assert item["image"].shape == (3, 32, 32) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["mask"][0, 22, 22] == 1 and item["mask"][0, 6, 10] == 1, "LOCO masks are merged (> 0)"
    assert [r.category for r in match_captions(fake["root"], fake["captions"], ["juice"])] == ["juice"]
    with pytest.raises(ValueError, match="no captions"):
        match_captions(fake["root"], fake["captions"], ["carpet"])


@pytest.mark.parametrize(("k", "d"), [(2, 32), (4, 48)])
def test_mif_and_ddf_shapes(k: int, d: int) -> None:
    torch.manual_seed(0)
    mif = MultiModalInFusion(d, num_tokens=k, text_dim=24, image_dim=16)
    text, masks, image = torch.randn(3, 24), (torch.rand(3, 1, 40, 40) > 0.7).float(), torch.randn(3, 16)
    assert mif.semantic(text).shape == (3, k, d)
    torch.testing.assert_close(mif.semantic(text).norm(dim=-1), torch.ones(3, k)), "Eq. 1: L2-normalised"
    assert mif.location(masks).shape == (3, k, d) and mif.texture(image).shape == (3, k, d)
    e_x = mif(text, masks, image)
    assert e_x.shape == (3, 3 * k, d) and e_x.dtype == torch.float32
    ddf = DynamicDifFusion(d)
    early, late = ddf(e_x, torch.tensor(900)), ddf(e_x, torch.tensor([10, 10, 10]))
    assert early.shape == e_x.shape and (early - late).abs().mean() > 1e-3, "DDF depends on t"
    torch.testing.assert_close(ddf(e_x, torch.tensor(10)), late)


def test_training_loss_falls_and_adapter_round_trip(tiny, tmp_path) -> None:
    torch.manual_seed(0)
    model = XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2, lora_rank=2, caption_dropout=0.0)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"adapter", "unet"}
    assert all("lora" in n for n, p in model.unet.named_parameters() if p.requires_grad), "only LoRA in the UNet"
    images, masks, captions = training_batch()
    fixed = {"timesteps": torch.tensor([300, 700]), "noise": torch.randn(2, 4, 16, 16, generator=gen(1))}
    model.eval()
    before = float(model.training_loss(images, masks, captions, **fixed))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    model.train()
    g = gen(0)
    for _ in range(30):
        loss = model.training_loss(images, masks, captions, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(model.training_loss(images, masks, captions, **fixed))
    assert after < 0.95 * before, (before, after)

    folder = model.save_adapter(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model"] == str(tiny["sd"]) and config["lora_rank"] == 2 and config["num_tokens"] == 2
    loaded = XFusionModel(adapter=folder).eval()
    with torch.no_grad():
        assert float(loaded.training_loss(images, masks, captions, **fixed)) == after
        seeds = torch.tensor([3, 4])
        a = model.sample(images, masks, captions, seeds, num_inference_steps=3)
        b = loaded.sample(images, masks, captions, seeds, num_inference_steps=3)
    assert torch.equal(a, b), "save/load reproduces the outputs exactly"
    with pytest.raises(ModelNotFoundError, match="train xfusion"):
        XFusionAdapter.from_pretrained(tmp_path / "nothing")


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2).save_adapter(tmp_path_factory.mktemp("xf") / "adapter")


def test_xfusion_synthesizer_pastes_back_outside_the_mask(adapter, object_on_background, tmp_path) -> None:
    images, fg = object_on_background
    synth = get("xfusion", adapter=adapter, category="bottle", num_inference_steps=3)
    out = synth(images, generator=gen(0))
    mask = out.masks.bool()
    assert out.labels.all() and not (mask & ~fg).any()
    assert torch.equal(out.images[~mask.expand_as(images)], images[~mask.expand_as(images)])
    assert (out.images - images).abs()[mask.expand_as(images)].mean() > 1e-3
    assert torch.equal(synth(images, generator=gen(0)).images, out.images)
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("brick", "grass"):
        Image.fromarray(to_uint8(resize(builtin_photo(name), (40, 40)))).save(refs / f"{name}.png")
    with_refs = get("xfusion", model=adapter, reference_dir=refs, category="bottle", num_inference_steps=3)
    referenced = with_refs(images, generator=gen(0))
    assert torch.equal(referenced.masks, out.masks), "same draws: only the textural embedding differs"
    assert not torch.equal(referenced.images, out.images), "the reference defect changes the synthesis"
    assert {p["reference"] for p in with_refs(images.repeat(4, 1, 1, 1), generator=gen(1)).params} == {0, 1}
    with pytest.raises(ValueError, match="adapter"):
        get("xfusion")


def test_cli_train_xfusion_writes_a_loadable_adapter(tiny, tmp_path) -> None:
    from anomalib_synth.cli import main

    fake = fake_captioned_mvtec(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "xfusion", "--data-root", str(fake["root"]), "--captions", str(fake["captions"]),
            "--base-model", str(tiny["sd"]), "--clip-model", str(tiny["clip"]), "--max-steps", "2",
            "--batch-size", "2", "--image-size", "32", "--output", str(out), "--num-tokens", "2", "-q"]  # fmt: skip
    assert main(args) == 0
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "logs" / "version_0" / "metrics.csv").is_file()
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    keys = checkpoint["state_dict"]
    assert keys and all(k.startswith("model.adapter.") for k in keys), "only the adapter in checkpoints"
    synth = get("xfusion", adapter=out / "adapter", num_inference_steps=2)
    assert synth(torch.rand(1, 3, 32, 32), generator=gen(0)).labels.all()
    assert main([*args[:-5], "--max-steps", "3", "--output", str(out), "--num-tokens", "2", "-q"]) == 0, "resumes"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_xfusion_generate_cli_and_cache_mode(adapter, tmp_path) -> None:
    from tiny_data import folder_datamodule, make_folder_dataset

    from anomalib_synth.cli import main
    from anomalib_synth.data import SyntheticAnomalyDataModule

    out = tmp_path / "out"
    assert main(["generate", "builtin:brick", str(out), "-s", "xfusion", "--model-path", str(adapter),
                 "-o", "num_inference_steps=2", "-n", "1", "--size", "32", "32", "-q"]) == 0  # fmt: skip
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["label"] is True
    root = make_folder_dataset(tmp_path / "data", size=32, n_train=2, n_test=1)
    synth = get("xfusion", adapter=adapter, num_inference_steps=2)
    dm = SyntheticAnomalyDataModule(folder_datamodule(root), synthesizer=synth, mode="cache", n_shots=2,
                                    variants_per_image=1, synthetic_val=False, image_size=(32, 32),
                                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup()
    assert (dm.train_data.samples.label_index == 1).sum() == 2
