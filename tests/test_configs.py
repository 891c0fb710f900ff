"""The YAML configs under configs/ parse, and a real `anomalib-synth train --config ...` run works offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_data import folder_datamodule_config, make_folder_dataset

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "anomalib_synth.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def test_there_are_configs_for_each_route() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"draem_cutpaste_mvtec", "draem_nsa_mvtec", "supersimplenet_online_perlin",
            "patchcore_1shot_synthetic_val", "supersimplenet_cache_nsa", "supersimplenet_1shot_offline"} <= names  # fmt: skip


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
