"""AnomalyXFusion: modules, captions, training, adapter save/load (diffusers format and the old one), sampling, CLI
(tiny random models, CPU)."""

from __future__ import annotations

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
from anomalib_synth.synthesizers.diffusion.loading import ModelNotFoundError
from anomalib_synth.synthesizers.diffusion.xfusion import (
    DynamicDifFusion,
    MultiModalInFusion,
    XFusionAdapter,
    XFusionModel,
)
from anomalib_synth.training.captions import CaptionedDefects, match_captions


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
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "XFusionAdapter" and config["base_model"] == str(tiny["sd"])
    assert config["lora_rank"] == 2 and config["num_tokens"] == 2
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "pytorch_lora_weights.safetensors",
    ]
    loaded = XFusionModel(adapter=folder).eval()
    with torch.no_grad():
        assert float(loaded.training_loss(images, masks, captions, **fixed)) == after
        seeds = torch.tensor([3, 4])
        a = model.sample(images, masks, captions, seeds, num_inference_steps=3)
        b = loaded.sample(images, masks, captions, seeds, num_inference_steps=3)
    assert torch.equal(a, b), "save/load reproduces the outputs exactly"
    with pytest.raises(ModelNotFoundError, match="train xfusion"):
        XFusionAdapter.from_pretrained(tmp_path / "nothing")


RECORD = {
    "data_root": "/data/mvtec",
    "images": [{"image": "/data/mvtec/bottle/test/crack/000.png", "masks": ["/data/mvtec/bottle/gt/000_mask.png"],
                "caption": "a crack", "category": "bottle", "defect": "crack"}],
    "keys": ["bottle/test/crack/000.png"],
    "excluded": ["bottle/test/crack/002.png"],
}  # fmt: skip
"""A ``training_data`` record as ``train xfusion`` writes it (see ``anomalib_synth.training.leakage.training_data``)."""


def public_config(adapter: XFusionAdapter) -> dict:
    return {k: v for k, v in adapter.config.items() if not k.startswith("_")}


def with_trained_lora(model: XFusionModel, seed: int = 7) -> XFusionModel:
    """Random LoRA ``B`` weights: a new LoRA starts with ``B = 0`` (no effect), so a lost LoRA would go unnoticed."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def samples(model: XFusionModel) -> torch.Tensor:
    images, masks, captions = training_batch()
    return model.sample(images, masks, captions, torch.tensor([3, 4]), num_inference_steps=2)


def test_adapter_is_a_diffusers_model_with_its_config_and_outputs_round_tripped(tiny, tmp_path) -> None:
    """``save_pretrained`` / ``from_pretrained`` are diffusers' own: the same config (training images included),
    the same weights, the same samples for the same seed and image; the leakage check reads the images back."""
    from diffusers import ConfigMixin, ModelMixin

    from anomalib_synth.training.leakage import training_images_of

    torch.manual_seed(0)
    model = XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2).eval()
    assert isinstance(model.adapter, ModelMixin) and isinstance(model.adapter, ConfigMixin)
    assert model.adapter.training_data is None
    model.adapter.training_data = RECORD
    assert model.adapter.config.training_data == RECORD, "the record is a config entry"
    model.adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    loaded = XFusionAdapter.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is XFusionAdapter and public_config(loaded) == public_config(model.adapter)
    assert public_config(loaded) == {"dim": 32, "num_tokens": 2, "text_dim": 32, "image_dim": 16,
                                     "base_model": str(tiny["sd"]), "clip_model": str(tiny["clip"]), "lora_rank": 0,
                                     "training_data": RECORD}  # fmt: skip
    state, loaded_state = model.adapter.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert torch.equal(samples(XFusionModel(adapter=loaded).eval()), samples(model))
    assert not torch.equal(samples(XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2).eval()), samples(model)), (
        "another adapter gives other samples: the comparison above can fail"
    )
    assert training_images_of(tmp_path / "adapter") == [RECORD["images"][0]["image"]]


def write_old_format(model: XFusionModel, folder: Path) -> Path:
    """An adapter folder as it was written before the diffusers format (the format is frozen: written by hand)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.adapter.state_dict().items()}, str(folder / "adapter.safetensors"))
    save_file(get_peft_model_state_dict(model.unet), str(folder / "lora.safetensors"))
    settings = {"type": "xfusion", **model.adapter.settings, "training_data": model.adapter.training_data}
    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    return folder


def test_old_adapter_format_loads_with_a_deprecation_warning(tiny, tmp_path) -> None:
    import warnings

    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from anomalib_synth.training.leakage import training_images_of

    torch.manual_seed(0)
    model = with_trained_lora(XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2, lora_rank=2)).eval()
    model.adapter.training_data = RECORD
    old = write_old_format(model, tmp_path / "old")
    with pytest.warns(DeprecationWarning, match="old format"):
        adapter = XFusionAdapter.from_pretrained(old)
    assert public_config(adapter) == public_config(model.adapter)
    state = model.adapter.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in adapter.state_dict().items())
    with pytest.warns(DeprecationWarning, match="old format"):
        loaded = XFusionModel(adapter=old).eval()
    lora, loaded_lora = model.lora_state(), loaded.lora_state()
    assert lora.keys() == loaded_lora.keys() and all(torch.equal(lora[k], loaded_lora[k]) for k in lora)
    expected = samples(model)
    assert torch.equal(samples(loaded), expected)
    assert not torch.equal(samples(XFusionModel(adapter=adapter).eval()), expected), "a fresh LoRA differs"
    assert training_images_of(old) == [RECORD["images"][0]["image"]]

    new = loaded.save_adapter(tmp_path / "new")  # re-saved in the current format: no warning, the same samples
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert torch.equal(samples(XFusionModel(adapter=new).eval()), expected)
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(
        new, weight_name="pytorch_lora_weights.safetensors"
    )  # diffusers' own file: any SD pipeline reads it
    read = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    assert read.keys() == lora.keys() and all(torch.equal(read[k], lora[k]) for k in lora)


def test_missing_or_foreign_adapter_folders_raise_model_not_found(tiny, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "nothing", empty):
        with pytest.raises(ModelNotFoundError, match="train xfusion"):
            XFusionAdapter.from_pretrained(folder)
    XFusionAdapter(dim=8, num_tokens=1).save_pretrained(tmp_path / "no-weights")
    (tmp_path / "no-weights" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="train xfusion"):
        XFusionAdapter.from_pretrained(tmp_path / "no-weights")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelNotFoundError, match="UNet2DConditionModel"):
        XFusionAdapter.from_pretrained(tmp_path / "unet")
    torch.manual_seed(0)
    XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2, lora_rank=2).adapter.save_pretrained(tmp_path / "no-lora")
    with pytest.raises(ModelNotFoundError, match="pytorch_lora_weights"):
        XFusionModel(adapter=tmp_path / "no-lora")
    with pytest.raises(ModelNotFoundError, match="train xfusion"):
        get("xfusion", adapter=empty)


def test_the_synthesizer_does_not_import_lightning() -> None:
    """Lightning sits at the edge: the package and the registered synthesizer load without it;
    ``XFusionTraining`` (on demand) brings it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import anomalib_synth.synthesizers.diffusion.xfusion as xfusion\n"
        "from anomalib_synth.synthesizers import get_class\n"
        "assert get_class('xfusion') is xfusion.XFusionSynthesizer\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
        "xfusion.XFusionTraining\n"
        "print('lightning' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])  # fmt: skip
    assert out.stdout.split() == ["[]", "True"], out.stdout + out.stderr


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2).save_adapter(tmp_path_factory.mktemp("xf") / "adapter")


def reference_mask(size: int = 40) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[10:26, 8:22] = 255
    return mask


def write_references(folder: Path, names: tuple[str, ...] = ("brick", "grass"), outside: float | None = None,
                     size: int = 40) -> Path:  # fmt: skip
    """Defect images with their masks (``<stem>_mask.png``); ``outside`` paints every pixel outside the mask."""
    folder.mkdir(parents=True, exist_ok=True)
    mask = reference_mask(size)
    for name in names:
        image = to_uint8(resize(builtin_photo(name), (size, size)))
        if outside is not None:
            image[mask == 0] = int(outside * 255)
        Image.fromarray(image).save(folder / f"{name}.png")
        Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return folder


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    return write_references(tmp_path_factory.mktemp("xf-refs"))


def test_xfusion_synthesizer_pastes_back_outside_the_mask(adapter, refs, object_on_background, tmp_path) -> None:
    images, _ = object_on_background
    synth = get("xfusion", adapter=adapter, references=refs, category="bottle", num_inference_steps=3)
    out = synth(images, generator=gen(0))
    label = out.masks.bool()
    assert out.labels.all()
    assert torch.equal(out.images[~label.expand_as(images)], images[~label.expand_as(images)])
    assert (out.images - images).abs()[label.expand_as(images)].mean() > 1e-3
    assert torch.equal(synth(images, generator=gen(0)).images, out.images)
    other = get("xfusion", model=adapter, references=write_references(tmp_path / "other", ("coffee", "gravel")),
                category="bottle", num_inference_steps=3)  # fmt: skip
    referenced = other(images, generator=gen(0))
    assert torch.equal(referenced.masks, out.masks), "same draws: only the textural embedding differs"
    assert not torch.equal(referenced.images, out.images), "the reference defect changes the synthesis"
    assert {p["reference"] for p in other(images.repeat(4, 1, 1, 1), generator=gen(1)).params} == {0, 1}
    with pytest.raises(ValueError, match="adapter"):
        get("xfusion")
    with pytest.raises(ValueError, match="references="):
        get("xfusion", adapter=adapter)  # no references and no training images recorded in the adapter
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.fromarray(to_uint8(resize(builtin_photo("brick"), (40, 40)))).save(bare / "brick.png")
    with pytest.raises(ValueError, match="own mask"):
        get("xfusion", adapter=adapter, references=bare)


def test_texture_is_a_reference_defect_times_its_own_mask(adapter, tmp_path, monkeypatch) -> None:
    """Eq. 3 at inference as in training: CLIP(reference * reference mask), not the normal input, not a whole image."""
    images = resize(builtin_photo("coffee"), (32, 32))[None].repeat(2, 1, 1, 1)
    black = write_references(tmp_path / "black", ("brick",), outside=0.0, size=32)  # at model size: no resampling
    white = write_references(tmp_path / "white", ("brick",), outside=1.0, size=32)
    seen = []
    original = XFusionModel.encode_texture

    def spy(self, texture_images, texture_masks):
        seen.append((texture_images.clone(), texture_masks.clone()))
        return original(self, texture_images, texture_masks)

    monkeypatch.setattr(XFusionModel, "encode_texture", spy)
    outputs = []
    for folder in (black, white):
        synth = get("xfusion", adapter=adapter, reference_dir=folder, category="bottle", num_inference_steps=2)
        outputs.append(synth(images, generator=gen(0)))
    reference_masks = [m for _, m in seen]
    expected = (torch.from_numpy(reference_mask(32)) > 0).float()[None, None]
    assert all(torch.equal(m, expected) for m in reference_masks), "the reference's own defect mask"
    assert torch.equal(outputs[0].images, outputs[1].images), "pixels outside the reference mask play no part"
    inside = write_references(tmp_path / "grass", ("grass",), outside=0.0, size=32)
    changed = get("xfusion", adapter=adapter, references=inside, category="bottle", num_inference_steps=2)
    assert not torch.equal(changed(images, generator=gen(0)).images, outputs[0].images), "the defect region does"


def test_label_is_exactly_the_regenerated_region(adapter, refs, monkeypatch) -> None:
    """Every pixel the label claims lies in a latent cell that sampling regenerated, and every such cell is
    labelled: a nearest-downsampled latent mask drops thin or odd-placed mask pixels that the label still claims."""
    from anomalib_synth.synthesizers.diffusion.xfusion import sampling

    latents = {}
    original_encode, original_decode = sampling.encode, sampling.decode
    monkeypatch.setattr(sampling, "encode", lambda vae, x, g=None: latents.setdefault("z0", original_encode(vae, x, g)))
    monkeypatch.setattr(sampling, "decode", lambda vae, z: latents.setdefault("z", z) is z and original_decode(vae, z))
    synth = get("xfusion", adapter=adapter, reference_dir=refs, category="bottle", num_inference_steps=2)
    images = torch.stack([resize(builtin_photo(n), (32, 32)) for n in ("coffee", "brick")])
    params = synth.sample_params(images, None, gen(0))
    masks = params["mask"].clone()
    masks[1] = False
    masks[1, 0, 5, 7] = masks[1, 0, 9, 20:27:2] = masks[1, 0, 17:30, 21] = True  # odd pixels and a 1-px line
    params["mask"] = masks
    out = synth.apply(images, params)
    label = out.masks.bool()
    regenerated = (latents["z"] != latents["z0"]).any(1, keepdim=True)  # [B, 1, 16, 16]: the VAE halves the side
    regenerated_pixels = regenerated.repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert (masks <= label).all(), "the label covers the drawn mask"
    assert not (label & ~regenerated_pixels).any(), "a labelled pixel whose latent cell was never regenerated"
    assert torch.equal(label, regenerated_pixels), "the label is exactly the regenerated region"
    assert torch.equal(out.images[~label.expand_as(images)], images[~label.expand_as(images)])


def test_guidance_is_on_by_default(adapter, refs) -> None:
    """Classifier-free guidance (trained for by caption dropout) runs by default: two UNet passes per step."""
    synth = get("xfusion", adapter=adapter, reference_dir=refs, num_inference_steps=3)
    assert synth.guidance_scale == 5.0 and synth.config()["guidance_scale"] == 5.0
    calls = []
    handle = synth.core.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        synth(torch.rand(1, 3, 32, 32), generator=gen(0))
    finally:
        handle.remove()
    assert len(calls) == 2 * 3


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


def test_xfusion_generate_cli_and_cache_mode(adapter, refs, tmp_path) -> None:
    from tiny_data import folder_datamodule, make_folder_dataset

    from anomalib_synth.cli import main
    from anomalib_synth.data import SyntheticAnomalyDataModule

    out = tmp_path / "out"
    assert main(["generate", "builtin:brick", str(out), "-s", "xfusion", "--model-path", str(adapter),
                 "-o", f"references={refs}", "-o", "num_inference_steps=2", "-n", "1", "--size", "32", "32",
                 "-q"]) == 0  # fmt: skip
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["label"] is True
    root = make_folder_dataset(tmp_path / "data", size=32, n_train=2, n_test=1)
    synth = get("xfusion", adapter=adapter, references=refs, num_inference_steps=2)
    dm = SyntheticAnomalyDataModule(folder_datamodule(root), synthesizer=synth, mode="cache", n_shots=2,
                                    variants_per_image=1, synthetic_val=False, image_size=(32, 32),
                                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup()
    assert (dm.train_data.samples.label_index == 1).sum() == 2


def test_train_xfusion_exclusions_recorded_images_and_leakage_check(tiny, tmp_path, capsys) -> None:
    """MVTec-Caption captions test anomalies: `train xfusion` can leave images out, records what it trained on, and
    the evaluation harness refuses a synthesizer whose adapter saw the images it tests on."""
    from anomalib_synth.cli import main
    from anomalib_synth.evaluation.protocols import make_synthesizer
    from anomalib_synth.training.leakage import LeakageError, LeakageWarning, check_leakage

    fake = fake_captioned_mvtec(tmp_path / "data")
    split = tmp_path / "split.txt"
    split.write_text("# the evaluation's test images\nbottle/test/crack/002.png\n")
    out = tmp_path / "run"
    args = ["train", "xfusion", "--data-root", str(fake["root"]), "--captions", str(fake["captions"]),
            "--base-model", str(tiny["sd"]), "--clip-model", str(tiny["clip"]), "--max-steps", "1",
            "--batch-size", "1", "--image-size", "32", "--num-tokens", "2", "-q"]  # fmt: skip
    assert main([*args, "--output", str(out), "--exclude-images", "juice/test/logical/001.png",
                 "--exclude-split", str(split)]) == 0  # fmt: skip
    record = json.loads((out / "adapter" / "config.json").read_text())["training_data"]
    assert record["keys"] == ["bottle/test/crack/000.png"]
    assert record["excluded"] == ["bottle/test/crack/002.png", "juice/test/logical/001.png"]
    trained = fake["root"] / "bottle" / "test" / "crack" / "000.png"
    assert record["images"][0]["image"] == str(trained.resolve()) and record["images"][0]["masks"]

    synth = get("xfusion", adapter=out / "adapter", num_inference_steps=1)  # references: the training images
    assert synth.source_images == [str(trained.resolve())]
    assert synth(torch.rand(1, 3, 32, 32), generator=gen(0)).labels.all()
    elsewhere = tmp_path / "copy" / "bottle" / "test" / "crack" / "000.png"  # the same MVTec image, another root
    with pytest.raises(LeakageError, match="1 of the images"):
        check_leakage(synth, [elsewhere, fake["root"] / "bottle" / "test" / "good" / "000.png"])
    with pytest.warns(LeakageWarning):
        assert check_leakage(out / "adapter", [trained], on_overlap="warn") == ["bottle/test/crack/000.png"]
    assert check_leakage(synth, [fake["root"] / "bottle" / "test" / "crack" / "002.png"]) == [], "excluded"
    with pytest.raises(LeakageError):
        make_synthesizer("xfusion", None, test_images=[trained], adapter=out / "adapter", num_inference_steps=1)
    assert make_synthesizer("perlin", None, test_images=[trained]).name == "perlin", "nothing seen, nothing to check"

    assert main([*args, "--output", str(tmp_path / "none"), "--exclude-categories", "bottle,juice"]) == 2
    assert "nothing left to train on" in capsys.readouterr().err


def test_xfusion_samples_with_ddim_whatever_the_checkpoint_ships(tiny, adapter, refs, photos, tmp_path) -> None:
    # the latent is blended with the re-noised input between steps: PNDM (SD 1.5's scheduler) would drop the blend
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    pipe.save_pretrained(tmp_path / "pndm")
    kwargs = {"adapter": adapter, "references": refs, "category": "bottle", "num_inference_steps": 4}
    shipped_pndm = get("xfusion", base_model=tmp_path / "pndm", **kwargs)(photos[:2], generator=gen(5))
    shipped_ddim = get("xfusion", **kwargs)(photos[:2], generator=gen(5))
    assert torch.equal(shipped_pndm.images, shipped_ddim.images)


def test_an_interrupted_adapter_save_keeps_the_previous_adapter(tiny, tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2)
    folder = model.save_adapter(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def killed_midway(self, target, **kwargs):
        (Path(target) / "config.json").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(XFusionAdapter, "save_pretrained", killed_midway)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    XFusionModel(adapter=folder)  # still loads


def test_the_old_save_pretrained_call_with_a_lora_state_still_saves_the_lora(tiny, tmp_path) -> None:
    torch.manual_seed(0)
    model = with_trained_lora(XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2, lora_rank=2))
    with pytest.warns(DeprecationWarning, match="save_adapter"):
        model.adapter.save_pretrained(tmp_path / "old-call", model.lora_state())
    loaded = XFusionModel(adapter=tmp_path / "old-call")
    lora, read = model.lora_state(), loaded.lora_state()
    assert lora.keys() == read.keys() and all(torch.equal(lora[k], read[k]) for k in lora)


def test_an_adapter_with_lora_loads_from_a_home_relative_path(tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.manual_seed(0)
    model = with_trained_lora(XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2, lora_rank=2))
    model.save_adapter(tmp_path / "run" / "adapter")
    loaded = XFusionModel(adapter="~/run/adapter")
    lora, read = model.lora_state(), loaded.lora_state()
    assert lora.keys() == read.keys() and all(torch.equal(lora[k], read[k]) for k in lora)
