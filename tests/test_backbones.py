"""Offline pretrained backbones: a local weights file registered as a timm pretrained tag (anomalib_synth.backbones)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from tiny_data import folder_datamodule_config, make_folder_dataset

from anomalib_synth.backbones import (
    BackboneWeightsError,
    check_pretrained,
    explain_missing_weights,
    parse_weights_spec,
    register_weights,
)
from anomalib_synth.io import builtin_photo, resize

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch) -> None:
    """Converted weights go to a per-session folder, not ~/.cache."""
    monkeypatch.setenv("ANOMALIB_SYNTH_CACHE", str(tmp_path_factory.getbasetemp() / "anomalib_synth_cache"))


def _imagenet_class(model: torch.nn.Module, photo: str) -> int:
    image = (resize(builtin_photo(photo), (224, 224)) - IMAGENET[0]) / IMAGENET[1]
    with torch.no_grad():
        return int(model(image[None]).argmax())


def test_builtin_efficientnet_lite0_classifies_imagenet_photos() -> None:
    """The package's state dict (other names, same order and shapes) converted into timm's EfficientNet-Lite0."""
    assert register_weights("efficientnet_lite0.local") == "efficientnet_lite0.local"
    model = timm.create_model("efficientnet_lite0.local", pretrained=True).eval()
    assert 281 <= _imagenet_class(model, "chelsea") <= 285, "a cat (ImageNet 281-285)"
    assert _imagenet_class(model, "coffee") == 967, "espresso"
    assert check_pretrained("efficientnet_lite0.local").startswith("file:")


def _random_resnet18(path: Path, rename: bool) -> dict[str, torch.Tensor]:
    """A resnet18 state dict in which every tensor differs from its initial value: BatchNorm's weight, bias, running
    statistics and counters too (initialised to 1, 0, 0, 1 and 0, a conversion that dropped them would go unseen)."""
    torch.manual_seed(0)
    state = timm.create_model("resnet18").state_dict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif value.ndim == 1:  # BatchNorm's tensors (and the classifier's bias)
            positive = key.endswith(("running_var", "weight"))
            state[key] = torch.rand(value.shape) + 0.5 if positive else torch.randn(value.shape)
    saved = {f"t{i:03d}": v for i, v in enumerate(state.values())} if rename else state
    torch.save(saved, path)
    return state


@pytest.mark.parametrize("rename", [False, True], ids=["timm-names", "other-names"])
def test_registered_file_feeds_anomalib_models_from_python(tmp_path, rename: bool) -> None:
    from anomalib.models import Patchcore

    state = _random_resnet18(tmp_path / "r18.pth", rename)
    name = f"resnet18.mine{int(rename)}"
    register_weights(name, tmp_path / "r18.pth")
    model = Patchcore(backbone=name, layers=["layer2", "layer3"], pre_trained=True)
    extractor = model.model.feature_extractor
    loaded = extractor.feature_extractor.state_dict()
    assert "layer3.1.bn2.running_var" in loaded
    different = [key for key, value in loaded.items() if not torch.equal(value, state[key])]
    assert not different, f"tensors changed on the way: {different[:5]}"
    reference = timm.create_model("resnet18")
    reference.load_state_dict(state)
    reference.eval()
    image = resize(builtin_photo("coffee"), (64, 64))[None]
    with torch.no_grad():
        x = reference.maxpool(reference.act1(reference.bn1(reference.conv1(image))))
        expected = reference.layer3(layer2 := reference.layer2(reference.layer1(x)))
        features = extractor.eval()(image)
    assert torch.allclose(features["layer2"], layer2, atol=1e-5)
    assert torch.allclose(features["layer3"], expected, atol=1e-5)



def test_a_renamed_file_without_classifier_and_batchnorm_counters_fits(tmp_path) -> None:
    """Under other names, the classifier and BatchNorm's ``num_batches_tracked`` counters may be missing: the body is
    paired by order and shape, the counters are set to 0."""
    state = _random_resnet18(tmp_path / "full.pth", rename=False)
    body = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    torch.save({f"t{i:03d}": v for i, v in enumerate(body.values())}, tmp_path / "bare.pth")
    register_weights("resnet18.bare", tmp_path / "bare.pth")
    loaded = timm.create_model("resnet18.bare", pretrained=True).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in body.items())
    counters = [k for k in loaded if k.endswith("num_batches_tracked")]
    assert counters and all(int(loaded[k]) == 0 for k in counters)


def test_a_renamed_file_is_converted_once_into_the_cache_folder(tmp_path, monkeypatch) -> None:
    import anomalib_synth.backbones as backbones

    _random_resnet18(tmp_path / "r18.pth", rename=True)
    register_weights("resnet18.once", tmp_path / "r18.pth")
    converted = Path(backbones.registered()["resnet18.once"])
    assert converted.parent == Path(os.environ["ANOMALIB_SYNTH_CACHE"]) / "backbones" and converted.is_file()
    stamp = converted.stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("the source file was read and fitted again")

    monkeypatch.setattr(backbones, "load_weights", no_reading)
    register_weights("resnet18.again", tmp_path / "r18.pth")
    assert backbones.registered()["resnet18.again"] == str(converted) and converted.stat().st_mtime_ns == stamp

def test_a_file_that_does_not_fit_names_the_tensor_and_both_shapes(tmp_path) -> None:
    state = _random_resnet18(tmp_path / "ok.pth", rename=False)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match=r"'layer1\.0\.conv1\.weight' has shape \(64, 64, 1, 1\), "
                                                   r"resnet18 expects \(64, 64, 3, 3\)"):  # fmt: skip
        register_weights("resnet18.bad", tmp_path / "bad.pth")
    renamed = {f"t{i}": v for i, v in enumerate(state.values())}
    torch.save(renamed, tmp_path / "bad_renamed.pth")
    with pytest.raises(
        BackboneWeightsError,
        match=r"tensor #\d+ 't\d+' has shape \(64, 64, 1, 1\), resnet18's "
        r"tensor #\d+ 'layer1\.0\.conv1\.weight' expects \(64, 64, 3, 3\)",
    ):
        register_weights("resnet18.bad", tmp_path / "bad_renamed.pth")
    with pytest.raises(BackboneWeightsError, match="has 122 tensors .* efficientnet_lite0 has 296"):
        register_weights("efficientnet_lite0.bad", tmp_path / "ok.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="cannot read .*junk.pth"):
        register_weights("resnet18.bad", tmp_path / "junk.pth")
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        register_weights("resnet18.bad", tmp_path / "missing.pth")
    with pytest.raises(BackboneWeightsError, match="no architecture 'resnet1800'"):
        register_weights("resnet1800.local", tmp_path / "ok.pth")
    with pytest.raises(BackboneWeightsError, match="NAME=PATH"):
        parse_weights_spec("resnet18.local")


def test_pretrained_with_no_weights_reachable_is_a_clear_error(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty hub cache
    torch.hub.set_dir(str(tmp_path / "torch"))
    try:
        with pytest.raises(BackboneWeightsError, match="none are reachable.*--backbone-weights"):
            check_pretrained("efficientnet_lite0", offline=True)
        assert check_pretrained("efficientnet_lite0", offline=False) == "download"
        with pytest.raises(BackboneWeightsError, match="knows none under that name"):
            check_pretrained("resnet18.nowhere")
    finally:
        torch.hub.set_dir(str(Path(torch.hub.get_dir()).parent / "hub"))
    with (
        pytest.raises(BackboneWeightsError, match="could not be loaded.*efficientnet_lite0.local"),
        explain_missing_weights(),
    ):
        timm.create_model("resnet18.nowhere", pretrained=True)


MISSING_FROM_ANOMALIB = """
from anomalib.models import Patchcore
from anomalib_synth.backbones import explain_missing_weights
with explain_missing_weights():
    Patchcore(backbone="resnet18", layers=["layer2"])
"""


@pytest.mark.slow
def test_anomalib_model_without_reachable_weights_explains_offline_use(tmp_path) -> None:
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run([sys.executable, "-c", MISSING_FROM_ANOMALIB], capture_output=True, text=True, env=env,
                            timeout=600, check=False)  # fmt: skip
    assert result.returncode != 0
    assert "BackboneWeightsError: pre_trained backbone weights could not be loaded" in result.stderr
    assert "--backbone-weights" in result.stderr


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "anomalib_synth.cli", *args]
    env = {**ENV, "ANOMALIB_SYNTH_CACHE": str(cwd / "cache")}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False)


@pytest.mark.slow
def test_backbone_weights_option_of_anomalib_train(tmp_path) -> None:
    root = make_folder_dataset(tmp_path / "data")
    _random_resnet18(tmp_path / "r18.pth", rename=True)
    result = _cli("train", "--backbone-weights", f"resnet18.mine={tmp_path / 'r18.pth'}", "--model", "Padim",
                  "--model.backbone", "resnet18.mine", "--model.layers", "[layer1, layer2]", "--model.n_features", "50",
                  "--data", "Folder",
                  "--data.name", "tiny", "--data.root", str(root), "--data.normal_dir", "good",
                  "--data.abnormal_dir", "defect", "--data.mask_dir", "mask", "--data.normal_test_dir", "test_good",
                  "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                  "--trainer.logger", "false", "--default_root_dir", str(tmp_path / "results"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    bad = _cli("evaluate", "--data-root", str(tmp_path), "--categories", "x", "--output", str(tmp_path / "o"),
               "--backbone-weights", f"resnet18.local={tmp_path / 'nothing.pth'}", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.slow
def test_offline_supersimplenet_config_trains_through_anomalib_synth_train(tmp_path) -> None:
    """configs/supersimplenet_1shot_offline.yaml on tiny data: SuperSimpleNet builds on efficientnet_lite0.local."""
    root = make_folder_dataset(tmp_path / "data")
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "supersimplenet_1shot_offline.yaml").read_text())
    assert config["model"]["init_args"]["backbone"] == "efficientnet_lite0.local"
    config["trainer"] = {"max_epochs": 2, "accelerator": "cpu", "logger": False}
    config["default_root_dir"] = str(tmp_path / "results")
    config["model"]["init_args"]["pre_processor"] = {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {"transform": {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [128, 128]}}},
    }  # fmt: skip
    wrapper = config["data"]["init_args"]
    wrapper["cache_dir"] = str(tmp_path / "cache")
    wrapper["datamodule"] = folder_datamodule_config(root)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _cli("train", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "results" / "Supersimplenet" / "tiny").rglob("*.ckpt"))
