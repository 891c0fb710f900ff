"""The YAML configs under configs/ parse, and real `anomalib-synth train --config ...` and `--model M --data D` runs
work offline.

configs/data/*.yaml and configs/model/*.yaml are the parts anomalib's CLI combines (`--model FILE --data FILE`, plus
`--trainer.callbacks FILE` from configs/callbacks/ for the DRAEM route); the top-level files are full examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_data import folder_datamodule_config, make_folder_dataset

ROOT = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(ROOT.glob("*.yaml"))
DATA = sorted((ROOT / "data").glob("*.yaml"))
MODELS = sorted((ROOT / "model").glob("*.yaml"))
CALLBACKS = sorted((ROOT / "callbacks").glob("*.yaml"))
ALL = sorted(ROOT.rglob("*.yaml"))
SYNTHESIZERS = {  # data file -> (inner datamodule file, synthesizer class or short name, mode)
    "mvtec_perlin": ("mvtec.yaml", "anomalib_synth.synthesizers.PerlinSynthesizer", "online"),
    "mvtec_anomalib_perlin": ("mvtec.yaml", "anomalib_synth.synthesizers.AnomalibPerlinSynthesizer", "online"),
    "mvtec_cutpaste": ("mvtec.yaml", "anomalib_synth.synthesizers.CutPasteSynthesizer", "online"),
    "mvtec_scar": ("mvtec.yaml", "anomalib_synth.synthesizers.ScarSynthesizer", "online"),
    "mvtec_nsa": ("mvtec.yaml", "anomalib_synth.synthesizers.NSASynthesizer", "online"),
    "mvtec_cache_nsa": ("mvtec.yaml", "nsa", "cache"),
    "mvtec_cache_inpainting": ("mvtec.yaml", "anomalib_synth.synthesizers.diffusion.inpainting.InpaintingSynthesizer",
                               "cache"),
    "folder_perlin": ("folder.yaml", "anomalib_synth.synthesizers.PerlinSynthesizer", "online"),
}  # fmt: skip
PLAIN = {"mvtec": "anomalib.data.MVTecAD", "folder": "anomalib.data.Folder"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "anomalib_synth.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def test_there_are_configs_for_each_route() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"draem_cutpaste_mvtec", "draem_nsa_mvtec", "supersimplenet_online_perlin",
            "patchcore_1shot_synthetic_val", "supersimplenet_cache_nsa", "supersimplenet_1shot_offline"} <= names  # fmt: skip
    assert {p.stem for p in DATA} == set(SYNTHESIZERS) | set(PLAIN)
    assert {p.stem for p in MODELS} == {"supersimplenet", "supersimplenet_offline", "patchcore", "draem",
                                        "patchcore_refiner", "one_prompt_segmenter"}  # fmt: skip
    assert {p.stem for p in CALLBACKS} == {"swap_cutpaste", "swap_nsa"}


def test_data_files_wrap_the_one_dataset_block() -> None:
    for path in DATA:
        config = yaml.safe_load(path.read_text())
        if path.stem in PLAIN:
            assert config["class_path"] == PLAIN[path.stem]
            continue
        inner, synthesizer, mode = SYNTHESIZERS[path.stem]
        args = config["init_args"]
        assert config["class_path"] == "anomalib_synth.data.SyntheticAnomalyDataModule", path.name
        assert args["datamodule"] == inner, path.name
        assert (
            args["synthesizer"] if isinstance(args["synthesizer"], str) else args["synthesizer"]["class_path"]
        ) == synthesizer
        assert args.get("mode", "online") == mode, path.name
        assert args["seed"] == 0
    inpainting = yaml.safe_load((ROOT / "data" / "mvtec_cache_inpainting.yaml").read_text())["init_args"]
    assert inpainting["synthesizer"]["init_args"]["model"] == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert "NEEDS WEIGHTS" in (ROOT / "data" / "mvtec_cache_inpainting.yaml").read_text()


def test_dataset_blocks_are_not_repeated() -> None:
    """anomalib's MVTecAD and Folder blocks are written once (configs/data/mvtec.yaml, folder.yaml); every other file
    names those files, so a new config that pastes the block again fails here."""
    for path in ALL:
        text = path.read_text()
        for stem, class_path in PLAIN.items():
            if path != ROOT / "data" / f"{stem}.yaml":
                assert class_path not in text, f"{path.relative_to(ROOT)} repeats {class_path}: use data/{stem}.yaml"
    for path in CONFIGS:
        data = yaml.safe_load(path.read_text())["data"]
        reference = data if isinstance(data, str) else data["init_args"]["datamodule"]
        assert isinstance(reference, str) and (path.parent / reference).is_file(), path.name


def test_every_file_says_how_to_run_it() -> None:
    for path in ALL:
        comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any("anomalib-synth train" in line for line in comments), path.relative_to(ROOT)
        relative = str(path.relative_to(ROOT.parent))
        assert relative in "\n".join(comments) or path.parent == ROOT or path.stem in PLAIN, relative


def test_draem_route_is_model_plus_plain_data_plus_callbacks() -> None:
    draem = yaml.safe_load((ROOT / "model" / "draem.yaml").read_text())
    assert draem["class_path"] == "anomalib.models.Draem"
    swaps = {p.stem: yaml.safe_load(p.read_text()) for p in CALLBACKS}
    assert all(s[0]["class_path"] == "anomalib_synth.data.SynthesizerSwap" for s in swaps.values())
    assert swaps["swap_cutpaste"][0]["init_args"] == {"synthesizer": "cutpaste", "probability": 0.5, "seed": 0}
    for name, swap in (("draem_cutpaste_mvtec", "swap_cutpaste"), ("draem_nsa_mvtec", "swap_nsa")):
        full = yaml.safe_load((ROOT / f"{name}.yaml").read_text())
        assert full["trainer"]["callbacks"] == f"callbacks/{swap}.yaml"
        assert (full["model"], full["data"]) == ("model/draem.yaml", "data/mvtec.yaml")


PARSE_ALL = """
import sys
from anomalib_synth.cli import main
for config in sys.argv[1:]:
    try:
        main(["train", "--config", config, "--print_config"])
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise SystemExit(f"{config}: exit code {exit.code}")
    print("PARSED", config)
"""


@pytest.mark.slow
def test_every_config_parses_with_short_plugin_names(tmp_path) -> None:
    command = [sys.executable, "-c", PARSE_ALL, *map(str, CONFIGS)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("PARSED") == len(CONFIGS)
    assert result.stdout.count("class_path: anomalib_synth.") >= len(CONFIGS)


@pytest.mark.slow
def test_short_name_resolves_after_plugin_import(tmp_path) -> None:
    result = _cli("train", "--model", "Padim", "--data", "SyntheticAnomalyDataModule",
                  "--data.datamodule", "Folder", "--data.datamodule.name", "x", "--data.datamodule.root", ".",
                  "--data.datamodule.normal_dir", ".", "--print_config", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: anomalib_synth.data.SyntheticAnomalyDataModule" in result.stdout


@pytest.mark.slow
def test_anomalib_train_runs_a_config_on_tiny_data(tmp_path) -> None:
    root = make_folder_dataset(tmp_path / "data")
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "patchcore_1shot_synthetic_val.yaml").read_text())
    config["trainer"] = {"max_epochs": 1, "accelerator": "cpu", "logger": False}
    config["default_root_dir"] = str(tmp_path / "results")
    config["model"]["init_args"].update(backbone="resnet18", pre_trained=False)
    wrapper = config["data"]["init_args"]
    wrapper["cache_dir"] = str(tmp_path / "cache")
    wrapper["datamodule"] = folder_datamodule_config(root)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _cli("train", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "results" / "Patchcore" / "tiny"
    assert list(run.rglob("config.yaml")), "anomalib's SaveConfigCallback wrote the run's config"
    assert list(run.rglob("*.ckpt")), "a checkpoint was saved"
    assert list((tmp_path / "cache").rglob("manifest.jsonl")), "the synthetic validation split was written"


PRINT_PAIRS = """
import contextlib, io, json, sys
import yaml
from anomalib_synth.cli import main
for args in json.loads(sys.argv[1]):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main(["train", *args, "--print_config"])
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise SystemExit(f"{args}: exit code {exit.code}")
    text = out.getvalue()  # the rich log handler also writes to stdout: the config starts at its header
    config = yaml.safe_load(text[text.index("# anomalib=="):])
    print("CONFIG", json.dumps({"args": args, "model": config["model"], "data": config["data"],
                                "callbacks": config["trainer"]["callbacks"]}))
"""


@pytest.mark.slow
def test_every_data_file_combines_with_every_model_file(tmp_path) -> None:
    """`anomalib-synth train --model M --data D` for every pair (and the DRAEM route with each callbacks file) parses
    into the classes the files name, from another working directory, with command-line overrides on top."""
    pairs = [["--model", str(m), "--data", str(d)] for m in MODELS for d in DATA]
    pairs += [["--model", str(ROOT / "model" / "draem.yaml"), "--data", str(ROOT / "data" / "mvtec.yaml"),
               "--trainer.callbacks", str(c), "--trainer.callbacks.probability", "1.0"] for c in CALLBACKS]  # fmt: skip
    pairs.append(["--model", str(MODELS[0]), "--data", str(ROOT / "data" / "mvtec_nsa.yaml"),
                  "--data.datamodule.root", "/data/mvtec", "--data.datamodule.category", "grid",
                  "--data.synthesizer.num_defects", "[2, 3]"])  # fmt: skip
    command = [sys.executable, "-c", PRINT_PAIRS, json.dumps(pairs)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    configs = [json.loads(line[7:]) for line in result.stdout.splitlines() if line.startswith("CONFIG ")]
    assert len(configs) == len(pairs)
    for config in configs:
        model, data = (Path(config["args"][i]).stem for i in (1, 3))
        assert (
            config["model"]["class_path"]
            == yaml.safe_load((ROOT / "model" / f"{model}.yaml").read_text())["class_path"]
        )
        if data in PLAIN:
            assert config["data"]["class_path"] == PLAIN[data]
            continue
        inner, synthesizer, mode = SYNTHESIZERS[data]
        args = config["data"]["init_args"]
        assert args["datamodule"]["class_path"] == PLAIN[Path(inner).stem]
        assert (
            args["synthesizer"] if isinstance(args["synthesizer"], str) else args["synthesizer"]["class_path"]
        ) == synthesizer
        assert args["mode"] == mode
    swaps = [c["callbacks"][0]["init_args"] for c in configs if c["callbacks"]]
    assert [s["synthesizer"] if isinstance(s["synthesizer"], str) else s["synthesizer"]["class_path"] for s in swaps] == [
        "cutpaste", "anomalib_synth.synthesizers.NSASynthesizer"]  # fmt: skip
    assert [s["probability"] for s in swaps] == [1.0, 1.0]
    override = configs[-1]["data"]["init_args"]
    assert str(override["datamodule"]["init_args"]["root"]) == "/data/mvtec"
    assert override["datamodule"]["init_args"]["category"] == "grid"
    assert override["synthesizer"]["init_args"]["num_defects"] == [2, 3]
    assert override["synthesizer"]["init_args"]["foreground"] == "auto", "the file's other values stay"


TRAIN_RUNS = """
import json, sys
from anomalib_synth.cli import main
from anomalib_synth.data import SynthesizerSwap

setup = SynthesizerSwap.setup
def spy(self, trainer, pl_module, stage):
    setup(self, trainer, pl_module, stage)
    print("SWAPPED", type(pl_module).__name__, self.replaced, type(self.augmenter.synthesizer).__name__)
SynthesizerSwap.setup = spy

for name, args in json.loads(sys.argv[1]).items():
    try:
        code = main(["train", *args])
    except SystemExit as exit:
        code = exit.code
    print("RUN", name, code, flush=True)
"""


def _resize(size: int) -> str:
    transform = {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [size, size]}}
    return json.dumps({"class_path": "anomalib.pre_processing.PreProcessor", "init_args": {"transform": transform}})


@pytest.mark.slow
def test_model_and_data_files_train_one_epoch_on_tiny_data(tmp_path, tiny) -> None:
    """One pair per route, 1 epoch on toy data, the files as shipped plus command-line overrides of root, category,
    sizes and backbones: online over Folder (SuperSimpleNet), cache with a diffusion synthesizer (inpainting on a tiny
    random model) over MVTecAD, and DRAEM with its generator swapped by the callbacks file over plain MVTecAD."""
    from anomalib_synth.toydata import make_toy_mvtec

    mvtec = make_toy_mvtec(tmp_path / "mvtec", size=64)
    folder = make_folder_dataset(tmp_path / "folder")
    (tmp_path / "dtd").mkdir()
    common = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--seed_everything", "0"]  # fmt: skip
    model, data, callbacks = ROOT / "model", ROOT / "data", ROOT / "callbacks"
    runs = {
        "folder_online": ["--model", f"{model}/supersimplenet_offline.yaml", "--data", f"{data}/folder_perlin.yaml",
                          "--data.datamodule.root", str(folder), "--data.datamodule.name", "tiny",
                          "--data.datamodule.num_workers", "0", "--data.datamodule.train_batch_size", "4",
                          "--model.pre_processor", _resize(128), "--default_root_dir", str(tmp_path / "online"),
                          "--data.cache_dir", str(tmp_path / "cache"), *common],
        "mvtec_cache": ["--model", f"{model}/supersimplenet_offline.yaml", "--data",
                        f"{data}/mvtec_cache_inpainting.yaml", "--data.datamodule.root", str(mvtec),
                        "--data.datamodule.category", "gravel", "--data.datamodule.num_workers", "0",
                        "--data.synthesizer.model", str(tiny["sd-inpainting"]),
                        "--data.synthesizer.num_inference_steps", "2", "--data.synthesizer.resolution", "32",
                        "--data.cache_dir", str(tmp_path / "cache"), "--model.pre_processor", _resize(128),
                        "--default_root_dir", str(tmp_path / "cache_run"), *common],
        "draem_swap": ["--model", f"{model}/draem.yaml", "--data", f"{data}/mvtec.yaml", "--trainer.callbacks",
                       f"{callbacks}/swap_cutpaste.yaml", "--data.root", str(mvtec), "--data.category", "gravel",
                       "--data.num_workers", "0", "--model.dtd_dir", str(tmp_path / "dtd"),
                       "--model.pre_processor", _resize(64), "--trainer.num_sanity_val_steps", "0",
                       "--default_root_dir", str(tmp_path / "draem"), *common],
    }  # fmt: skip
    # the explorer's "copy config" block, pasted as text into folder_perlin.yaml in place of its synthesizer block
    from anomalib_synth.explore.session import Explorer, Request

    copied = Explorer().preview(Request("cutpaste", {"area_range": ("0.05", "0.1")}, size=64, batch_size=2)).yaml
    shipped = (data / "folder_perlin.yaml").read_text()
    start, end = shipped.index("  synthesizer:\n"), shipped.index("  mode: online")
    pasted = "".join(f"  {line}\n" for line in copied.splitlines())
    explored = shipped[:start] + pasted + shipped[end:]
    explored = explored.replace("datamodule: folder.yaml", f"datamodule: {data}/folder.yaml")
    (tmp_path / "explored.yaml").write_text(explored)
    runs["explorer_block"] = [*runs["folder_online"][:3], str(tmp_path / "explored.yaml"), *runs["folder_online"][4:]]
    runs["explorer_block"][runs["explorer_block"].index("--default_root_dir") + 1] = str(tmp_path / "explored")
    command = [sys.executable, "-c", TRAIN_RUNS, json.dumps(runs)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert [line for line in result.stdout.splitlines() if line.startswith("RUN ")] == [
        f"RUN {name} 0" for name in runs], result.stderr[-3000:]  # fmt: skip
    assert "SWAPPED Draem augmenter CutPasteSynthesizer" in result.stdout
    for run, model_name, data_name in (("online", "Supersimplenet", "tiny"), ("cache_run", "Supersimplenet", "MVTecAD"),
                                       ("draem", "Draem", "MVTecAD"), ("explored", "Supersimplenet", "tiny")):  # fmt: skip
        results = tmp_path / run / model_name / data_name
        assert list(results.rglob("*.ckpt")), f"{run}: a checkpoint was saved"
        saved = yaml.safe_load(next(results.rglob("config.yaml")).read_text())
        assert saved["trainer"]["max_epochs"] == 1
        if run == "explored":  # the run used the pasted block's synthesizer and arguments
            used, block = saved["data"]["init_args"]["synthesizer"], yaml.safe_load(copied)["synthesizer"]
            assert used["class_path"] == block["class_path"] == "anomalib_synth.synthesizers.CutPasteSynthesizer"
            assert {k: used["init_args"][k] for k in block["init_args"]} == block["init_args"] != {}
    manifests = list((tmp_path / "cache").rglob("manifest.jsonl"))
    records = [json.loads(line) for m in manifests for line in m.read_text().splitlines()]
    inpainted = [r for r in records if r["synthesizer"] == "inpainting"]
    assert len(inpainted) == 2 * 2, "2 training images x variants_per_image 2 cached by the inpainting synthesizer"
    assert {Path(r["source"]).parent for r in inpainted} == {mvtec / "gravel" / "train" / "good"}
    assert all(r["label"] for r in inpainted)
