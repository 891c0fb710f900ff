"""The package's layers: every import points down (no cycles between units, no low layer reaching up)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "anomalib_synth"

LAYERS = {
    "errors": 0,
    "io": 1, "seeding": 1, "testing": 1, "views": 1,
    "synthesizers": 2,
    "transforms": 3, "writer": 3, "albumentations": 3, "metrics": 3, "backbones": 3,
    "synthesis": 4, "training": 4,
    "generate": 5, "data": 5, "models": 5,
    "evaluation": 6, "scoring": 6, "toydata": 6, "docs_pages": 6,
    "demo": 7,
    "explore": 8,
    "cli": 9,
}  # fmt: skip
"""Units of the package (first-level modules and subpackages), from the bottom up."""

DEPRECATED_ALIASES = {"anomalib_synth.data.captions", "anomalib_synth.synthesizers.diffusion.tiny"}
"""Modules kept only to re-export a moved API with a deprecation warning."""


def _imports(path: Path) -> list[str]:
    """Absolute names of the ``anomalib_synth`` modules that ``path`` imports (at any depth of the file)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "anomalib_synth":  # from anomalib_synth import metrics
                found += [f"anomalib_synth.{alias.name}" for alias in node.names]
            else:
                found.append(target)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("anomalib_synth.")]


def _unit(module: str) -> str:
    return module.split(".")[1]


def test_every_unit_has_a_layer() -> None:
    units = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in PACKAGE.glob("*/__init__.py")
    }
    assert units == set(LAYERS), f"add new modules to LAYERS: {sorted(units ^ set(LAYERS))}"


def test_imports_point_down() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == "anomalib_synth" or module in DEPRECATED_ALIASES:
            continue
        here = _unit(module)
        for target in _imports(path):
            there = _unit(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{module} imports {target} ({here}: layer {LAYERS[here]}, {there}: {LAYERS[there]})")
    assert not upward, "\n".join(sorted(upward))


@pytest.mark.parametrize("alias", sorted(DEPRECATED_ALIASES))
def test_deprecated_aliases_warn_and_reexport(alias: str) -> None:
    sys.modules.pop(alias, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(alias)
    target = importlib.import_module(module.__doc__.split(":mod:`", 1)[1].split("`", 1)[0])
    assert module.__all__ and all(getattr(module, name) is getattr(target, name) for name in module.__all__)
