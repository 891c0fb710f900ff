"""The PatchCore refiner: PatchCore at initialisation, the right head inputs, training mechanics, anomalib wiring.

Everything runs at 64 px on a randomly initialised ResNet-18 (no weights, no data set)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_data import folder_datamodule_config, make_folder_dataset

from anomalib_synth.io import builtin_photo, resize
from anomalib_synth.models.patchcore_refiner import PatchcoreRefinerModel, train_refiner
from anomalib_synth.synthesizers.mix import build

SIZE = 64
TINY = {"backbone": "resnet18", "layers": ("layer1", "layer2"), "pre_trained": False}
CONFIG = Path(__file__).parents[1] / "configs" / "model" / "patchcore_refiner.yaml"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: the small matrices here are slower with two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shot() -> torch.Tensor:
    return resize(builtin_photo("coffee"), (SIZE, SIZE))[None]


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    return torch.stack([resize(builtin_photo(n), (SIZE, SIZE)) for n in ("coffee", "brick", "gravel")])


def fitted(shot: torch.Tensor, seed: int = 0, **kwargs) -> PatchcoreRefinerModel:
    torch.manual_seed(0)  # the random backbone (timm's init uses the global RNG)
    model = PatchcoreRefinerModel(**TINY, seed=seed, **kwargs).eval()
    model.fit(shot, gen(1), n_views=4)
    return model


def synth():
    return build("cutpaste+nsa")


# --- PatchCore at initialisation ------------------------------------------------------------------------------------
def test_untrained_refiner_is_patchcore(shot, queries) -> None:
    model = fitted(shot)
    with torch.no_grad():
        refined, z = model.maps(queries)
        normalised = (queries - model.pixel_mean) / model.pixel_std
        raw = model.patchcore(normalised).anomaly_map[:, 0]  # anomalib's PatchCore forward on the same bank
    assert refined.shape == z.shape == (3, SIZE, SIZE)
    assert torch.equal(refined, z), "an untrained refiner's map is PatchCore's normalised map, bit for bit"
    torch.testing.assert_close(z * model.map_std + model.map_mean, raw)
    # z is a positive affine map of PatchCore's, measured by fit: the same ranking of pixels
    assert float(model.map_std) > 0 and float(model.map_std) != 1.0
    out = model(queries)
    assert torch.equal(out.anomaly_map[:, 0], refined)
    assert torch.equal(out.pred_score, refined.flatten(1).amax(1))


def test_head_last_convolution_is_zero_and_others_are_not(shot) -> None:
    model = fitted(shot)
    assert not model.head.out.weight.any() and not model.head.out.bias.any()
    assert model.head.body[0].weight.abs().sum() > 0 and model.head.residual.weight.abs().sum() > 0
    with torch.no_grad():  # a non-zero last layer changes the map: the equality above tests the initialisation
        model.head.out.bias.fill_(0.5)
        refined, z = model.maps(shot)
    assert not torch.equal(refined, z)


def test_smoothing_is_anomalibs(shot) -> None:
    model = fitted(shot)
    patch = torch.rand(2, 1, SIZE // 4, SIZE // 4, generator=gen(0))
    torch.testing.assert_close(model.smooth(patch, (SIZE, SIZE)),
                               model.patchcore.anomaly_map_generator(patch, (SIZE, SIZE)), atol=1e-5, rtol=1e-5)  # fmt: skip


# --- head inputs ----------------------------------------------------------------------------------------------------
def test_distance_of_an_image_to_a_bank_holding_it_is_zero(shot) -> None:
    model = fitted(shot)
    inputs = model._inputs(shot, standardise=False)
    assert inputs["distances"].shape[1] == len(TINY["layers"]) + 1, "one map per layer, then PatchCore's"
    assert inputs["distances"].abs().max() < 1e-2 * inputs["embedding"].abs().max()
    assert inputs["residual"].abs().max() < 1e-3 * inputs["embedding"].abs().max()
    other = model._inputs(resize(builtin_photo("brick"), (SIZE, SIZE))[None], standardise=False)
    assert (other["distances"].flatten(2).mean(2) > 0.1).all()


def test_residual_is_gathered_at_the_nearest_memory_feature(shot) -> None:
    model = fitted(shot)
    embedding = model.embed(shot)
    flat = model.patchcore.reshape_embedding(embedding)
    n, c = flat.shape
    # row i of the bank is patch i moved by its own small offset (norm <= 2e-3, patches lie >= 0.1 apart), shuffled
    offset = 1e-4 * (1 + torch.arange(n, dtype=flat.dtype).unsqueeze(1) / n) * torch.linspace(-1, 1, c)
    permutation = torch.randperm(n, generator=gen(3))
    model.patchcore.memory_bank = (flat + offset)[permutation]
    inputs = model._inputs(shot, standardise=False)
    expected = offset.abs().reshape(1, *embedding.shape[-2:], c).permute(0, 3, 1, 2)
    torch.testing.assert_close(inputs["residual"], expected, atol=1e-6, rtol=1e-3)
    _, locations = model.patchcore.nearest_neighbors(flat, 1)
    assert torch.equal(permutation[locations], torch.arange(n))


def test_per_layer_distances_slice_the_embedding(shot) -> None:
    model = fitted(shot)
    other = resize(builtin_photo("brick"), (SIZE, SIZE))[None]
    inputs = model._inputs(other, standardise=False)
    flat = model.patchcore.reshape_embedding(model.embed(other))
    bank = model.memory_bank
    assert model.slices == [(0, 64), (64, 192)], "resnet18: layer1 has 64 channels, layer2 128"
    for k, (a, b) in enumerate([*model.slices, (0, bank.shape[1])]):  # each layer, then PatchCore's combined
        brute = torch.cdist(flat[:, a:b].double(), bank[:, a:b].double()).min(1).values.float()
        torch.testing.assert_close(inputs["distances"][0, k].flatten(), brute, atol=2e-3, rtol=1e-3)


def test_images_must_be_in_unit_range(shot) -> None:
    model = fitted(shot)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.maps((shot - 0.45) / 0.22)
    with pytest.raises(RuntimeError, match="fit"):
        PatchcoreRefinerModel(**TINY).maps(shot)


# --- training -------------------------------------------------------------------------------------------------------
def test_loss_falls_on_tiny_data(shot) -> None:
    model = fitted(shot)
    losses, _ = train_refiner(model, shot, synth(), steps=40, batch_size=4, lr=5e-3, generator=gen(0))
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses


def test_same_seed_same_weights_and_snapshots(shot) -> None:
    runs = []
    for _ in range(2):
        model = fitted(shot)
        losses, snapshots = train_refiner(model, shot, synth(), steps=4, batch_size=2, generator=gen(5),
                                          checkpoints=(0, 2))  # fmt: skip
        runs.append((losses, snapshots, model.head.state_dict()))
    (l1, s1, w1), (l2, s2, w2) = runs
    assert l1 == l2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert sorted(s1) == [0, 2]
    assert not s1[0]["out.weight"].any(), "step 0 is the untrained head: PatchCore"
    assert any(not torch.equal(s1[2][k], w1[k]) for k in w1), "a snapshot is not the final state"
    assert any(not torch.equal(s1[2][k], s1[0][k]) for k in w1)
    model = fitted(shot)
    model.head.load_state_dict(s1[2])  # a snapshot loads back into a head
    other = fitted(shot, seed=1)
    assert any(not torch.equal(other.head.state_dict()[k], s1[0][k]) for k in w1), "the seed sets the head's init"


def test_training_uses_views_not_the_shot(shot, monkeypatch) -> None:
    import anomalib_synth.models.patchcore_refiner.training as training

    seen = []
    real = training.synthesize_batch
    monkeypatch.setattr(training, "synthesize_batch",
                        lambda s, images, *a: seen.append(images.clone()) or real(s, images, *a))  # fmt: skip
    train_refiner(fitted(shot), shot, synth(), steps=2, batch_size=3, generator=gen(0))
    assert seen and all(not torch.equal(view, shot[0]) for batch in seen for view in batch)


# --- anomalib -------------------------------------------------------------------------------------------------------
def test_lazy_export() -> None:
    from anomalib_synth.models import PatchcoreRefiner
    from anomalib_synth.models.patchcore_refiner.lightning_model import PatchcoreRefiner as direct

    assert PatchcoreRefiner is direct


def test_engine_fit_and_test(tmp_path) -> None:
    from anomalib.engine import Engine

    from anomalib_synth.models import PatchcoreRefiner
    from anomalib_synth.toydata import toy_folder_datamodule

    root = make_folder_dataset(tmp_path / "data", size=SIZE)
    model = PatchcoreRefiner(**TINY, steps=3, batch_size=2, n_views=2,
                             pre_processor=PatchcoreRefiner.configure_pre_processor((SIZE, SIZE)))  # fmt: skip
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path / "results"), logger=False)
    engine.fit(model, datamodule=toy_folder_datamodule(root, train_batch_size=2))
    assert len(model.losses) == 3 and model.model.is_fitted
    assert len(model.model.memory_bank) == 6 * (SIZE // 4) ** 2, "every patch of the 6 training images"
    results = engine.test(model, datamodule=toy_folder_datamodule(root))
    assert {"image_AUROC", "pixel_AUROC"} <= set(results[0])


def test_yaml_config_builds_the_model() -> None:
    from jsonargparse import ArgumentParser

    from anomalib_synth.models import PatchcoreRefiner

    config = yaml.safe_load(CONFIG.read_text())
    assert config["class_path"] == "anomalib_synth.models.PatchcoreRefiner"
    parser = ArgumentParser()
    parser.add_argument("--model", type=PatchcoreRefiner)
    init = parser.instantiate_classes(parser.parse_object({"model": config}))
    model = init.model
    assert isinstance(model, PatchcoreRefiner)
    assert model.model.layers == ("blocks.1", "blocks.2")
    assert model.train_args["steps"] == config["init_args"]["steps"]
    assert model.synthesizer.config()["members"] == ["nsa", "cutpaste"]


@pytest.mark.slow
def test_cli_trains_it_on_tiny_data(tmp_path) -> None:
    root = make_folder_dataset(tmp_path / "data", size=SIZE)
    data = tmp_path / "data.yaml"
    block = folder_datamodule_config(root)
    block["init_args"]["val_split_mode"] = "from_test"  # the model validates (anomalib's thresholds)
    data.write_text(yaml.safe_dump(block))
    args = ["--model", str(CONFIG), "--model.backbone", "resnet18", "--model.layers", "[layer1,layer2]",
            "--model.pre_trained", "false", "--model.steps", "2", "--model.batch_size", "2", "--model.n_views", "2",
            "--data", str(data), "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--default_root_dir", str(tmp_path / "results")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "anomalib_synth.cli", "train", *args], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "results").rglob("*.ckpt"))
