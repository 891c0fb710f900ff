"""Real data is not like test photos: every route on pure white, 16-bit, palette, RGBA, EXIF, corrupt, tiny, large
and odd-size files (written in code by :mod:`real_like`), and the CLI on user mistakes and interruptions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from real_like import ODD, gray16, white_object, write_corrupt, write_folder_dataset, write_kinds
from torchvision.transforms.v2 import Resize

from anomalib_synth.generate import generate
from anomalib_synth.io import ImageReadError, UnsupportedImageError, load_source, probe_image, read_image
from anomalib_synth.synthesizers import get, names
from anomalib_synth.synthesizers.base import RANGE_TOLERANCE
from anomalib_synth.transforms import SynthesizeAnomaly

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CLASSICAL = names(kind="classical")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Path]:
    return write_kinds(tmp_path_factory.mktemp("kinds"))


def _anomalib_resized(image: np.ndarray, size: int = 64) -> torch.Tensor:
    """What anomalib's model ``Resize`` makes of an 8-bit image: antialiased bilinear, values may exceed 1."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    return Resize((size, size))(x)


@pytest.fixture(scope="module")
def white_batch() -> torch.Tensor:
    batch = torch.stack([_anomalib_resized(white_object(seed=s)) for s in range(4)])
    assert batch.max() > 1.0, "the fixture must reproduce the overshoot seen on real MVTec bottle images"
    return batch


# --- reading files ----------------------------------------------------------------------------------------------


def test_every_readable_kind_reads_with_its_true_values(kinds) -> None:
    expected = torch.from_numpy(white_object()).permute(2, 0, 1).float() / 255
    for kind in ("white", "palette", "rgba", "rgb16"):
        got = read_image(kinds[kind])
        assert got.shape == (3, *ODD)
        tolerance = 0.1 if kind == "palette" else 1e-6  # 16 palette colours quantise the disc texture
        reference = torch.from_numpy(white_object(seed={"white": 0, "palette": 2, "rgba": 3, "rgb16": 1}[kind]))
        assert (got - reference.permute(2, 0, 1).float() / 255).abs().mean() <= tolerance, kind
    assert torch.equal(read_image(kinds["white"]), expected)


def test_16bit_grayscale_is_scaled_not_clipped_to_white(kinds) -> None:
    got = read_image(kinds["gray16"], channels=1)[0]
    assert torch.allclose(got, torch.from_numpy(gray16().astype(np.float32) / 65535), atol=1e-6)
    rgb = read_image(kinds["gray16"])
    assert torch.equal(rgb[0], rgb[2]) and 0.49 < float(rgb.mean()) < 0.51  # anomalib's reader gives ~0.998


def test_exif_orientation_is_applied(kinds) -> None:
    stored = white_object(seed=4)  # H x W = 97 x 131, black bar at the top; orientation 6 = rotate 90 clockwise
    got = read_image(kinds["exif"])
    assert got.shape == (3, ODD[1], ODD[0])
    assert float(got[:, :, -5:].mean()) < 0.1, "the black top bar is on the right after a clockwise rotation"
    assert stored.shape[:2] == ODD


def test_one_bit_images_read_black_and_white(tmp_path) -> None:
    pattern = np.zeros(ODD, dtype=bool)
    pattern[10:40, 20:90] = True
    Image.fromarray(pattern).convert("1").save(tmp_path / "onebit.png")
    assert Image.open(tmp_path / "onebit.png").mode == "1"
    expected = torch.from_numpy(pattern).float()
    assert torch.equal(read_image(tmp_path / "onebit.png"), expected.expand(3, -1, -1))
    assert torch.equal(read_image(tmp_path / "onebit.png", channels=1), expected[None])


def test_tiny_and_large_images_resize(kinds) -> None:
    for kind in ("tiny", "large"):
        source = load_source(str(kinds[kind].parent), (32, 48))
        assert source.images.shape[1:] == (3, 32, 48) and source.images.min() >= 0 and source.images.max() <= 1


def test_corrupt_files_raise_a_one_line_error_naming_the_file(tmp_path) -> None:
    for bad in write_corrupt(tmp_path):
        with pytest.raises(ImageReadError, match=bad.name) as info:
            read_image(bad)
        assert "\n" not in str(info.value)
        with pytest.raises(ImageReadError, match=bad.name):
            probe_image(bad)


def test_probe_flags_files_anomalibs_reader_gets_wrong(kinds) -> None:
    with pytest.raises(UnsupportedImageError, match="16-bit grayscale"):
        probe_image(kinds["gray16"])
    for kind in ("white", "rgb16", "palette", "rgba", "exif", "tiny"):
        probe_image(kinds[kind])


def test_load_source_skips_corrupt_files_or_raises(tmp_path, caplog) -> None:
    Image.fromarray(white_object()).save(tmp_path / "000.png")
    write_corrupt(tmp_path)
    with caplog.at_level("WARNING", logger="anomalib_synth.io"):
        source = load_source(str(tmp_path), (32, 32))
    assert sum("skipping cannot read image" in r.getMessage() for r in caplog.records) == 2
    assert source.names == [str(tmp_path / "000.png")]
    assert sorted(p.name for p, _ in source.skipped) == ["zz_garbage.png", "zz_truncated.png"]
    with pytest.raises(ImageReadError, match="zz_garbage"):
        load_source(str(tmp_path), (32, 32), on_error="raise")
    only_bad = tmp_path / "bad"
    write_corrupt(only_bad)
    with pytest.raises(ValueError, match="no readable images"):
        load_source(str(only_bad), (32, 32))



def test_upper_case_extensions_are_images_too(tmp_path) -> None:
    """Cameras and data sets (VisA) write ``.JPG``; such files are read, not passed over."""
    Image.fromarray(white_object(seed=1)).save(tmp_path / "a.PNG")
    Image.fromarray(white_object(seed=2)).save(tmp_path / "b.JPG", format="JPEG")
    Image.fromarray(white_object(seed=3)).save(tmp_path / "c.png")
    source = load_source(str(tmp_path), (32, 32))
    assert [Path(n).name for n in source.names] == ["a.PNG", "b.JPG", "c.png"]

# --- value range at the synthesizer boundary ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSICAL)
def test_overshoot_from_anomalibs_resize_is_accepted_and_clamped(name, white_batch) -> None:
    out = get(name)(white_batch, generator=torch.Generator().manual_seed(0))
    assert out.images.min() >= 0 and out.images.max() <= 1
    outside = ~out.masks.bool().expand_as(white_batch)
    assert torch.equal(out.images[outside], white_batch.clamp(0, 1)[outside])
    assert out.labels.any()


@pytest.mark.parametrize(
    ("images", "extremes"),
    [
        (torch.full((1, 3, 8, 8), 255.0), "255"),
        (torch.linspace(-2.1179, 2.64, 192).view(1, 3, 8, 8), "-2.1179"),
        (torch.full((1, 3, 8, 8), 1.0 + 2 * RANGE_TOLERANCE), "1.2"),
    ],
)
def test_real_range_mistakes_still_raise_with_exact_extremes(images, extremes) -> None:
    with pytest.raises(ValueError, match=r"\[0,1\].*" + extremes.replace(".", r"\.")):
        get("cutpaste")(images)


def test_the_accepted_overshoot_is_0_1_on_either_side() -> None:
    for low, high in ((-0.095, 0.5), (0.5, 1.095)):
        images = torch.tensor([low, high]).repeat_interleave(96).view(1, 3, 8, 8)
        out = get("cutpaste")(images, generator=torch.Generator().manual_seed(0))
        outside = ~out.masks.bool().expand_as(images)
        assert out.images.min() >= 0 and out.images.max() <= 1
        assert torch.equal(out.images[outside], images.clamp(0, 1)[outside]), "clamped, not rescaled"
    for low, high in ((-0.105, 0.5), (0.5, 1.105)):
        with pytest.raises(ValueError, match="got values in"):
            get("cutpaste")(torch.tensor([low, high]).repeat_interleave(96).view(1, 3, 8, 8))


def test_transform_accepts_overshoot(white_batch) -> None:
    images, masks = SynthesizeAnomaly("cutpaste", p=1.0, seed=0)(
        white_batch, torch.zeros(4, 1, 64, 64, dtype=torch.bool)
    )
    assert images.max() <= 1 and masks.any()


# --- generate ---------------------------------------------------------------------------------------------------


def test_generate_on_every_kind_skips_corrupt_files_and_counts_them(kinds, tmp_path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for path in kinds.values():
        (source / path.name).write_bytes(path.read_bytes())
    write_corrupt(source)
    records = generate(str(source), tmp_path / "out", "cutpaste", num=len(kinds), size=(40, 56), progress=False)
    assert records.written == len(kinds) and len(records.skipped) == 2
    assert {Path(r["source"]).name for r in records} == {p.name for p in kinds.values()}
    gray = next(r for r in records if r["source"].endswith("gray16.png"))
    image = np.asarray(Image.open(tmp_path / "out" / gray["image"])).astype(float)
    assert 100 < image.mean() < 155, "a 16-bit ramp stays a mid-grey ramp, not white"
    again = generate(str(source), tmp_path / "out", "cutpaste", num=len(kinds), size=(40, 56), progress=False)
    assert again.written == 0 and len(again) == len(kinds)


@pytest.mark.parametrize("name", CLASSICAL)
def test_every_classical_synthesizer_works_at_tiny_and_odd_sizes(name) -> None:
    sizes = ((32, 45), (255, 97)) if name == "anomalib-perlin" else ((8, 8), (17, 33), (255, 97))
    for size in sizes:
        for seed in range(3):
            images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed))
            out = get(name)(images, generator=torch.Generator().manual_seed(seed))
            assert out.images.shape == images.shape and out.masks.shape == (2, 1, *size)
            assert out.labels.any()


def test_anomalib_perlin_below_its_minimum_size_raises_clearly() -> None:
    with pytest.raises(ValueError, match="at least 32x32"):
        get("anomalib-perlin")(torch.rand(1, 3, 16, 40))


# --- anomalib routes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def white_folder(tmp_path_factory) -> Path:
    return write_folder_dataset(tmp_path_factory.mktemp("white"), corrupt=True)


def _folder(root: Path, **kwargs):
    from anomalib.data import Folder

    return Folder(name="white", root=root, normal_dir="good", abnormal_dir="defect", normal_test_dir="test_good",
                  mask_dir="mask", train_batch_size=4, eval_batch_size=4, num_workers=0, **kwargs)  # fmt: skip


def _pre_processor(size: int = 64):
    from anomalib.pre_processing import PreProcessor

    return PreProcessor(transform=Resize((size, size)))


class _Spy:
    def __init__(self) -> None:
        from lightning.pytorch import Callback

        spy = self
        self.labels, self.high = [], []

        class Spy(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                spy.labels.append(batch.gt_label.clone())
                spy.high.append(float(batch.image.max()))

        self.callback = Spy()


def _engine(tmp_path: Path, **kwargs):
    from anomalib.engine import Engine

    return Engine(max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path / "results"), logger=False, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "cache"])
def test_datamodule_routes_on_white_images_with_corrupt_files(white_folder, tmp_path, mode) -> None:
    from anomalib.models import Padim

    from anomalib_synth.data import SyntheticAnomalyDataModule

    dm = SyntheticAnomalyDataModule(_folder(white_folder), synthesizer="cutpaste", mode=mode, anomaly_ratio=1.0,
                                    cache_dir=str(tmp_path / "cache"), seed=0)  # fmt: skip
    spy = _Spy()
    model = Padim(
        backbone="resnet18", layers=["layer1"], n_features=32, pre_trained=False, pre_processor=_pre_processor()
    )
    _engine(tmp_path, callbacks=[spy.callback]).fit(model=model, datamodule=dm)
    assert sorted(Path(p).name for p in dm.skipped_files) == ["zz_garbage.png", "zz_truncated.png"]
    assert len(dm.train_data) == (6 if mode == "online" else 12)
    assert torch.cat(spy.labels).any()
    if mode == "online":
        assert max(spy.high) <= 1.0


def test_datamodule_raises_on_corrupt_files_when_asked_and_on_16bit_always(white_folder, tmp_path) -> None:
    from anomalib_synth.data import SyntheticAnomalyDataModule

    dm = SyntheticAnomalyDataModule(_folder(white_folder), on_bad_file="raise", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ImageReadError, match="zz_garbage"):
        dm.setup()
    root = write_folder_dataset(tmp_path / "gray")
    Image.fromarray(gray16()).save(root / "good" / "gray16.png")
    dm = SyntheticAnomalyDataModule(_folder(root), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UnsupportedImageError, match="gray16.png"):
        dm.setup()



def test_datamodule_skips_a_corrupt_mask_file_naming_it_or_stops_on_it(tmp_path, caplog) -> None:
    """Mask files are checked as images are: a test sample whose mask cannot be read is dropped with a warning
    naming the file (``on_bad_file="raise"`` stops), instead of failing later inside a DataLoader worker."""
    from anomalib_synth.data import SyntheticAnomalyDataModule

    root = write_folder_dataset(tmp_path / "data")
    bad = root / "mask" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])
    dm = SyntheticAnomalyDataModule(_folder(root), synthetic_val=False, cache_dir=str(tmp_path / "c"))
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.skipped_files == [str(bad)] and str(bad) in caplog.text
    kept = [*dm.test_data.samples.mask_path, *dm.val_data.samples.mask_path]
    assert str(bad) not in kept and str(root / "mask" / "000.png") in kept
    strict = SyntheticAnomalyDataModule(_folder(root), synthetic_val=False, on_bad_file="raise",
                                        cache_dir=str(tmp_path / "c"))  # fmt: skip
    with pytest.raises(ImageReadError, match="mask/001.png"):
        strict.setup()

@pytest.mark.slow
def test_draem_with_our_synthesizer_on_white_images(white_folder, tmp_path) -> None:
    from anomalib.models import Draem

    from anomalib_synth.data import SynthesizerSwap

    clean = write_folder_dataset(tmp_path / "clean")
    (tmp_path / "dtd").mkdir()
    callback = SynthesizerSwap("nsa", probability=1.0, seed=0)
    model = Draem(dtd_dir=str(tmp_path / "dtd"), pre_processor=_pre_processor())
    engine = _engine(tmp_path, callbacks=[callback], limit_train_batches=1)
    engine.fit(model=model, datamodule=_folder(clean))
    assert callback.replaced == "augmenter"


def test_evaluation_loader_reads_16bit_and_names_corrupt_files(tmp_path) -> None:
    from anomalib_synth.evaluation.data import load_images, read_mask

    paths = write_kinds(tmp_path / "k")
    images = load_images([paths["gray16"], paths["white"], paths["exif"]], (32, 32))
    assert 0.45 < float(images[0].mean()) < 0.55
    bad = write_corrupt(tmp_path / "bad")
    with pytest.raises(ImageReadError, match="zz_garbage"):
        load_images([paths["white"], bad[0]], (32, 32))
    with pytest.raises(ImageReadError, match="zz_truncated"):
        read_mask([bad[1]], (32, 32))


# --- the command line ----------------------------------------------------------------------------------------------


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anomalib_synth.cli", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "0", "0"], "must be a positive integer"),
        (["-o", "betta=1"], "takes no argument 'betta' (did you mean 'beta'?)"),
        (["-o", "beta=[0.9,0.1]"], "beta"),
        (["--num", "-3"], "must be a positive integer"),
    ],
)
def test_cli_user_mistakes_give_one_line_and_exit_2(tmp_path, args, message) -> None:
    out = _cli("generate", "builtin:brick", str(tmp_path / "out"), "-s", "perlin", "-q", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_cli_missing_folder_and_debug_traceback(tmp_path) -> None:
    out = _cli("generate", str(tmp_path / "missing"), str(tmp_path / "out"), "-s", "nsa")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "missing" in out.stderr
    out = _cli("generate", str(tmp_path / "missing"), str(tmp_path / "out"), "-s", "nsa", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr


SIGNAL_INSIDE_A_WRITE = """
import os, signal, sys
from pathlib import Path
from PIL import Image
from anomalib_synth.cli import main

original = Image.Image.save

def save(self, fp, *args, **kwargs):  # the signal arrives while 005.png exists only under its temporary name
    original(self, fp, *args, **kwargs)
    if Path(fp).name.startswith(".005."):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))

Image.Image.save = save
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("sig", "code", "word"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_cli_signal_exits_cleanly_and_rerun_leaves_a_folder_anomalib_loads(tmp_path, sig, code, word) -> None:
    """The signal is sent from inside a PNG write (after the file is written, before its rename), so the temporary
    file exists when it lands: the check that none is left does not depend on timing."""
    from anomalib.data.datasets.image.folder import make_folder_dataset

    out = tmp_path / "out"
    args = ["generate", "builtin:brick,grass", str(out), "-s", "nsa", "-n", "12", "--size", "48", "48",
            "--batch-size", "2", "-q"]  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", SIGNAL_INSIDE_A_WRITE, sig, *args], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert killed.returncode == code, killed.stderr
    assert killed.stderr.strip().splitlines() == [line for line in killed.stderr.strip().splitlines() if word in line]
    assert "Traceback" not in killed.stderr
    manifest = out / "manifest.jsonl"
    assert len(manifest.read_text().splitlines()) == 5, "samples 0 to 4 are kept"
    assert not list(out.rglob(".*.tmp*")), "the sample in flight leaves no temp file"
    stale = out / "test" / "nsa" / ".011.x1y2.tmp.png"  # as a SIGKILL would leave it
    stale.write_bytes(b"")
    rerun = _cli(*args)
    assert rerun.returncode == 0 and "wrote 7 missing samples" in rerun.stdout, rerun.stderr
    assert not stale.exists()
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(12))
    normal = tmp_path / "normal"
    normal.mkdir()
    Image.fromarray(white_object()).save(normal / "000.png")
    samples = make_folder_dataset(
        normal_dir=normal, abnormal_dir=out / "test" / "nsa", mask_dir=out / "ground_truth" / "nsa"
    )
    assert (samples.label_index == 1).sum() == sum(r["label"] for r in records)


@pytest.mark.slow
def test_anomalib_train_on_a_bad_file_is_one_line_and_leaves_no_empty_results(tmp_path, monkeypatch, capsys) -> None:
    from anomalib_synth.cli import main

    root = write_folder_dataset(tmp_path / "data")
    Image.fromarray(gray16()).save(root / "good" / "gray16.png")
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--model", "Padim", "--model.backbone", "resnet18", "--model.pre_trained", "false",
                 "--model.n_features", "32", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                 "--data", "SyntheticAnomalyDataModule", "--data.datamodule", "Folder",
                 "--data.datamodule.name", "white", "--data.datamodule.root", str(root),
                 "--data.datamodule.normal_dir", "good", "--data.datamodule.num_workers", "0",
                 "--data.cache_dir", str(tmp_path / "cache")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "gray16.png" in err[-1] and "16-bit grayscale" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "results").exists() or any(p.is_file() for p in (tmp_path / "results").rglob("*"))


# --- honest records -------------------------------------------------------------------------------------------------


def test_fill_holes_matches_scipy() -> None:
    import scipy.ndimage as ndi

    from anomalib_synth.synthesizers.ops import fill_holes

    masks = torch.rand(6, 1, 40, 50, generator=torch.Generator().manual_seed(0)) > 0.55
    expected = np.stack([ndi.binary_fill_holes(m) for m in masks[:, 0].numpy()])
    assert np.array_equal(fill_holes(masks)[:, 0].numpy(), expected)


def test_nsa_masks_are_solid_and_still_cover_exactly_what_changed(photos) -> None:
    import scipy.ndimage as ndi

    images = torch.cat([photos, photos.flip(-1)])
    out = get("nsa")(images, generator=torch.Generator().manual_seed(3))
    masks = out.masks[:, 0].bool().numpy()
    holes = sum(int((ndi.binary_fill_holes(m) & ~m).sum()) for m in masks)
    assert holes == 0 and masks.any(axis=(1, 2)).all()
    changed = (out.images != images).any(1).numpy()
    assert not (changed & ~masks).any()


def test_manifest_mask_area_matches_the_mask_files(tmp_path) -> None:
    for name in ("perlin", "nsa", "scar"):
        records = generate("builtin:brick,grass", tmp_path / name, name, num=4, size=(64, 64), progress=False)
        for r in records:
            mask = np.asarray(Image.open(tmp_path / name / r["mask"])) > 0
            assert r["mask_area"] == pytest.approx(mask.mean(), abs=1e-6)
            assert "area" not in r["params"] and "target_area" not in r["params"]
    records = generate("builtin:brick", tmp_path / "area", "perlin", num=2, size=(64, 64), progress=False,
                       area_range=(0.05, 0.1))  # fmt: skip
    assert all(0.05 <= r["params"]["target_area"] <= 0.1 for r in records)


def test_scar_defaults_are_large_enough_to_see_and_cutpaste_scar_keeps_the_papers_sizes(photos) -> None:
    images = torch.nn.functional.interpolate(photos, size=(256, 256), mode="bilinear")
    gen = torch.Generator().manual_seed(0)
    scar = get("scar")(images, generator=gen).masks.mean((1, 2, 3))
    paper = get("cutpaste", mode="scar")(images, generator=torch.Generator().manual_seed(0)).masks.mean((1, 2, 3))
    assert float(scar.min()) >= 0.002 and float(scar.mean()) >= 0.005
    assert float(paper.max()) <= 0.0065


@pytest.mark.slow
def test_cache_build_survives_sigkill_and_resumes_identically() -> None:
    """One round of ``benchmarks/cache_kill_test.py`` (the README reports the 20-kill figure)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_kill_test.py"
    spec = importlib.util.spec_from_file_location("cache_kill_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--kills", "1", "--images", "4", "--variants", "4", "--size", "64", "--seed", "3"]) == 0


def test_atomic_files_keep_the_previous_model_when_a_save_fails(tmp_path) -> None:
    from anomalib_synth.io import atomic_files

    folder = tmp_path / "adapter"
    with atomic_files(folder) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"old")
        (tmp / "config.json").write_text('{"v": 1}')
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt), atomic_files(folder) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert (folder / "weights.safetensors").read_bytes() == b"old" and (
        folder / "config.json"
    ).read_text() == '{"v": 1}'
    assert (folder / "notes.txt").read_text() == "mine", "other files in the folder are left alone"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "no temporary folder is left behind"
    with atomic_files(folder) as tmp:
        (tmp / "weights.safetensors").write_bytes(b"new")
    assert (folder / "weights.safetensors").read_bytes() == b"new" and (folder / "notes.txt").exists()


def test_synthesizer_swap_skips_corrupt_files_of_a_plain_anomalib_datamodule(tmp_path, caplog) -> None:
    """DRAEM + SynthesizerSwap on anomalib's own Folder (no wrapper) with a corrupt and a truncated file among the
    training images: the callback drops them at setup, so the fit does not fail inside a DataLoader worker."""
    from anomalib.models import Draem

    from anomalib_synth.data import SynthesizerSwap

    root = write_folder_dataset(tmp_path / "data", corrupt=True)
    (tmp_path / "dtd").mkdir()
    callback = SynthesizerSwap("nsa", probability=1.0, seed=0)
    datamodule = _folder(root)
    with caplog.at_level("WARNING"):
        _engine(tmp_path, callbacks=[callback], limit_train_batches=2).fit(
            model=Draem(dtd_dir=str(tmp_path / "dtd"), pre_processor=_pre_processor()), datamodule=datamodule
        )
    assert sorted(Path(p).name for p in callback.skipped_files) == ["zz_garbage.png", "zz_truncated.png"]
    assert not datamodule.train_data.samples.image_path.str.contains("zz_").any()
    assert "zz_garbage" in caplog.text
    strict = SynthesizerSwap("nsa", probability=1.0, seed=0, on_bad_file="raise")
    with pytest.raises(ImageReadError, match="zz_"):
        _engine(tmp_path / "strict", callbacks=[strict], limit_train_batches=1).fit(
            model=Draem(dtd_dir=str(tmp_path / "dtd"), pre_processor=_pre_processor()), datamodule=_folder(root)
        )
