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

COST = {
    "perlin": "No network. One batched pass: two matmuls for the noise at up to 128 px, then work on the masked "
    "pixels only. About 10x anomalib's generator in images per second (`benchmarks/classical_throughput.py`).",
    "cutpaste": "No network. One packed `grid_sample` over the masked pixels of the whole batch.",
    "scar": "No network. As `cutpaste`, with thin patches.",
    "nsa": "No network. A batched coarse-to-fine membrane (Poisson) solve in a window around each patch.",
    "anomalib-perlin": "No network. anomalib's per-image loop (the baseline of the speed ratios).",
    "inpainting": "`2 x num_inference_steps x strength` UNet evaluations per image (classifier-free guidance), "
    "plus one VAE encode and decode. SD 1.5 at 512 px in fp16 needs about 4 GB of GPU memory.",
    "anomalyany": "`2 n + I g` UNet forwards and `I g` backwards per image (`n = int(N gamma)` executed steps, "
    "`I` inner iterations, `g` guided steps, all `n` by default), plus a VAE decode and a CLIP image pass, forward "
    "and backward, per refinement iteration. Reported in `params`. Defaults: 600 forwards, 500 backwards and 140 "
    "decoder passes; the official loop runs about 850 forwards and 1200 backwards. Measured at 512 px in "
    "docs/diffusion.md (Cost at full size): about 0.7 of the official loop's time, which reports 1-2 min per image "
    "and about 30 GB on an A100.",
    "xfusion": "`2 x num_inference_steps x strength` UNet evaluations per image (classifier-free guidance, on by "
    "default; half that with `guidance_scale=1`), plus one CLIP image pass per reference (cached per synthesizer). "
    "Training updates only the adapter (MIF + DDF [+ LoRA]).",
    "anomalycontrol": "`2 x num_inference_steps x strength` UNet evaluations per image, plus, per reference (cached "
    "per synthesizer; in training, per image), one BLIP-2 vision pass and `asea_steps` Q-Former forward/backward "
    "passes (ASEA never backpropagates through the ViT-g).",
}


def _defaults(cls: type) -> str:
    rows = ["| argument | default |", "|---|---|"]
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "kwargs") or parameter.kind is parameter.VAR_KEYWORD:
            continue
        default = "required" if parameter.default is parameter.empty else f"`{parameter.default!r}`"
        rows.append(f"| `{name}` | {default} |")
    return "\n".join(rows)


def page(name: str) -> str:
    """The markdown page of the synthesizer registered as ``name``."""
    cls = get_class(name)
    module = importlib.import_module(cls.__module__)
    parts = [
        f"# `{name}`: {cls.description}",
        "",
        f"*Generated from `{cls.__module__}` by `python -m anomalib_synth.docs_pages docs/synthesizers`; edit the "
        "docstrings, not this page.*",
        "",
        "## What it does, and where it departs from the paper",
        "",
        inspect.cleandoc(module.__doc__ or ""),
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
        COST.get(name, "See the module docstring."),
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
