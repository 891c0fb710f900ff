from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_synth import generate as generate_module
from anomalib_synth.cli import main, one_line
from anomalib_synth.generate import generate
from anomalib_synth.io import builtin_photo, resize, to_uint8
from anomalib_synth.writer import MANIFEST, MVTecWriter


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def normal_folder(tmp_path):
    folder = tmp_path / "normal"
    folder.mkdir()
    for name in ("brick", "gravel", "coffee"):
        Image.fromarray(to_uint8(resize(builtin_photo(name), (70, 90)))).save(folder / f"{name}.png")
    return folder


def test_list_prints_every_synthesizer(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("perlin", "cutpaste", "scar", "nsa"):
        assert name in out


def test_generate_writes_mvtec_folder_and_manifest(tmp_path, normal_folder) -> None:
    out = tmp_path / "out"
    code = main(["generate", str(normal_folder), str(out), "-s", "cutpaste", "-n", "5", "--size", "48", "64",
                 "--seed", "3", "--batch-size", "2", "-q", "-o", "num_defects=[1,2]"])  # fmt: skip
    assert code == 0
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2, 3, 4]
    for record in lines:
        assert record["label"] is True and record["synthesizer"] == "cutpaste" and record["seed"] == 3
        assert record["source"].endswith((".png",)) and "params" in record
        image = np.asarray(Image.open(out / record["image"]))
        mask = np.asarray(Image.open(out / record["mask"]))
        assert image.shape == (48, 64, 3) and mask.shape == (48, 64)
        assert set(np.unique(mask)) == {0, 255}
    assert (out / "test" / "cutpaste" / "004.png").is_file()
    assert (out / "ground_truth" / "cutpaste" / "004_mask.png").is_file()
    # sources are used in turn
    assert [r["source"].rsplit("/", 1)[-1] for r in lines[:3]] == ["brick.png", "coffee.png", "gravel.png"]


def test_generated_mask_marks_the_changed_pixels(tmp_path) -> None:
    out = tmp_path / "o"
    generate("builtin:gravel", out, "perlin", num=1, size=(64, 64), progress=False)
    source = np.asarray(Image.fromarray(to_uint8(resize(builtin_photo("gravel"), (64, 64))))).astype(int)
    image = np.asarray(Image.open(out / "test/perlin/000.png")).astype(int)
    mask = np.asarray(Image.open(out / "ground_truth/perlin/000_mask.png")) > 0
    changed = np.abs(image - source).max(-1) > 0
    assert not (changed & ~mask).any() and changed[mask].mean() > 0.5


def test_same_seed_identical_files_different_seed_different(tmp_path) -> None:
    kwargs = {"num": 4, "size": (48, 48), "batch_size": 3, "progress": False}
    generate("builtin:brick,coffee", tmp_path / "a", "nsa", seed=1, **kwargs)
    generate("builtin:brick,coffee", tmp_path / "b", "nsa", seed=1, **kwargs)
    generate("builtin:brick,coffee", tmp_path / "c", "nsa", seed=2, **kwargs)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")


def _interrupt_inside_a_write(monkeypatch, stem: str) -> None:
    """Ctrl-C inside the PNG write of ``stem`` (e.g. ``005``): half of the file is on disk under its temporary name
    (``.005.<random>.tmp.png``) when the interruption comes, so the temporary file exists and must be removed."""
    original = Image.Image.save

    def save(self, fp, *args, **kwargs):
        original(self, fp, *args, **kwargs)
        if Path(fp).name.startswith(f".{stem}."):
            Path(fp).write_bytes(Path(fp).read_bytes()[:100])
            raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save)


def test_interrupted_run_resumes_to_identical_files(tmp_path, monkeypatch) -> None:
    kwargs = {"num": 8, "size": (40, 40), "batch_size": 2, "seed": 5, "progress": False}
    generate("builtin:grass,coffee", tmp_path / "full", "perlin", **kwargs)
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _interrupt_inside_a_write(patch, "005")  # batches 0 and 1 finished, batch 2 half done
        with pytest.raises(KeyboardInterrupt):
            generate("builtin:grass,coffee", resumed, "perlin", **kwargs)
    assert sorted(MVTecWriter(resumed, "perlin").completed()) == [0, 1, 2, 3, 4]
    assert not list(resumed.rglob(".*.tmp*")), "the file in flight leaves no temporary file behind"
    # a truncated manifest line and a corrupt image (of batch 1: batch 0 stays done) are detected and redone too
    with (resumed / MANIFEST).open("a") as f:
        f.write('{"index": 5, "ima')
    (resumed / "test" / "perlin" / "003.png").write_bytes(b"not a png")
    assert sorted(MVTecWriter(resumed, "perlin").completed()) == [0, 1, 2, 4]
    records = generate("builtin:grass,coffee", resumed, "perlin", **kwargs)
    assert records.written == 4, "samples 3, 5, 6 and 7"
    # batches 1 to 3 start from their own seeds, not from a generator that went through batch 0 first
    assert _files(tmp_path / "full") == _files(resumed)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--seed", "9"], "seed"),
        (["-n", "3"], "num"),
        (["--size", "32", "40"], "size"),
        (["--batch-size", "1"], "batch_size"),
        (["--grayscale"], "channels"),
        (["--foreground", "none"], "config"),
        (["-o", "scar_width=[2,4]"], "config"),
        (["-s", "cutpaste"], "synthesizer"),
        (["SOURCE", "builtin:gravel"], "source"),
    ],
)
def test_rerun_with_other_settings_is_refused(tmp_path, capsys, change, named) -> None:
    out = tmp_path / "o"
    base = {"SOURCE": "builtin:brick", "-s": "scar"}
    assert main(["generate", base["SOURCE"], str(out), "-s", base["-s"], "-n", "2", "--size", "32", "32", "-q"]) == 0
    before = _files(out)
    if change[0] in base:
        base[change[0]] = change[1]
        change = []
    capsys.readouterr()
    code = main(["generate", base["SOURCE"], str(out), "-s", base["-s"], "-n", "2", "--size", "32", "32", "-q",
                 *change])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "different settings (" in err, err
    assert named in err.split("different settings (")[1].split(")")[0].split(", "), err
    assert _files(out) == before, "a refused run writes nothing"


def test_rerun_on_a_source_folder_whose_files_changed_is_refused(tmp_path, normal_folder) -> None:
    out = tmp_path / "o"
    generate(str(normal_folder), out, "scar", num=2, size=(32, 32), progress=False)
    (normal_folder / "brick.png").rename(normal_folder / "another.png")
    with pytest.raises(ValueError, match=r"different settings \(sources\)"):
        generate(str(normal_folder), out, "scar", num=2, size=(32, 32), progress=False)


def test_an_unreadable_source_file_is_skipped_named_and_counted_or_stops_the_run(tmp_path, normal_folder,
                                                                                   capsys, caplog) -> None:  # fmt: skip
    (normal_folder / "zz_garbage.png").write_bytes(b"not an image")
    args = ["generate", str(normal_folder), str(tmp_path / "o"), "-s", "scar", "-n", "3", "--size", "32", "32", "-q"]
    with caplog.at_level("WARNING", logger="anomalib_synth.io"):
        assert main(args) == 0
    assert "zz_garbage.png" in caplog.text
    assert "skipped 1 unreadable source file(s)" in capsys.readouterr().out
    assert main([*args[:2], str(tmp_path / "strict"), *args[3:], "--on-error", "raise"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zz_garbage.png" in err[0]


@pytest.mark.parametrize("where", [0, 1, -1])
def test_debug_anywhere_on_the_command_line_raises_the_error(tmp_path, where) -> None:
    args = ["generate", str(tmp_path / "missing"), str(tmp_path / "out"), "-s", "nsa"]
    args.insert(where if where >= 0 else len(args), "--debug")
    with pytest.raises(ValueError, match="missing"):
        main(args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "MISSING_DIR", "OUT", "-s", "perlin"], "does not exist"),
        (["generate", "builtin:nope", "OUT", "-s", "perlin"], "unknown builtin photo"),
        (["generate", "builtin:brick", "OUT", "-s", "nope"], "unknown synthesizer"),
        (["generate", "builtin:brick", "OUT", "-s", "perlin", "-o", "texture_dir=MISSING_TEX"], "does not exist"),
        (["generate", "builtin:brick", "OUT", "-s", "perlin", "-o", "beta"], "KEY=VALUE"),
    ],
)
def test_generate_bad_input_gives_clear_error(tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_multi_line_error_from_a_library_prints_one_line(tmp_path, monkeypatch, capsys) -> None:
    def fails(*args, **kwargs):
        raise ValueError("Parser key 'beta':\n\n  - expected a float\n  - got 'x'\n")  # as jsonargparse words them

    monkeypatch.setattr(generate_module, "generate", fails)
    assert main(["generate", "builtin:brick", str(tmp_path / "o"), "-s", "perlin", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == "anomalib-synth generate: error: Parser key 'beta': - expected a float - got 'x'\n"
    assert one_line(OSError()) == "OSError", "an empty message names the exception"


def test_anomalib_train_with_an_unknown_model_prints_one_line_and_exits_2(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "anomalib_synth.cli", "train", "--model", "Nope"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anomalib-synth train: error:"), result.stderr
    assert "Nope" in lines[0] and "--help" in lines[0]
    assert not (tmp_path / "results").exists(), "no empty results/ folder is left"


def test_grayscale_generation(tmp_path) -> None:
    records = generate("builtin:gravel", tmp_path, "nsa", num=2, size=(32, 32), channels=1, progress=False)
    assert np.asarray(Image.open(tmp_path / records[0]["image"])).shape == (32, 32)


def test_empty_foreground_goes_to_good(tmp_path, monkeypatch) -> None:
    class Nothing(generate_module.Synthesizer):
        name = "nothing"

        def sample_params(self, images, fg_masks, generator):
            return {}

        def apply(self, images, params):
            return self._result(images, images, torch.zeros_like(images[:, :1], dtype=torch.bool), params, ())

    records = generate("builtin:brick", tmp_path, Nothing(), num=2, size=(32, 32), progress=False)
    assert [r["image"] for r in records] == ["test/good/000.png", "test/good/001.png"]
    assert all(r["mask"] is None and r["label"] is False for r in records)


def test_demo_runs_end_to_end(tmp_path, capsys) -> None:
    assert main(["demo", "--output", str(tmp_path), "--size", "64", "-q"]) == 0
    out = capsys.readouterr().out
    for name in ("perlin", "cutpaste", "scar", "nsa", "anomalib-perlin"):
        assert name in out
        assert (tmp_path / name / MANIFEST).is_file()
    gallery = Image.open(tmp_path / "gallery.png")
    assert gallery.size[0] > gallery.size[1] > 0


def test_console_script_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "anomalib_synth.cli", "list"], capture_output=True, text=True)
    assert result.returncode == 0 and "perlin" in result.stdout


def test_truncated_manifest_line_does_not_swallow_the_next_sample(tmp_path) -> None:
    kwargs = {"num": 4, "size": (32, 32), "batch_size": 2, "progress": False}
    generate("builtin:brick", tmp_path, "scar", **kwargs)
    manifest = tmp_path / MANIFEST
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])  # sample 2's line cut short, no newline
    (tmp_path / "test" / "scar" / "003.png").unlink()
    records = generate("builtin:brick", tmp_path, "scar", **kwargs)
    assert [r["index"] for r in records] == [0, 1, 2, 3]


def test_a_sample_whose_mask_file_is_missing_or_corrupt_is_regenerated(tmp_path) -> None:
    kwargs = {"num": 3, "size": (32, 32), "batch_size": 3, "seed": 2, "progress": False}
    generate("builtin:brick", tmp_path / "full", "cutpaste", **kwargs)
    out = tmp_path / "out"
    generate("builtin:brick", out, "cutpaste", **kwargs)
    (out / "ground_truth" / "cutpaste" / "000_mask.png").unlink()
    (out / "ground_truth" / "cutpaste" / "002_mask.png").write_bytes(b"\x89PNG cut short")
    assert sorted(MVTecWriter(out, "cutpaste").completed()) == [1], "a sample is done only when its mask is readable"
    records = generate("builtin:brick", out, "cutpaste", **kwargs)
    assert records.written == 2
    assert _files(tmp_path / "full") == _files(out)


def test_a_resumed_run_writes_the_manifest_sorted_and_identical(tmp_path) -> None:
    """A sample whose manifest line was lost (killed between its files and its line) is redone after the others;
    the final manifest is still one line per sample in index order, as an uninterrupted run writes it."""
    kwargs = {"num": 4, "size": (32, 32), "batch_size": 1, "seed": 1, "progress": False}
    generate("builtin:brick", tmp_path / "full", "scar", **kwargs)
    out = tmp_path / "out"
    generate("builtin:brick", out, "scar", **kwargs)
    lines = (out / MANIFEST).read_text().splitlines()
    (out / MANIFEST).write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # sample 1's line lost
    records = generate("builtin:brick", out, "scar", **kwargs)
    assert records.written == 1 and [r["index"] for r in records] == [0, 1, 2, 3]
    assert [json.loads(line)["index"] for line in (out / MANIFEST).read_text().splitlines()] == [0, 1, 2, 3]
    assert _files(tmp_path / "full") == _files(out)


def test_each_batch_draws_its_own_anomalies(tmp_path) -> None:
    """One source image, one sample per batch: every batch has its own seed, so the samples differ."""
    records = generate("builtin:brick", tmp_path, "cutpaste", num=3, size=(32, 32), batch_size=1, progress=False)
    assert [r["batch"] for r in records] == [0, 1, 2]
    assert len({(tmp_path / r["image"]).read_bytes() for r in records}) == 3
    assert len({json.dumps(r["params"], sort_keys=True) for r in records}) == 3


def test_missing_weights_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    """A ``ModelNotFoundError`` is an ``OSError``, not a ``ValueError``: it is a user mistake too."""
    code = main(["generate", "builtin:brick", str(tmp_path / "o"), "-s", "inpainting", "--model-path",
                 str(tmp_path / "no-model"), "-n", "1", "-q"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("anomalib-synth generate: error:") and "no-model" in err[0] and "does not exist" in err[0]


def test_main_restores_the_sigterm_handler_it_installed() -> None:
    import signal

    def mine(signum, frame):  # a handler of the host program
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["list"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
