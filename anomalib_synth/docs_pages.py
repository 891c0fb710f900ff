"""Generate one documentation page per synthesizer from its code (``docs/synthesizers/<name>.md``).

A page is made of the module docstring (what the method does, the paper's equations, where we depart and why), the
class docstring (parameters), the constructor's defaults, and the compute cost below. Generating them keeps the
pages in step with the code; ``tests/test_docs.py`` fails when a committed page is stale.

    python -m anomalib_synth.docs_pages docs/synthesizers

The before/after galleries of the synthesizers that cut patches from an image (:data:`GALLERY_NAMES`) are made from
real data under ``--galleries DATA_ROOT`` (default set: the Intel hazelnut toy set, CC-BY-4.0, committed as small
JPEGs). MVTec AD is CC BY-NC-SA 4.0 and never committed: make the bottle galleries locally with

    python -m anomalib_synth.docs_pages docs/synthesizers --galleries ../shared/data --sets bottle \
        --images-dir results/galleries
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path

from .io import write_text
from .synthesizers import available, get_class

GALLERY_NAMES = ("cutpaste", "scar", "nsa")
"""Synthesizers whose page shows a before/after gallery: the patch cut from anywhere (``source_foreground=False``)
or from the object (the default)."""
GALLERY_SETS = {"hazelnut_toy": "hazelnut_toy/train/good", "bottle": "mvtec_ad/bottle/train/good"}
"""Gallery sets: folders of normal images under the data root. Only ``hazelnut_toy`` (CC-BY-4.0) is committed."""


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
    if name in GALLERY_NAMES:
        parts += [
            "## Gallery: patches from anywhere, and from the object",
            "",
            f"![{name} on hazelnut](../images/synthesizers/{name}_hazelnut_toy.jpg)",
            "",
            "*Per image: input | patch cut from anywhere (`source_foreground=False`, the behaviour before issue 20) | "
            "patch cut from the object (the default); the mask is outlined in red. Intel hazelnut toy set "
            "(CC-BY-4.0), seed 0, made by `python -m anomalib_synth.docs_pages docs/synthesizers --galleries "
            "../shared/data`. MVTec AD bottle (CC BY-NC-SA 4.0, not committed): add `--sets bottle --images-dir "
            "results/galleries`.*",
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


def write_galleries(
    data_root: str | Path,
    folder: str | Path = "docs/images/synthesizers",
    sets: tuple[str, ...] = ("hazelnut_toy",),
    count: int = 4,
    size: int = 192,
    seed: int = 0,
) -> list[Path]:
    """Write ``<name>_<set>.jpg`` for each of :data:`GALLERY_NAMES` and ``sets``: one row per image, input | patch
    from anywhere | patch from the object, masks outlined in red. Returns the paths."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.utils import make_grid

    from .io import list_images, read_image, resize, to_uint8
    from .synthesizers import get

    def outline(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        edge = (F.max_pool2d(mask[None], 3, 1, 1)[0] - mask).clamp(0, 1)
        return image * (1 - edge) + torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1) * edge

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for set_name in sets:
        files = list_images(Path(data_root) / GALLERY_SETS[set_name])[:count]
        images = torch.stack([resize(read_image(f), (size, size)) for f in files])
        for name in GALLERY_NAMES:
            before = get(name, source_foreground=False)(images, generator=torch.Generator().manual_seed(seed))
            after = get(name)(images, generator=torch.Generator().manual_seed(seed))
            tiles = []
            for i, image in enumerate(images):
                tiles += [image, outline(before.images[i], before.masks[i]), outline(after.images[i], after.masks[i])]
            grid = make_grid(torch.stack(tiles).clamp(0, 1), nrow=3, padding=2, pad_value=1.0)
            path = folder / f"{name}_{set_name}.jpg"
            Image.fromarray(to_uint8(grid)).save(path, quality=85)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthesizer docs pages (and their galleries).")
    parser.add_argument("folder", nargs="?", default="docs/synthesizers")
    parser.add_argument("--galleries", metavar="DATA_ROOT", help="also make the galleries from this data root")
    parser.add_argument("--sets", default="hazelnut_toy", help=f"comma-separated subset of {','.join(GALLERY_SETS)}")
    parser.add_argument("--images-dir", default="docs/images/synthesizers", help="where the galleries go")
    args = parser.parse_args(argv)
    for written in write_pages(args.folder):
        print(written)
    if args.galleries:
        for written in write_galleries(args.galleries, args.images_dir, tuple(args.sets.split(","))):
            print(written)


if __name__ == "__main__":
    main()
