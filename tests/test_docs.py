"""The per-synthesizer pages under docs/synthesizers are generated from the code: they must be up to date."""

from __future__ import annotations

from pathlib import Path

from anomalib_synth.docs_pages import write_pages

DOCS = Path(__file__).parents[1] / "docs" / "synthesizers"


def test_synthesizer_pages_are_up_to_date(tmp_path) -> None:
    for fresh in write_pages(tmp_path):
        committed = DOCS / fresh.name
        assert committed.is_file(), f"missing {committed}: run python -m anomalib_synth.docs_pages docs/synthesizers"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: regenerate it"


def test_notebooks_are_committed_without_outputs() -> None:
    import json

    notebooks = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
    assert [p.stem[:2] for p in notebooks] == ["01", "02", "03", "04"]
    for path in notebooks:
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), f"{path.name}: strip"
