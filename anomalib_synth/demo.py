"""The demo: every classical synthesizer on scikit-image's shipped photos, with a gallery and a metrics table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from . import metrics
from .generate import batch_seed, generate
from .io import BUILTIN_PREFIX, atomic_path, load_source, to_uint8
from .synthesizers import get, names

DEMO_PHOTOS = ("brick", "grass", "gravel", "coffee")


def overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image`` ``[3, H, W]`` with the mask tinted red and its outline drawn."""
    m = mask.float()
    edge = (F.max_pool2d(m[None], 3, 1, 1)[0] - m).clamp(0, 1)
    red = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)
    out = image * (1 - 0.35 * m) + red * 0.35 * m
    return out * (1 - edge) + red * edge


def make_gallery(rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], thumb: int = 128) -> Image.Image:
    """One row per synthesizer: for each photo, input | synthesized | mask overlay."""
    tiles = []
    for inputs, outputs, masks in rows.values():
        for x, y, m in zip(inputs, outputs, masks, strict=True):
            tiles += [x, y, overlay(y, m)]
    tiles = [F.interpolate(t[None], size=(thumb, thumb), mode="bilinear", antialias=True)[0] for t in tiles]
    per_row = len(tiles) // len(rows)
    grid = make_grid(torch.stack(tiles).clamp(0, 1), nrow=per_row, padding=2, pad_value=1.0)
    picture = Image.fromarray(to_uint8(grid))
    draw = ImageDraw.Draw(picture)
    for r, name in enumerate(rows):
        y = 2 + r * (thumb + 2)
        draw.rectangle((2, y, 2 + 8 * len(name) + 6, y + 14), fill=(0, 0, 0))
        draw.text((5, y + 2), name, fill=(255, 255, 255))
    return picture


def run_demo(
    output: str | Path = "anomalib_synth_demo",
    gallery: str | Path | None = None,
    synthesizers: Sequence[str] | None = None,
    photos: Sequence[str] = DEMO_PHOTOS,
    per_photo: int = 2,
    size: int = 256,
    seed: int = 0,
    device: str | None = "cpu",
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Run each synthesizer (default: every classical one) on the builtin photos; write MVTec-style folders, a
    gallery and return the metrics.

    Each synthesizer gets ``output/<name>/`` (see :mod:`anomalib_synth.writer`). The gallery goes to ``gallery``
    (default ``output/gallery.png``; the extension picks the format).
    """
    output = Path(output)
    source = BUILTIN_PREFIX + ",".join(photos)
    images = load_source(source, (size, size)).images
    num = len(photos) * per_photo
    table: dict[str, dict[str, float]] = {}
    rows = {}
    for name in synthesizers or names(kind="classical"):
        generate(source, output / name, name, num=num, seed=seed, size=(size, size), batch_size=num,
                 device=device, progress=progress)  # fmt: skip
        # the same single batch and seed as the files, kept in memory for the figures
        batch = images[torch.arange(num) % len(photos)]
        result = get(name)(batch, generator=torch.Generator().manual_seed(batch_seed(seed, 0)))
        table[name] = metrics.summarize(result, batch)
        rows[name] = (batch[: len(photos)], result.images[: len(photos)], result.masks[: len(photos)])
    picture = make_gallery(rows)
    gallery_path = Path(gallery) if gallery else output / "gallery.png"
    with atomic_path(gallery_path) as tmp:
        picture.save(tmp, format=Image.registered_extensions().get(gallery_path.suffix.lower(), "PNG"), quality=85)
    table["_gallery"] = {"path": str(gallery_path)}  # type: ignore[dict-item]
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A plain-text table of :func:`run_demo`'s metrics."""
    width = max([len("synthesizer")] + [len(name) for name in table if not name.startswith("_")])
    header = (
        f"{'synthesizer':<{width}} {'anomalous':>9} {'mask area':>9} {'bg PSNR':>8} {'visibility':>10} {'mask IoU':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, row in table.items():
        if name.startswith("_"):
            continue
        psnr = "inf" if row["background_psnr"] == float("inf") else f"{row['background_psnr']:.1f}"
        lines.append(
            f"{name:<{width}} {row['anomalous']:>9.2f} {row['mask_area']:>9.3f} {psnr:>8} "
            f"{row['visibility']:>10.3f} {row['mask_iou']:>8.3f}"
        )
    return "\n".join(lines)
