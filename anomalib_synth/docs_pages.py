"""Generate one documentation page per synthesizer from its code (``docs/synthesizers/<name>.md``).

A page is made of the module docstring (what the method does, the paper's equations, where we depart and why), the
class docstring (parameters), the constructor's defaults, and the compute cost below. Generating them keeps the
pages in step with the code; ``tests/test_docs.py`` fails when a committed page is stale.

    python -m anomalib_synth.docs_pages docs/synthesizers
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

from .io import write_text
from .synthesizers import available, get_class


def _defaults(cls: type) -> str:
    rows = ["| argument | default |", "|---|---|"]
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "kwargs") or parameter.kind is parameter.VAR_KEYWORD:
            continue
        default = "required" if parameter.default is parameter.empty else f"`{parameter.default!r}`"
        rows.append(f"| `{name}` | {default} |")
    return "\n".join(rows)


def method_modules(cls: type) -> list[str]:
    """The modules whose docstrings describe the method: the class's own, and, for a method folder laid out as
    anomalib's (``<method>/synthesizer.py``), the folder's package first (the method and its layout)."""
    own = cls.__module__
    return [own.removesuffix(".synthesizer"), own] if own.endswith(".synthesizer") else [own]


def page(name: str) -> str:
    """The markdown page of the synthesizer registered as ``name``."""
    cls = get_class(name)
    modules = [importlib.import_module(m) for m in method_modules(cls)]
    parts = [
        f"# `{name}`: {cls.description}",
        "",
        f"*Generated from {' and '.join(f'`{m.__name__}`' for m in modules)} by `python -m anomalib_synth.docs_pages docs/synthesizers`; edit the "
        "docstrings, not this page.*",
        "",
        "## What it does, and where it departs from the paper",
        "",
        "\n\n".join(inspect.cleandoc(m.__doc__ or "") for m in modules),
        "",
        f"## `{cls.__name__}`",
        "",
        inspect.cleandoc(cls.__doc__ or ""),
        "",
        "## Defaults",
        "",
        _defaults(cls),
        "",
        "## Compute cost",
        "",
        cls.cost or "See the module docstring.",
        "",
    ]
    return "\n".join(parts)


def write_pages(folder: str | Path) -> list[Path]:
    """Write every page (and an index) to ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    index = ["# Synthesizers", "", "| name | what it does |", "|---|---|"]
    for name, description in available().items():
        path = folder / f"{name}.md"
        write_text(path, page(name))
        paths.append(path)
        index.append(f"| [`{name}`]({name}.md) | {description} |")
    write_text(folder / "README.md", "\n".join(index) + "\n")
    return [*paths, folder / "README.md"]


if __name__ == "__main__":
    for written in write_pages(sys.argv[1] if len(sys.argv) > 1 else "docs/synthesizers"):
        print(written)
