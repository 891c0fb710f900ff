"""Smoke test of ``benchmarks/diffusion_cost.py`` on tiny models (the full-size run is documented in docs/diffusion.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "diffusion_cost.py"


@pytest.fixture(scope="module")
def diffusion_cost():
    spec = importlib.util.spec_from_file_location("diffusion_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_official_anomalyany_count_is_about_850(diffusion_cost) -> None:
    official = diffusion_cost.official_anomalyany()
    assert official["executed_steps"] == 60
    assert (official["low"]["unet_forward"], official["high"]["unet_forward"]) == (840, 866)
    assert official["low"]["unet_backward"] == 1200 and official["vae_decode"] == 170


def test_diffusion_cost_quick_run_counts_and_docs_block(diffusion_cost, tmp_path, capsys) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{diffusion_cost.DOCS_BEGIN}\nold\n{diffusion_cost.DOCS_END}\nafter\n")
    out = tmp_path / "cost.json"
    assert diffusion_cost.main(["--quick", "--repeats", "1", "--json", str(out), "--update-docs", str(doc)]) == 0
    measured = json.loads(out.read_text())
    assert measured["meta"]["quick"] and set(measured["tasks"]) == set(diffusion_cost.TASKS)
    for task in measured["tasks"].values():
        assert "error" not in task and task["parameters"] > 0
    guided = measured["tasks"]["unet"]["guided"]
    assert guided["seconds"] > 0 and (guided["peak_mib"] is None or guided["peak_mib"] > 0)
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == {"`inpainting`", "`anomalyany`", "`xfusion`", "`anomalycontrol`"}
    counts = diffusion_cost.synthesizer_counts()
    assert counts["anomalyany"]["unet_forward"] == 600 and counts["anomalyany"]["unet_backward"] == 500
    assert "| 600 | 500 |" in rows["`anomalyany`"] and "official AnomalyAny loop" in text
    # re-counting from stored measurements, without measuring again
    capsys.readouterr()
    assert diffusion_cost.main(["--from-json", str(out)]) == 0
    assert "| `anomalyany` |" in capsys.readouterr().out


def test_diffusion_cost_isolates_components_in_subprocesses(diffusion_cost) -> None:
    import argparse

    args = argparse.Namespace(quick=True, device="cpu", dtype="float32", repeats=1)
    result = diffusion_cost.run_in_subprocess("text", args)
    assert "error" not in result and result["fwd"]["seconds"] > 0 and result["parameters"] > 0
