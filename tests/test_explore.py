"""The explorer's core (no Gradio needed): controls derived from each synthesizer's constructor, previews that
`anomalib-synth generate` and the copied YAML reproduce bit for bit, one-line errors, and the weights check."""

from __future__ import annotations

import enum
import shlex
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from anomalib_synth.cli import main, one_line
from anomalib_synth.explore.controls import changed_arguments, derive_controls
from anomalib_synth.explore.reproduce import DRAWN_NOTE
from anomalib_synth.explore.session import Explorer, Request
from anomalib_synth.explore.sources import describe_folder, load_batch, mask_from_drawing
from anomalib_synth.io import read_image, to_uint8
from anomalib_synth.synthesis import synthesize_seeded_batch
from anomalib_synth.synthesizers import PerlinSynthesizer, Synthesizer, get_class, names
from anomalib_synth.synthesizers.registry import _REGISTRY, register
from anomalib_synth.synthesizers.validation import check_range

SMALL = {"size": 64, "batch_size": 2}


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    return Explorer()


def controls_of(name: str) -> dict:
    return {c.name: c for c in derive_controls(get_class(name))}


def test_controls_follow_the_signature_and_recorded_defaults() -> None:
    perlin = controls_of("perlin")
    assert (perlin["beta"].kind, perlin["beta"].default, perlin["beta"].integer) == ("range", [0.2, 1.0], False)
    assert (perlin["scale_range"].kind, perlin["scale_range"].integer) == ("range", True)
    assert (perlin["area_range"].kind, perlin["area_range"].optional, perlin["area_range"].default) == (
        "range", True, None)  # fmt: skip
    assert perlin["texture_dir"].kind == "folder", "the class's texture_argument"
    assert (perlin["n_augment"].kind, perlin["threshold"].kind) == ("integer", "number")
    assert "foreground" not in perlin, "set by the explorer's foreground mode"
    cutpaste, scar = controls_of("cutpaste"), controls_of("scar")
    assert (cutpaste["mode"].kind, cutpaste["mode"].choices) == ("choice", ("normal", "scar"))
    assert cutpaste["source"].choices == ("same", "other", "any")
    assert cutpaste["source_foreground"].kind == "flag"
    assert (scar["mode"].default, scar["scar_height"].default) == ("scar", [32.0, 96.0]), "scar's own defaults"
    inpainting = controls_of("inpainting")
    assert inpainting["model"].default == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert not {"device", "local_files_only", "progress"} & set(inpainting), "config_ignore has no controls"


class Finish(enum.Enum):
    MATTE = "matte"
    GLOSSY = "glossy"


class FakeThirdParty(Synthesizer):
    """A plugin's synthesizer: a tuple range, a Literal, an Enum, a texture folder, a flag, an int."""

    texture_argument = "stains"

    def __init__(self, stains: str | Path | None = None, strength: tuple[float, float] = (0.1, 0.4),
                 shape: Literal["disc", "square"] = "disc", finish: Finish = Finish.MATTE, invert: bool = False,
                 count: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.strength = check_range("strength", strength, 0.0, 1.0)

    def sample_params(self, images, fg_masks, generator):
        return {"v": torch.rand(images.shape[0], generator=generator)}

    def apply(self, images, params):
        masks = torch.zeros_like(images[:, :1], dtype=torch.bool)
        masks[..., :8, :8] = True
        out = torch.where(masks, images * params["v"].view(-1, 1, 1, 1), images)
        return self._result(images, out, masks, params, ("v",))


@pytest.fixture
def third_party():
    register("fake-third-party")(FakeThirdParty)
    yield "fake-third-party"
    _REGISTRY.pop("fake-third-party")


def test_third_party_controls(third_party) -> None:
    controls = controls_of(third_party)
    assert [(c.name, c.kind) for c in controls.values()] == [
        ("stains", "folder"), ("strength", "range"), ("shape", "choice"), ("finish", "choice"), ("invert", "flag"),
        ("count", "integer")]  # fmt: skip
    assert controls["shape"].choices == ("disc", "square")
    assert (controls["finish"].choices, controls["finish"].default) == (("MATTE", "GLOSSY"), "MATTE")
    assert controls["finish"].to_argument("GLOSSY") is Finish.GLOSSY
    explorer = Explorer()
    preview = explorer.preview(Request(third_party, {"strength": (0.2, 0.3), "shape": "square"}, **SMALL))
    assert preview.arguments == {"strength": (0.2, 0.3), "shape": "square"}, "no foreground argument: none added"
    assert "class_path: test_explore.FakeThirdParty" in preview.yaml
    with pytest.raises(ValueError, match=r"^strength must satisfy 0.0 <= min <= max <= 1.0, got \(0.3, 0.2\)$"):
        explorer.preview(Request(third_party, {"strength": (0.3, 0.2)}, **SMALL))


@pytest.mark.parametrize("name", names(requires_weights=False))
def test_every_synthesizer_without_weights_can_be_explored(explorer, name) -> None:
    entry = explorer.entries[name]
    assert entry.reason is None
    defaults = {c.name: c.ui_default() for c in entry.controls}
    assert changed_arguments(entry.controls, defaults) == {}, "the page's defaults are the synthesizer's"
    preview = explorer.preview(Request(name, defaults, **SMALL))
    assert preview.result.images.shape == (2, 3, 64, 64)
    assert preview.result.labels.tolist() == [True, True]
    assert set(preview.figures) >= {"background_pasted", "visibility"} and preview.ms_per_image > 0
    assert preview.picture().shape == (2 * 66 + 2, 3 * 66 + 2, 3), "rows: input | result | overlay"


def test_diffusion_synthesizers_are_listed_with_the_reason_offline(explorer, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffusion = names(kind="diffusion")
    assert set(diffusion) <= set(explorer.entries) and len(diffusion) == 4
    for name in diffusion:
        reason = explorer.entries[name].reason
        assert reason and "\n" not in reason, name
    assert "stable-diffusion-v1-5/stable-diffusion-inpainting" in explorer.entries["inpainting"].reason
    assert "needs adapter=DIR" in explorer.entries["xfusion"].reason
    with pytest.raises(ValueError, match="inpainting is unavailable: weights model="):
        explorer.preview(Request("inpainting", **SMALL))


def test_a_local_diffusion_model_makes_it_available(explorer, tiny) -> None:
    request = Request("inpainting", {"model": str(tiny["sd-inpainting"]), "num_inference_steps": 2, "resolution": "32"},
                      **SMALL)  # fmt: skip
    preview = explorer.preview(request)
    assert preview.arguments["model"] == str(tiny["sd-inpainting"]) and preview.arguments["resolution"] == 32
    assert preview.result.images.shape == (2, 3, 64, 64)


def test_bad_values_are_the_synthesizers_one_line_errors(explorer, tmp_path) -> None:
    cases = {
        "beta": ((0.9, 0.1), r"^beta must satisfy 0.0 <= min <= max <= 1.0, got \(0.9, 0.1\)$"),
        "texture_dir": (str(tmp_path / "missing"), r"^image folder '.*missing' does not exist or is not a directory$"),
        "area_range": (("0.1", ""), r"^area_range needs both a min and a max, got \(0.1, None\)$"),
    }
    for argument, (value, message) in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            explorer.preview(Request("perlin", {argument: value}, **SMALL))
        assert one_line(err.value) == str(err.value)


def write_photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(("coffee", "brick", "camera")[:count]):
        Image.fromarray(to_uint8(read_image_builtin(name))).save(folder / f"{i:03d}.png")
    return folder


def read_image_builtin(name: str) -> torch.Tensor:
    from anomalib_synth.io import builtin_photo, resize

    return resize(builtin_photo(name), (80, 100))


@pytest.mark.parametrize("source_kind", ["builtin", "folder"])
def test_generate_with_the_copied_command_writes_the_shown_batch(explorer, tmp_path, monkeypatch, source_kind) -> None:
    source = "builtin:gravel,coffee" if source_kind == "builtin" else str(write_photos(tmp_path / "normal"))
    values = {"mode": "scar", "area_range": (0.05, 0.2), "num_defects": (1, 3), "jitter": 0.2}
    request = Request("cutpaste", values, source=source, size=64, batch_size=4, seed=7, foreground="none")
    preview = explorer.preview(request)
    argv = shlex.split(preview.command)
    assert argv[:3] == ["anomalib-synth", "generate", source]
    assert "-o" in argv and "area_range=[0.05,0.2]" in argv and argv[argv.index("--foreground") + 1] == "none"
    argv[3] = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    assert main([*argv[1:], "--quiet"]) == 0
    for i in range(4):
        written = np.asarray(Image.open(tmp_path / "out" / "test" / "cutpaste" / f"{i:03d}.png"))
        mask = np.asarray(Image.open(tmp_path / "out" / "ground_truth" / "cutpaste" / f"{i:03d}_mask.png"))
        assert np.array_equal(written, to_uint8(preview.result.images[i])), i
        assert np.array_equal(mask > 0, preview.result.masks[i, 0].numpy() > 0.5), i


def test_copied_yaml_builds_the_same_synthesizer_through_the_datamodule_config(explorer, tmp_path) -> None:
    """The block pasted into a configs/data file, parsed and instantiated by jsonargparse as anomalib's CLI (`train`)
    does, gives a synthesizer whose batch equals the page's, bit for bit."""
    import jsonargparse
    from anomalib.data import AnomalibDataModule

    import anomalib_synth.data  # noqa: F401  (the plugin import `anomalib-synth train` does)
    from tiny_data import folder_datamodule_config, make_folder_dataset

    request = Request("perlin", {"beta": (0.5, 0.9), "scale_range": (1, 4), "area_range": ("0.01", "0.2")},
                      size=64, batch_size=3, seed=3)  # fmt: skip
    preview = explorer.preview(request)
    block = yaml.safe_load(preview.yaml)
    assert block == {"synthesizer": {"class_path": "anomalib_synth.synthesizers.PerlinSynthesizer", "init_args": {
        "beta": [0.5, 0.9], "scale_range": [1, 4], "area_range": [0.01, 0.2], "foreground": "auto"}}}  # fmt: skip
    data = {"class_path": "anomalib_synth.data.SyntheticAnomalyDataModule",
            "init_args": {"datamodule": folder_datamodule_config(make_folder_dataset(tmp_path / "data")),
                          **block, "mode": "online", "anomaly_ratio": 0.5, "seed": 0}}  # fmt: skip
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    parser = jsonargparse.ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    datamodule = parser.instantiate_classes(parser.parse_path(str(path))).data
    synth = datamodule.synthesizer
    assert isinstance(synth, PerlinSynthesizer)
    images, _, _ = load_batch(request.source, 64, 3)
    replay = synthesize_seeded_batch(synth, images, request.seed, 0)
    assert torch.equal(replay.images, preview.result.images) and torch.equal(replay.masks, preview.result.masks)


def test_drawn_foreground_is_passed_as_fg_masks_and_noted(explorer) -> None:
    layer = np.zeros((40, 40, 4), np.uint8)
    layer[10:30, 20:40, 3] = 255  # painted: the right half of rows 10..29
    mask = mask_from_drawing({"background": None, "layers": [layer], "composite": None}, 64)
    assert mask.shape == (1, 1, 64, 64) and mask[0, 0, 16:48, 32:].all() and not mask[0, 0, :, :32].any()
    assert mask_from_drawing({"layers": [np.zeros((8, 8, 4), np.uint8)]}, 64) is None, "nothing drawn"
    preview = explorer.preview(Request("nsa", foreground="drawn", drawn_mask=mask, **SMALL))
    masks = preview.result.masks > 0.5
    assert masks.any() and not (masks & ~mask).any(), "defects only where drawn"
    assert DRAWN_NOTE in preview.yaml and DRAWN_NOTE in preview.command
    with pytest.raises(ValueError, match="draw the object on the image first"):
        explorer.preview(Request("nsa", foreground="drawn", **SMALL))


def test_mvtec_folder_offers_categories_and_real_defects(tmp_path) -> None:
    root = tmp_path / "mvtec"
    write_photos(root / "cup" / "train" / "good")
    (root / "cup" / "test" / "crack").mkdir(parents=True)
    (root / "cup" / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(to_uint8(read_image_builtin("coffee"))).save(root / "cup" / "test" / "crack" / "000.png")
    mask = np.zeros((80, 100), np.uint8)
    mask[20:40, 30:60] = 255
    Image.fromarray(mask).save(root / "cup" / "ground_truth" / "crack" / "000_mask.png")
    layout = describe_folder(root)
    assert layout.is_mvtec and layout.normal_folders == {"cup": root / "cup" / "train" / "good"}
    explorer = Explorer(root)
    picture, name = explorer.real_defect("cup", 0, 64)
    assert name == "crack/000.png" and picture.shape == (68, 2 * 66 + 2, 3)
    preview = explorer.preview(Request("perlin", source=explorer.folder_source("cup"), **SMALL))
    assert str(root / "cup" / "train" / "good") in preview.command


def test_folder_batches_skip_unreadable_files_with_a_note(tmp_path) -> None:
    folder = write_photos(tmp_path / "imgs", 2)
    (folder / "000_broken.png").write_bytes(b"not a png")
    images, sources, notes = load_batch(str(folder), 32, 3)
    assert [Path(s).name for s in sources] == ["000.png", "001.png", "000.png"], "cycled as generate does"
    assert len(notes) == 1 and "000_broken.png" in notes[0]
    expected = read_image(folder / "001.png")
    assert images.shape == (3, 3, 32, 32) and expected.shape == (3, 80, 100)


def test_explore_without_gradio_is_a_one_line_error(monkeypatch, capsys) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    assert main(["explore"]) == 2
    assert capsys.readouterr().err.strip() == (
        'anomalib-synth explore: error: the explorer needs Gradio, an optional extra: pip install -e ".[explore]"')
