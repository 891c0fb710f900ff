"""SyntheticAnomalyDataModule: setup, online synthesis, cache, synthetic splits, and real anomalib training."""

from __future__ import annotations

import math
import os
import types
from pathlib import Path

import pytest
import torch
from anomalib.data import ImageBatch
from tiny_data import EveryOtherAnomalous, folder_datamodule, make_folder_dataset

from anomalib_synth.data import SynthesizerAugmenter, SyntheticAnomalyDataModule, build_cache, swap_augmenter
from anomalib_synth.data.cache import COMPLETE, build_views, cache_key
from anomalib_synth.io import read_image, resize
from anomalib_synth.seeding import generator_for
from anomalib_synth.views import augmented_views
from anomalib_synth.synthesizers import get, get_class
from anomalib_synth.writer import MANIFEST, MVTecWriter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("tiny"))


def _wrap(root: Path, tmp_path: Path, inner_kwargs=None, **kwargs) -> SyntheticAnomalyDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return SyntheticAnomalyDataModule(folder_datamodule(root, **(inner_kwargs or {})), **kwargs)


def _paths(dataset) -> list[str]:
    return sorted(Path(p).name for p in dataset.samples.image_path)


def test_forwards_identity_and_picks_shots_reproducibly(tiny_root, tmp_path) -> None:
    a = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", n_shots=2, seed=1)
    assert a.name == "tiny" and a.train_batch_size == 4 and a.eval_batch_size == 4
    torch.manual_seed(0)  # torch's global generator in two other states: the picks must come from `seed` alone
    a.setup()
    b = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", n_shots=2, seed=1)
    torch.manual_seed(1)
    b.setup()
    assert len(a.train_data) == 2 and _paths(a.train_data) == _paths(b.train_data)
    picks = set()
    for seed in range(6):
        c = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", n_shots=1, seed=seed)
        c.setup()
        picks.add(_paths(c.train_data)[0])
    assert len(picks) > 1, "the seed chooses the shots"


def test_bad_arguments_raise(tiny_root, tmp_path) -> None:
    with pytest.raises(ValueError, match="mode"):
        _wrap(tiny_root, tmp_path, mode="offline")
    with pytest.raises(ValueError, match="anomaly_ratio"):
        _wrap(tiny_root, tmp_path, anomaly_ratio=2.0)
    with pytest.raises(ValueError, match="unknown synthesizer"):
        _wrap(tiny_root, tmp_path, synthesizer="nope")
    dm = _wrap(tiny_root, tmp_path, n_shots=50)
    with pytest.raises(ValueError, match="only 6 normal images"):
        dm.setup()


def test_synthetic_val_from_held_out_images_keeps_real_test_anomalies(tiny_root, tmp_path) -> None:
    inner_test = folder_datamodule(tiny_root, val_split_mode="none")
    inner_test.setup()
    dm = _wrap(tiny_root, tmp_path, inner_kwargs={"val_split_mode": "none"}, synthesizer="nsa", n_shots=1,
               extra_normals=3)  # fmt: skip
    dm.setup()
    val = dm.val_data.samples
    assert (val.label_index == 0).sum() == 3 and (val.label_index == 1).sum() == 3  # 3 held-out + 3 synthetic
    assert all(Path(p).is_file() for p in val.image_path)  # the visualizer reloads from image_path
    assert all(Path(p).is_file() for p in val[val.label_index == 1].mask_path)
    assert not set(val.image_path) & set(dm.train_data.samples.image_path), "val never holds the shot"
    item = dm.val_data[int((val.label_index == 1).to_numpy().nonzero()[0][0])]
    assert bool(item.gt_label) and item.gt_mask.any()
    assert _paths(dm.test_data) == _paths(inner_test.test_data), "real test anomalies are all kept"


def test_one_shot_validation_is_strict_views_of_the_shot(tiny_root, tmp_path) -> None:
    """n_shots=1 uses no other training image: the normal validation images are augmented views of the shot."""
    dm = _wrap(tiny_root, tmp_path, inner_kwargs={"val_split_mode": "none"}, synthesizer="nsa", n_shots=1,
               val_views=4)  # fmt: skip
    dm.setup()
    val = dm.val_data.samples
    normal = val[val.label_index == 0]
    assert len(normal) == 4 and (val.label_index == 1).sum() == 4
    training_files = set(_sources(tiny_root))
    assert not {str(Path(p).resolve()) for p in val.image_path} & {str(Path(p).resolve()) for p in training_files}
    views = torch.stack([read_image(p) for p in normal.image_path])
    size = tuple(views.shape[-2:])
    shot_path = Path(dm.train_data.samples.image_path.iloc[0]).resolve()
    shot = resize(read_image(shot_path), size)
    # the views of the shot drawn from the seed's validation stream (stored as 8-bit PNG), and not the shot itself
    expected, _ = augmented_views(shot[None], 4, generator_for(0, "val", 1))
    torch.testing.assert_close(views, expected, atol=0.5 / 255 + 1e-6, rtol=0)
    assert ((views - shot).abs().mean((1, 2, 3)) > 0.01).all()
    again = _wrap(tiny_root, tmp_path, inner_kwargs={"val_split_mode": "none"}, synthesizer="nsa", n_shots=1,
                  val_views=4)  # fmt: skip
    again.setup()
    assert list(again.val_data.samples.image_path) == list(val.image_path), "reused from the cache"


def test_synthetic_test_adds_anomalies_without_dropping_real_ones(tiny_root, tmp_path) -> None:
    dm = _wrap(tiny_root, tmp_path, synthesizer="scar", synthetic_test=True, synthetic_val=False)
    dm.setup()
    test = dm.test_data.samples
    real = test[test.image_path.str.contains("defect")]
    synthetic = test[test.image_path.str.contains("cache")]
    assert len(synthetic) == (test.label_index == 0).sum()  # one per normal test image
    inner = folder_datamodule(tiny_root)
    inner.setup()
    assert len(real) == int(inner.test_data.samples.label_index.sum())


def _batch(dm: SyntheticAnomalyDataModule, n: int = 4) -> ImageBatch:
    return ImageBatch.collate([dm.train_data[i % len(dm.train_data)] for i in range(n)])


def test_online_synthesis_sets_labels_and_masks_reproducibly(tiny_root, tmp_path) -> None:
    dm = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", anomaly_ratio=1.0, synthetic_val=False)
    dm.setup()
    batch = _batch(dm)
    out = dm.synthesize_train_batch(batch, epoch=0)
    assert out.gt_label.all() and out.gt_mask.shape == (4, 64, 64) and out.gt_mask.flatten(1).any(1).all()
    outside = ~out.gt_mask.unsqueeze(1).expand_as(out.image)
    assert torch.equal(out.image[outside], batch.image[outside])
    again = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", anomaly_ratio=1.0, synthetic_val=False)
    again.setup()
    assert torch.equal(again.synthesize_train_batch(batch, epoch=0).image, out.image), "seed + epoch + batch"
    second_batch = dm.synthesize_train_batch(batch, epoch=0)
    next_epoch = dm.synthesize_train_batch(batch, epoch=1)
    assert not torch.equal(second_batch.gt_mask, out.gt_mask) and not torch.equal(next_epoch.gt_mask, out.gt_mask)
    other_seed = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", anomaly_ratio=1.0, synthetic_val=False, seed=5)
    other_seed.setup()
    assert not torch.equal(other_seed.synthesize_train_batch(batch, epoch=0).gt_mask, out.gt_mask)


def test_online_keeps_real_anomalies_and_respects_ratio(tiny_root, tmp_path) -> None:
    dm = _wrap(tiny_root, tmp_path, synthesizer="perlin", anomaly_ratio=0.0, synthetic_val=False)
    dm.setup()
    batch = _batch(dm)
    real_mask = torch.zeros(4, 64, 64, dtype=torch.bool)
    real_mask[0, :8, :8] = True
    batch = batch.update(in_place=False, gt_mask=real_mask, gt_label=torch.tensor([True, False, False, False]))
    out = dm.synthesize_train_batch(batch, epoch=0)
    assert torch.equal(out.image, batch.image) and out.gt_label.tolist() == [True, False, False, False]
    dm.anomaly_ratio = 1.0
    out = dm.synthesize_train_batch(batch, epoch=0)
    assert (
        out.gt_label.all() and torch.equal(out.gt_mask[0], real_mask[0]) and torch.equal(out.image[0], batch.image[0])
    )


def test_online_synthesis_only_while_training(tiny_root, tmp_path) -> None:
    dm = _wrap(tiny_root, tmp_path, synthesizer="scar", anomaly_ratio=1.0, synthetic_val=False)
    dm.setup()
    batch = _batch(dm)
    dm.trainer = _fake_trainer(training=False)
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer.training = True
    assert dm.on_after_batch_transfer(batch, 0).gt_label.all()
    dm.mode = "cache"
    assert dm.on_after_batch_transfer(batch, 0) is batch


def test_cache_mode_serves_cached_anomalies_and_reuses_them(tiny_root, tmp_path) -> None:
    dm = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", mode="cache", n_shots=2, variants_per_image=3,
               synthetic_val=False, image_size=(48, 48))  # fmt: skip
    dm.setup()
    samples = dm.train_data.samples
    assert (samples.label_index == 0).sum() == 2 and (samples.label_index == 1).sum() == 6
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / COMPLETE).is_file() and (entries[0] / MANIFEST).is_file()
    item = dm.train_data[int((samples.label_index == 1).to_numpy().nonzero()[0][0])]
    assert bool(item.gt_label) and item.gt_mask.any() and item.image.shape[-2:] == (48, 48)
    stamps = {p: p.stat().st_mtime_ns for p in entries[0].rglob("*.png")}
    again = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", mode="cache", n_shots=2, variants_per_image=3,
                  synthetic_val=False, image_size=(48, 48))  # fmt: skip
    again.setup()
    assert stamps == {p: p.stat().st_mtime_ns for p in entries[0].rglob("*.png")}, "reused, not rewritten"
    changed = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", mode="cache", n_shots=2, variants_per_image=2,
                    synthetic_val=False, image_size=(48, 48))  # fmt: skip
    changed.setup()
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2, "a new config gets a new entry"


def _sources(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "good").glob("*.png"))


def test_cache_resumes_and_regenerates_corrupt_entries(tiny_root, tmp_path, monkeypatch) -> None:
    synth = get("nsa")
    kwargs = {"variants": 2, "seed": 3, "size": (40, 40), "batch_size": 4, "progress": False}
    full, _ = build_cache(synth, _sources(tiny_root), tmp_path / "full", **kwargs)

    original, calls = MVTecWriter.write, {"n": 0}

    def dying(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, *args, **kw)

    monkeypatch.setattr(MVTecWriter, "write", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(synth, _sources(tiny_root), tmp_path / "partial", **kwargs)
    monkeypatch.setattr(MVTecWriter, "write", original)
    partial = tmp_path / "partial" / full.name
    assert not (partial / COMPLETE).exists()
    root, records = build_cache(synth, _sources(tiny_root), tmp_path / "partial", **kwargs)
    assert len(records) == 12
    (root / records[0]["image"]).write_bytes(b"\x89PNG broken")
    root, records = build_cache(synth, _sources(tiny_root), tmp_path / "partial", **kwargs)
    assert len(records) == 12
    for a, b in zip(sorted(full.rglob("*.png")), sorted(root.rglob("*.png")), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def _ddp_worker(rank: int, world: int, init_file: str, sources: list[str], cache: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        writes = []
        original = MVTecWriter.write

        def spy(self, index, *args, **kwargs):
            writes.append(index)
            return original(self, index, *args, **kwargs)

        MVTecWriter.write = spy
        root, records = build_cache(get("cutpaste"), sources, cache, variants=3, size=(32, 32), batch_size=2,
                                    progress=False)  # fmt: skip
        (Path(cache) / f"writes{rank}.txt").write_text(",".join(map(str, writes)))
        assert len(records) == len(sources) * 3
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_cache_is_sharded_over_two_gloo_processes(tiny_root, tmp_path) -> None:
    import torch.multiprocessing as mp

    sources = _sources(tiny_root)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), sources, str(tmp_path / "ddp")), nprocs=2, join=True)
    writes = [set(map(int, (tmp_path / "ddp" / f"writes{r}.txt").read_text().split(","))) for r in (0, 1)]
    assert writes[0] and writes[1] and not writes[0] & writes[1], "each rank writes a disjoint shard"
    assert writes[0] | writes[1] == set(range(len(sources) * 3))
    single, _ = build_cache(get("cutpaste"), sources, tmp_path / "single", variants=3, size=(32, 32), batch_size=2,
                            progress=False)  # fmt: skip
    shared = tmp_path / "ddp" / single.name
    assert (shared / MANIFEST).is_file() and not list(shared.glob("manifest.rank*"))
    for a, b in zip(sorted(single.rglob("*.png")), sorted(shared.rglob("*.png")), strict=True):
        assert a.read_bytes() == b.read_bytes(), "sharded build == single-process build"


def test_cache_key_changes_with_every_setting(tiny_root) -> None:
    sources = _sources(tiny_root)
    base = cache_key(get("nsa"), sources, 1, 0, (64, 64))
    assert base == cache_key(get("nsa"), sources, 1, 0, (64, 64))
    others = {
        cache_key(get("nsa", scale=(0.5, 1.0)), sources, 1, 0, (64, 64)),
        cache_key(get("cutpaste"), sources, 1, 0, (64, 64)),
        cache_key(get("nsa"), sources[:-1], 1, 0, (64, 64)),
        cache_key(get("nsa"), sources, 2, 0, (64, 64)),
        cache_key(get("nsa"), sources, 1, 1, (64, 64)),
        cache_key(get("nsa"), sources, 1, 0, (32, 32)),
    }
    assert base not in others and len(others) == 6


# a valid non-default value for every constructor argument of the classical synthesizers
ALTERNATIVES = {
    "area_range": (0.05, 0.1), "beta": (0.4, 0.9), "foreground": "none", "max_textures": 8, "min_area": 0.01,
    "n_augment": 2, "rotation": (-10.0, 10.0), "scale_range": (1, 3), "texture_dir": "TEXTURES", "texture_size": 64,
    "threshold": 0.6, "aspect_range": (0.5, 2.0), "jitter": 0.2, "mode": "scar", "num_defects": (1, 2),
    "scar_height": (12.0, 20.0), "scar_width": (3.0, 9.0), "source": "other", "change_threshold": 0.05,
    "min_visible": 0.1, "patch_size": (0.2, 0.3), "scale": (0.8, 1.2), "sweeps": 3, "source_foreground": False,
}  # fmt: skip


def test_cache_key_changes_with_every_constructor_argument(tiny_root, tmp_path) -> None:
    from anomalib_synth.synthesizers import names
    from anomalib_synth.synthesizers.registry import constructor_arguments

    textures = make_folder_dataset(tmp_path / "textures") / "good"
    sources = _sources(tiny_root)
    for name in names(kind="classical"):
        synth = get(name)
        arguments = set(constructor_arguments(type(synth)) or []) - set(synth.config_ignore)
        if name == "scar":  # ScarSynthesizer passes everything on to CutPaste's constructor
            arguments = set(constructor_arguments(get_class("cutpaste")))
        assert set(synth.config()) == arguments, name
        base = cache_key(synth, sources, 1, 0, (64, 64))
        for argument in arguments:
            value = ALTERNATIVES[argument]
            value = str(textures) if value == "TEXTURES" else value
            if name == "scar" and argument == "mode":
                value = "normal"
            changed = get(name, **{argument: value})
            assert cache_key(changed, sources, 1, 0, (64, 64)) != base, f"{name}.{argument}"


def _drew(augmenter: SynthesizerAugmenter, seed: int) -> bool:
    """Whether the augmenter drew from its generator since the swap (its state moved from the seeded start)."""
    from anomalib_synth.seeding import derive_seed

    start = torch.Generator().manual_seed(derive_seed(seed, "rank", 0)).get_state()
    return not torch.equal(augmenter.generator.get_state(), start)


def test_synthesizer_augmenter_follows_anomalib_generator_contract() -> None:
    augmenter = SynthesizerAugmenter("cutpaste", probability=1.0, seed=0)
    images = torch.rand(3, 3, 32, 32)
    out, masks = augmenter(images)
    assert out.shape == images.shape and masks.shape == (3, 1, 32, 32) and masks.dtype == images.dtype
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    single, mask = augmenter(images[0])
    assert single.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
    with pytest.raises(ValueError, match="no anomaly generator"):
        swap_augmenter(torch.nn.Linear(2, 2), "perlin")


# --- real anomalib training (slow) ----------------------------------------------------------------------------------


def _engine(tmp_path: Path, **kwargs):
    from anomalib.engine import Engine

    return Engine(max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path / "results"), logger=False, **kwargs)


def _resize(size: int, normalize: bool = True):
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    steps = [Resize((size, size))]
    if normalize:
        steps.append(Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    return PreProcessor(transform=Compose(steps))


class _BatchSpy:
    """Records the labels of the training batches the model sees (after our hook, before the PreProcessor)."""

    def __init__(self) -> None:
        from lightning.pytorch import Callback

        spy = self

        class Spy(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                spy.labels.append(batch.gt_label.clone())
                spy.low.append(float(batch.image.min()))
                spy.high.append(float(batch.image.max()))

        self.labels: list[torch.Tensor] = []
        self.low: list[float] = []
        self.high: list[float] = []
        self.callback = Spy()


@pytest.mark.slow
def test_supersimplenet_trains_on_online_anomalies(tiny_root, tmp_path, monkeypatch) -> None:
    import timm
    from anomalib.models import Supersimplenet

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False}))
    dm = _wrap(tiny_root, tmp_path, synthesizer="perlin", anomaly_ratio=0.5, seed=0)
    spy = _BatchSpy()
    engine = _engine(tmp_path, callbacks=[spy.callback])
    model = Supersimplenet(backbone="resnet18", layers=["layer1", "layer2"], supervised=True, pre_processor=_resize(64))
    engine.fit(model=model, datamodule=dm)
    labels = torch.cat(spy.labels)
    assert labels.any() and not labels.all(), "about half of the training samples are anomalous"
    # user callbacks run before the model's PreProcessor: the synthesized batch is still in [0, 1], un-normalised
    assert min(spy.low) >= 0.0 and max(spy.high) <= 1.0
    results = engine.test(model=model, datamodule=dm)
    # one epoch on random features says nothing about quality (0.4-1.0 seen); the real test anomalies must be there
    assert sorted(set(dm.test_data.samples.label_index.tolist())) == [0, 1]
    assert all(math.isfinite(results[0][key]) for key in ("image_AUROC", "pixel_AUROC")), results[0]


@pytest.mark.slow
def test_draem_uses_our_synthesizer_via_callback(tiny_root, tmp_path) -> None:
    from anomalib.models import Draem

    from anomalib_synth.data import SynthesizerSwap

    (tmp_path / "dtd").mkdir()
    callback = SynthesizerSwap("nsa", probability=0.5, seed=0)
    model = Draem(dtd_dir=str(tmp_path / "dtd"), pre_processor=_resize(64, normalize=False))
    engine = _engine(tmp_path, callbacks=[callback])
    engine.fit(model=model, datamodule=folder_datamodule(tiny_root))
    assert callback.replaced == "augmenter"
    assert isinstance(model.augmenter, SynthesizerAugmenter) and _drew(model.augmenter, seed=0)
    assert model.augmenter.synthesizer.name == "nsa"
    test_dm = folder_datamodule(tiny_root)
    results = engine.test(model=model, datamodule=test_dm)
    # one epoch says nothing about quality; the swap must leave the test data alone: real defects and normals
    assert sorted(set(test_dm.test_data.samples.label_index.tolist())) == [0, 1]
    assert all(math.isfinite(results[0][key]) for key in ("image_AUROC", "pixel_AUROC")), results[0]


@pytest.mark.slow
def test_patchcore_one_shot_with_synthetic_validation(tiny_root, tmp_path) -> None:
    from anomalib.models import Patchcore

    dm = _wrap(tiny_root, tmp_path, inner_kwargs={"val_split_mode": "none"}, synthesizer="cutpaste", n_shots=1)
    torch.manual_seed(0)  # the random backbone
    model = Patchcore(backbone="resnet18", layers=["layer2", "layer3"], pre_trained=False,
                      coreset_sampling_ratio=1.0, pre_processor=_resize(64))  # fmt: skip
    engine = _engine(tmp_path)
    engine.fit(model=model, datamodule=dm)
    assert len(dm.train_data) == 1 and dm.val_data.has_anomalous
    # anomalib's adaptive threshold needs anomalous validation samples: the synthetic ones give it a value
    assert bool(model.post_processor.image_threshold.isfinite())
    results = engine.test(model=model, datamodule=dm)
    # the one shot is a good memory bank for dark scratches on gravel, even with random features (0.89 measured)
    assert results[0]["pixel_AUROC"] >= 0.75, results[0]


def test_cache_key_includes_batch_size_and_texture_bank_settings(tiny_root, tmp_path) -> None:
    sources = _sources(tiny_root)
    assert cache_key(get("nsa"), sources, 1, 0, (64, 64), 2) != cache_key(get("nsa"), sources, 1, 0, (64, 64), 4)
    textures = tmp_path / "tex"
    textures.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 10, 10)).save(textures / f"{i}.png")
    a = get("perlin", texture_dir=str(textures), texture_size=16)
    b = get("perlin", texture_dir=str(textures), texture_size=32, max_textures=2)
    assert cache_key(a, sources, 1, 0, (64, 64)) != cache_key(b, sources, 1, 0, (64, 64))


def test_explicit_synthetic_val_gives_real_val_anomalies_back_to_test(tiny_root, tmp_path) -> None:
    inner = folder_datamodule(tiny_root)  # Folder's default: validation carved from the test set
    inner.setup()
    real = set(inner.test_data.samples.image_path) | set(inner.val_data.samples.image_path)
    real_anomalies = {p for p in real if "defect" in p}
    dm = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", synthetic_val=True)
    dm.setup()
    assert real_anomalies <= set(dm.test_data.samples.image_path), "no real anomaly is dropped"
    assert not any("defect" in p for p in dm.val_data.samples.image_path)


def test_synthetic_test_on_a_classification_datamodule(tiny_root, tmp_path) -> None:
    from anomalib.data import Folder

    inner = Folder(name="cls", root=tiny_root, normal_dir="good", abnormal_dir="defect", normal_test_dir="test_good",
                   train_batch_size=4, eval_batch_size=4, num_workers=0)  # fmt: skip
    dm = SyntheticAnomalyDataModule(inner, "scar", synthetic_test=True, synthetic_val=False,
                                    cache_dir=str(tmp_path / "c"))  # fmt: skip
    dm.setup()
    assert dm.test_data.task.value == "classification"
    labels = [bool(dm.test_data[i].gt_label) for i in range(len(dm.test_data))]
    assert sum(labels) > int(inner.test_data.samples.label_index.sum()), "synthetic anomalies were added"


def _fake_trainer(training: bool = True, epoch: int = 0, rank: int = 0, ready: int = 0) -> types.SimpleNamespace:
    """What the hook reads of a Lightning trainer: the fit loop's count of batches made ready in this epoch."""
    progress = types.SimpleNamespace(current=types.SimpleNamespace(ready=ready))
    loop = types.SimpleNamespace(epoch_loop=types.SimpleNamespace(batch_progress=progress))
    return types.SimpleNamespace(training=training, current_epoch=epoch, global_rank=rank, fit_loop=loop)


def test_online_anomalies_follow_the_loops_batch_index_not_a_call_count(tiny_root, tmp_path) -> None:
    dm = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", anomaly_ratio=1.0, synthetic_val=False)
    dm.setup()
    batch = _batch(dm)
    dm.trainer = _fake_trainer(ready=3)
    a = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0).image, a.image), "the same batch index: the same sample"
    dm.trainer = _fake_trainer(ready=4)
    assert not torch.equal(dm.on_after_batch_transfer(batch, 0).gt_mask, a.gt_mask)
    dm.trainer = _fake_trainer(ready=3, rank=1)
    assert not torch.equal(dm.on_after_batch_transfer(batch, 0).gt_mask, a.gt_mask), "each rank draws its own"
    assert torch.equal(dm.synthesize_train_batch(batch, epoch=0, batch_index=3).image, a.image)


class _TinyModel:
    """A LightningModule with one parameter; the loss reads the batch so that every batch goes through the hook."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Tiny(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(()))

            def training_step(self, batch, batch_idx):
                return (self.weight - batch.image.mean()) ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Tiny()


def _record_masks():
    from lightning.pytorch import Callback

    seen: dict[tuple[int, int], torch.Tensor] = {}

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[(trainer.current_epoch, batch_idx)] = batch.gt_mask.clone()

    return seen, Record()


def test_resumed_fit_draws_the_same_online_anomalies_as_an_uninterrupted_one(tiny_root, tmp_path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path: str | None = None) -> dict:
        seen, record = _record_masks()
        dm = _wrap(tiny_root, tmp_path, inner_kwargs={"train_batch_size": 2}, synthesizer="cutpaste",
                   anomaly_ratio=1.0, synthetic_val=False, seed=4)  # fmt: skip
        callbacks = [record]
        if ckpt_path is None:  # a checkpoint in the middle of epoch 1 (3 batches per epoch)
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1))
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0)  # fmt: skip
        trainer.fit(_TinyModel.make(), datamodule=dm, ckpt_path=ckpt_path)
        return seen

    uninterrupted = run()
    (checkpoint,) = (tmp_path / "ckpt").glob("*step=4*.ckpt")
    resumed = run(ckpt_path=str(checkpoint))
    assert set(resumed) == {(1, 1), (1, 2)} and len(uninterrupted) == 6
    for key, masks in resumed.items():
        assert torch.equal(masks, uninterrupted[key]), key
    assert any(m.any() for m in resumed.values())
    assert not torch.equal(uninterrupted[(0, 1)], uninterrupted[(1, 1)]), "a new epoch gets new anomalies"


def test_use_synthesizer_checkpoints_its_generator(tiny_root, tmp_path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import ModelCheckpoint

    from anomalib_synth.data import SynthesizerSwap

    class WithAugmenter(pl.LightningModule):
        """Like DRAEM: calls its own ``augmenter`` on the training images."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.augmenter = torch.nn.Identity()
            self.masks: dict[tuple[int, int], torch.Tensor] = {}

        def training_step(self, batch, batch_idx):
            _, masks = self.augmenter(batch.image)
            self.masks[(self.current_epoch, batch_idx)] = masks.clone()
            return (self.weight - batch.image.mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(ckpt_path: str | None = None) -> dict:
        model = WithAugmenter()
        callbacks: list[Callback] = [SynthesizerSwap("cutpaste", probability=0.5, seed=1)]
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1))
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
                             limit_val_batches=0)  # fmt: skip
        trainer.fit(model, datamodule=folder_datamodule(tiny_root, train_batch_size=2), ckpt_path=ckpt_path)
        return model.masks

    uninterrupted = run()
    (checkpoint,) = (tmp_path / "ckpt").glob("*step=4*.ckpt")
    resumed = run(ckpt_path=str(checkpoint))
    assert set(resumed) == {(1, 1), (1, 2)}
    for key, masks in resumed.items():
        assert torch.equal(masks, uninterrupted[key]), key


def test_swap_finds_dsr_and_glass_generators() -> None:
    from anomalib.models import Dsr, Glass

    dsr = Dsr()
    assert swap_augmenter(dsr, "cutpaste", probability=1.0, seed=0) == "perlin_generator"
    glass = Glass(backbone="resnet18", pre_trained=False)
    assert swap_augmenter(glass, "nsa", probability=1.0, seed=0) == "model.augmentor"
    images = torch.rand(2, 3, 32, 32)
    for augmenter in (dsr.perlin_generator, glass.model.augmentor):
        out, masks = augmenter(images)
        assert masks.shape == (2, 1, 32, 32) and masks.flatten(1).any(1).all()
        assert torch.equal(out[masks.expand_as(out) == 0], images[masks.expand_as(out) == 0])


def test_old_callback_name_still_works_with_a_deprecation_warning() -> None:
    from anomalib_synth.data import SynthesizerSwap, UseSynthesizer

    with pytest.warns(DeprecationWarning, match="SynthesizerSwap"):
        callback = UseSynthesizer("nsa", probability=1.0)
    assert isinstance(callback, SynthesizerSwap) and callback.probability == 1.0


def test_anomalib_split_names_map_onto_the_wrapper(tiny_root, tmp_path) -> None:
    dm = _wrap(tiny_root, tmp_path, val_split_mode="synthetic", val_split_ratio=0.5, test_split_mode="synthetic")
    assert dm.synthetic_val is True and dm.val_ratio == 0.5 and dm.synthetic_test is True
    dm = _wrap(tiny_root, tmp_path, val_split_mode="none", test_split_mode="from_dir")
    assert dm.synthetic_val is False and dm.synthetic_test is False
    with pytest.raises(ValueError, match="from_train"):
        _wrap(tiny_root, tmp_path, val_split_mode="from_train")


# --- audit: guarantees of the README that a one-line change could break unseen --------------------------------------


def test_n_shots_above_one_is_strict_too(tiny_root, tmp_path) -> None:
    """k = 2 shots: the training set is exactly the 2 shots (none is held out for validation) and the normal
    validation images are views of them, not other training images."""
    dm = _wrap(tiny_root, tmp_path, inner_kwargs={"val_split_mode": "none"}, synthesizer="nsa", n_shots=2,
               val_views=3, seed=2)  # fmt: skip
    dm.setup()
    assert len(dm.train_data) == 2
    val = dm.val_data.samples
    assert (val.label_index == 0).sum() == 3 and (val.label_index == 1).sum() == 3
    training_files = {str(Path(p).resolve()) for p in _sources(tiny_root)}
    assert not {str(Path(p).resolve()) for p in val.image_path} & training_files


def test_a_normal_only_validation_set_gets_val_ratio_held_out_images_and_their_anomalies(tiny_root, tmp_path) -> None:
    """The one-class case: the wrapped validation set has no anomalies (anomalib's from_train split), so a synthetic
    split is made: ``val_ratio`` of the normal training images held out, plus one synthetic anomaly of each."""
    inner_kwargs = {"val_split_mode": "from_train", "val_split_ratio": 0.2}
    inner = folder_datamodule(tiny_root, **inner_kwargs)
    inner.setup()
    assert not inner.val_data.has_anomalous and len(inner.train_data) == 5
    dm = _wrap(tiny_root, tmp_path, inner_kwargs=inner_kwargs, synthesizer="scar", val_ratio=0.4)
    dm.setup()
    val = dm.val_data.samples
    held_out = set(val[val.label_index == 0].image_path)
    assert len(held_out) == 2 and (val.label_index == 1).sum() == 2, "0.4 x 5 normal images, one anomaly each"
    assert len(dm.train_data) == 3 and not held_out & set(dm.train_data.samples.image_path)
    assert {str(Path(p).resolve()) for p in held_out} <= {str(Path(p).resolve()) for p in _sources(tiny_root)}


def test_cache_mode_serves_samples_the_synthesizer_left_normal_as_normal(tiny_root, tmp_path) -> None:
    dm = _wrap(tiny_root, tmp_path, synthesizer=EveryOtherAnomalous(), mode="cache", n_shots=2, variants_per_image=2,
               synthetic_val=False, image_size=(32, 32))  # fmt: skip
    dm.setup()
    cached = dm.train_data.samples[dm.train_data.samples.image_path.str.contains("cache")]
    assert sorted(cached.label_index.tolist()) == [0, 0, 1, 1]
    for _, row in cached.iterrows():  # the left-normal samples (test/good/, no mask) are labelled normal
        assert (row.label, row.label_index, bool(row.mask_path)) in (("abnormal", 1, True), ("normal", 0, False))
        assert (row.label_index == 1) == (f"/{EveryOtherAnomalous.name}/" in row.image_path)
    for row in cached.index:
        item = dm.train_data[int(row)]
        assert bool(item.gt_label) == bool(cached.label_index[row]) == bool(item.gt_mask.any())


def test_a_cache_build_removes_the_temporary_files_a_killed_build_left(tiny_root, tmp_path) -> None:
    kwargs = {"variants": 1, "seed": 0, "size": (32, 32), "batch_size": 4, "progress": False}
    root, _ = build_cache(get("scar"), _sources(tiny_root), tmp_path, **kwargs)
    (root / COMPLETE).unlink()  # killed before the end: a sample lost and a temporary file left
    (root / "test" / "scar" / "005.png").unlink()
    stale = root / "test" / "scar" / ".005.k1ll3d.tmp.png"
    stale.write_bytes(b"\x89PNG half")
    root, records = build_cache(get("scar"), _sources(tiny_root), tmp_path, **kwargs)
    assert len(records) == 6 and (root / "test" / "scar" / "005.png").is_file()
    assert not stale.exists() and not list(root.rglob(".*.tmp*"))


def test_synthesizer_swap_gives_each_rank_its_own_reproducible_stream() -> None:
    from anomalib_synth.data import SynthesizerSwap

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def masks(rank: int, seed: int = 3) -> torch.Tensor:
        model = torch.nn.Module()
        model.augmenter = torch.nn.Identity()
        trainer = types.SimpleNamespace(global_rank=rank, datamodule=None)
        SynthesizerSwap("cutpaste", probability=1.0, seed=seed).setup(trainer, model, "fit")
        return model.augmenter(images)[1]

    assert torch.equal(masks(0), masks(0)) and torch.equal(masks(1), masks(1)), "reproducible from seed and rank"
    assert not torch.equal(masks(0), masks(1)), "each DDP rank draws its own anomalies"
    assert not torch.equal(masks(0), masks(0, seed=4))


def test_images_are_synthesized_at_the_models_resize_when_no_image_size_is_given(tiny_root, tmp_path) -> None:
    from PIL import Image
    from torchvision.transforms.v2 import Compose, Resize

    dm = _wrap(tiny_root, tmp_path, synthesizer="cutpaste", mode="cache", n_shots=1, synthetic_val=False)
    pre_processor = types.SimpleNamespace(transform=Compose([Resize((40, 48))]))
    dm.trainer = types.SimpleNamespace(model=types.SimpleNamespace(pre_processor=pre_processor))
    dm.setup()
    cached = [p for p in dm.train_data.samples.image_path if "cache" in p]
    assert cached and all(Image.open(p).size == (48, 40) for p in cached), "(H, W) = (40, 48)"


def test_views_of_the_shots_are_written_once_and_a_lost_one_is_rewritten_identically(tiny_root, tmp_path) -> None:
    sources = _sources(tiny_root)[:1]
    paths = build_views(sources, tmp_path, 3, seed=0, size=(32, 32))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}
    assert build_views(sources, tmp_path, 3, seed=0, size=(32, 32)) == paths
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths} == before, "reused, not rewritten"
    paths[1].unlink()
    assert build_views(sources, tmp_path, 3, seed=0, size=(32, 32)) == paths
    assert paths[1].read_bytes() == before[paths[1]][1]
