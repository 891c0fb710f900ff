"""The one-prompt segmenter (after MetaUAS): its inputs, its pair sources, its pretraining (seeded, resumable), its
saving, its leakage check and its anomalib wiring. Tiny images (64 px), a few steps, no shared data (values, not
shapes)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tiny_data import make_folder_dataset

from anomalib_synth.io import BUILTIN_PHOTOS, builtin_photo, resize, to_uint8
from anomalib_synth.models.one_prompt_segmenter import OnePromptSegmenterModel, check_segmenter_leakage, pair_sources
from anomalib_synth.models.one_prompt_segmenter.pretrain import pretrain_segmenter
from anomalib_synth.training.leakage import LeakageError

SIZE = 64
CONFIG = Path(__file__).parents[1] / "configs" / "model" / "one_prompt_segmenter.yaml"


def _photo(name: str, size: int = SIZE) -> torch.Tensor:
    return resize(builtin_photo(name), (size, size))


def _save(path: Path, name: str, size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(_photo(name, size))).save(path)
    return path


def _tiny_root(root: Path, with_bottle: bool = True) -> Path:
    """An MVTec-like root (train/good, test/good, a defect and its mask) plus a texture folder."""
    if with_bottle:
        _save(root / "mvtec" / "bottle" / "train" / "good" / "000.png", "coffee")
    _save(root / "mvtec" / "capsule" / "train" / "good" / "000.png", "brick")
    _save(root / "mvtec" / "capsule" / "test" / "good" / "000.png", "gravel")
    _save(root / "mvtec" / "capsule" / "test" / "crack" / "000.png", "camera")
    _save(root / "mvtec" / "capsule" / "ground_truth" / "crack" / "000_mask.png", "camera")
    _save(root / "textures" / "dtd" / "images" / "banded" / "banded_0001.jpg", "grass")
    return root


@pytest.fixture(scope="module")
def model() -> OnePromptSegmenterModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return OnePromptSegmenterModel().eval()


def _pretrain(root: Path, output: Path, **kwargs):
    args = {"exclude": [], "steps": 4, "batch_size": 4, "image_size": SIZE, "checkpoint_every": 2,
            "builtin_photos": False, "progress": False, "threads": 1}  # fmt: skip
    args.update(kwargs)
    return pretrain_segmenter([root], args.pop("exclude"), output, **args)


# --- the model ---------------------------------------------------------------------------------------------------
def test_identical_query_and_prompt_give_zero_nearest_distance(model) -> None:
    coffee, brick = _photo("coffee")[None], _photo("brick")[None]
    with torch.no_grad():
        lower, skip = model.decoder_inputs(model.embed(coffee), model.embed(coffee))
        assert lower[:, -1].abs().max() < 1e-5 and skip[:, -1].abs().max() < 1e-5
        other, _ = model.decoder_inputs(model.embed(brick), model.embed(coffee))
        assert other[:, -1].mean() > 0.1, "another image is far from the prompt"
        both = {k: torch.cat([v1, v2]) for (k, v1), v2 in
                zip(model.embed(brick).items(), model.embed(coffee).values())}  # fmt: skip
        lower_k, _ = model.decoder_inputs(model.embed(coffee), both)
        assert lower_k[:, -1].abs().max() < 1e-5, "k prompts: every position is matched in the identical one"


def test_eval_forward_gives_probabilities_and_the_score_of_the_map(model) -> None:
    model.set_prompts(_photo("coffee")[None])
    with torch.no_grad():
        out = model(torch.stack([_photo("coffee"), _photo("brick")]))
    amap = out.anomaly_map
    assert amap.min() >= 0 and amap.max() <= 1
    top = amap.flatten(1).topk(math.ceil(SIZE * SIZE / 100), dim=1).values.mean(1)
    torch.testing.assert_close(out.pred_score, top)


def test_backbone_is_frozen_and_not_saved(model, tmp_path) -> None:
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    model.save_pretrained(tmp_path / "m")
    assert not any(k.startswith("feature_extractor") for k in load_file(tmp_path / "m" / "model.safetensors"))


def test_missing_or_invalid_folder_raises_one_line_naming_it(tmp_path) -> None:
    for folder in (tmp_path / "nope", tmp_path):
        with pytest.raises(ValueError, match=str(folder)) as err:
            OnePromptSegmenterModel.from_pretrained(folder)
        assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="unreadable config.json"):
        OnePromptSegmenterModel.from_pretrained(tmp_path)


# --- pair sources ------------------------------------------------------------------------------------------------
def test_leave_out_by_name_excludes_the_category_from_every_root(tmp_path) -> None:
    first = _tiny_root(tmp_path / "a")
    second = tmp_path / "b"
    _save(second / "other_set" / "bottle" / "train" / "good" / "007.png", "coffee")
    _save(second / "loco" / "juice_bottle" / "train" / "good" / "000.png", "coffee")
    sources = pair_sources([first, second], ["bottle"], builtin_photos=False)
    relative = sorted(str(Path(s).relative_to(tmp_path)) for s in sources)
    assert relative == ["a/mvtec/capsule/test/good/000.png", "a/mvtec/capsule/train/good/000.png",
                        "a/textures/dtd/images/banded/banded_0001.jpg",
                        "b/loco/juice_bottle/train/good/000.png"]  # fmt: skip
    kept = pair_sources([first, second], [], builtin_photos=False)
    assert len(kept) == 6, "without the exclusion both bottle images are sources"


def test_only_good_images_and_the_builtin_photos_are_sources(tmp_path) -> None:
    sources = pair_sources([_tiny_root(tmp_path)], ["bottle"])
    files = [Path(s) for s in sources if not str(s).startswith("builtin:")]
    assert all("crack" not in f.parts and "ground_truth" not in f.parts for f in files)
    assert [f.parent.name for f in files] == ["good", "good", "banded"]
    assert [s for s in sources if str(s).startswith("builtin:")] == [f"builtin:{n}" for n in BUILTIN_PHOTOS]
    assert "builtin:brick" not in pair_sources([tmp_path], ["brick"]), "builtin photos are left out by name too"


# --- pretraining -------------------------------------------------------------------------------------------------
def test_loss_falls_over_thirty_steps(tmp_path) -> None:
    result = _pretrain(_tiny_root(tmp_path / "data"), tmp_path / "run", steps=30, checkpoint_every=30, lr=3e-3)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert len(result.losses) == 30
    assert last < 0.9 * first, (first, last)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path) -> None:
    root = _tiny_root(tmp_path / "data")
    runs = {name: _pretrain(root, tmp_path / name, steps=3, seed=seed)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}  # fmt: skip
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in runs}
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert runs["a"].losses == runs["b"].losses
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path) -> None:
    root = _tiny_root(tmp_path / "data")
    straight = _pretrain(root, tmp_path / "straight", steps=6)

    def interrupt(step: int, loss: float) -> None:
        if step == 3:  # after the checkpoint of step 2: step 3 is lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _pretrain(root, tmp_path / "resumed", steps=6, callback=interrupt)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = _pretrain(root, tmp_path / "resumed", steps=6)
    assert resumed.resumed_from == 2
    assert resumed.losses == straight.losses
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from anomalib_synth.errors import RunMismatchError

    with pytest.raises(RunMismatchError, match="other settings"):
        _pretrain(root, tmp_path / "resumed", steps=6, seed=5)


def test_save_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    result = _pretrain(_tiny_root(tmp_path / "data"), tmp_path / "run", steps=2)
    loaded = OnePromptSegmenterModel.from_pretrained(tmp_path / "run").eval()
    query, prompt = _photo("camera")[None], _photo("brick")[None]
    with torch.no_grad():
        assert torch.equal(result.model.eval().segment(query, prompt), loaded.segment(query, prompt))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["init_args"]["layers"] == ["blocks.1", "blocks.2"]
    assert config["training_data"] == loaded.training_data and len(loaded.training_data) == 4
    assert config["pretraining"]["steps"] == 2 and config["pretraining"]["cpu_seconds"] > 0


# --- leakage -----------------------------------------------------------------------------------------------------
def test_leakage_check_fails_a_segmenter_trained_on_the_evaluated_category(tmp_path) -> None:
    root = _tiny_root(tmp_path / "data")
    _pretrain(root, tmp_path / "leaky", steps=1)
    with pytest.raises(LeakageError, match="'bottle'"):
        check_segmenter_leakage(tmp_path / "leaky", "bottle", [])
    _pretrain(root, tmp_path / "clean", steps=1, exclude=["bottle"])
    check_segmenter_leakage(tmp_path / "clean", "bottle", [tmp_path / "mvtec" / "bottle" / "test" / "good" / "000.png"])
    tested = root / "mvtec" / "capsule" / "test" / "good" / "000.png"
    with pytest.raises(LeakageError, match="1 of the test images"):  # a test image, under another root too
        check_segmenter_leakage(OnePromptSegmenterModel.from_pretrained(tmp_path / "clean"), "grid",
                                [Path("/elsewhere") / tested.relative_to(root)])  # fmt: skip


# --- anomalib ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A segmenter pretrained for 2 steps on a tiny root (its weights mean nothing; this is wiring)."""
    tmp = tmp_path_factory.mktemp("segmenter")
    _pretrain(_tiny_root(tmp / "data"), tmp / "model", steps=2)
    return tmp / "model"


def test_engine_fit_and_test_on_a_tiny_folder_data_set(tmp_path, tiny_folder) -> None:
    from anomalib.engine import Engine

    from anomalib_synth.models import OnePromptSegmenter
    from anomalib_synth.toydata import toy_folder_datamodule

    model = OnePromptSegmenter(pretrained=str(tiny_folder),
                               pre_processor=OnePromptSegmenter.configure_pre_processor((SIZE, SIZE)))  # fmt: skip
    assert model.configure_optimizers() is None
    datamodule = toy_folder_datamodule(make_folder_dataset(tmp_path / "folder", size=SIZE))
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path / "results", logger=False)
    engine.fit(model=model, datamodule=datamodule)
    assert model.prompts.images.shape == (6, 3, SIZE, SIZE), "the six training images are the prompts"
    assert 0 <= model.prompts.images.min() and model.prompts.images.max() <= 1, "not normalised"
    (results,) = engine.test(model=model, datamodule=datamodule)
    assert {"image_AUROC", "pixel_AUROC"} <= set(results)
    assert all(0 <= results[k] <= 1 for k in ("image_AUROC", "pixel_AUROC"))
    check_segmenter_leakage(model, "tiny", [])  # its pretraining images were not the folder's


def test_model_config_file_builds_the_segmenter(tiny_folder) -> None:
    import importlib

    config = yaml.safe_load(CONFIG.read_text())
    module, _, name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    model = cls(**{**config["init_args"], "pretrained": str(tiny_folder)})
    assert type(model).__name__ == "OnePromptSegmenter" and model.max_prompts == 8
    assert model.model.training_data == OnePromptSegmenterModel.read_config(tiny_folder)["training_data"]
    with pytest.raises(ValueError, match="differs from the pretrained"):
        cls(pretrained=str(tiny_folder), layers=["blocks.2", "blocks.3"])


# --- command line ------------------------------------------------------------------------------------------------
def test_pretrain_segmenter_command(tmp_path, capsys) -> None:
    from anomalib_synth.cli import main

    root = _tiny_root(tmp_path / "data")
    args = ["pretrain-segmenter", "--data-root", str(root), "--exclude", "bottle,grid", "--output",
            str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--image-size", str(SIZE), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "segmenter written to" in capsys.readouterr().out
    config = OnePromptSegmenterModel.read_config(tmp_path / "run")
    assert config["pretraining"]["exclude"] == ["bottle", "grid"]
    assert not any("bottle" in Path(p).parts for p in config["training_data"])
    assert main([*args[:2], str(tmp_path / "missing"), *args[3:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


@pytest.mark.slow
def test_anomalib_synth_train_with_the_segmenter(tmp_path, tiny_folder) -> None:
    import subprocess

    root = make_folder_dataset(tmp_path / "folder", size=SIZE)
    resize_only = {"class_path": "anomalib.pre_processing.PreProcessor",
                   "init_args": {"transform": {"class_path": "torchvision.transforms.v2.Resize",
                                               "init_args": {"size": [SIZE, SIZE]}}}}  # fmt: skip
    command = [sys.executable, "-m", "anomalib_synth.cli", "train",
               "--model", "anomalib_synth.models.OnePromptSegmenter",
               "--model.pretrained", str(tiny_folder), "--model.pre_processor", json.dumps(resize_only),
               "--data", "anomalib.data.Folder", "--data.name", "tiny", "--data.root", str(root),
               "--data.normal_dir", "good", "--data.abnormal_dir", "defect", "--data.normal_test_dir", "test_good",
               "--data.mask_dir", "mask", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
               "--trainer.logger", "false", "--default_root_dir", str(tmp_path / "results")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pixel_AUROC" in result.stdout + result.stderr
