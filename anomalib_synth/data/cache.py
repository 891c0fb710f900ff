"""Synthetic samples on disk, keyed by a hash of everything that determines them, built once and reused.

A cache entry is an MVTec-style folder (:mod:`anomalib_synth.writer`) at ``cache_dir/<hash>/``. The hash covers
the synthesizer (name and config), the source image files, the number of variants, the seed and the image size,
so a changed setting gives a new folder and an unchanged one reuses the old. Building is resumable (atomic files,
per-sample manifest lines) and shards across processes: with ``torch.distributed`` initialised, rank ``r`` makes
batches ``k % world_size == r``, all ranks meet at a barrier, rank 0 merges the manifest, and all meet again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from ..io import read_image, resize, write_png
from ..synthesis import synthesize_to_folder
from ..synthesizers import Synthesizer
from ..writer import MVTecWriter

COMPLETE = "COMPLETE"


def cache_key(
    synth: Synthesizer, sources: Sequence[str], variants: int, seed: int, size: Sequence[int], batch_size: int = 16
) -> str:
    """Hex digest (16 chars) of what determines a cache entry (batches share seeds and donors, so their size too)."""
    payload = {
        "batch_size": batch_size,
        "synthesizer": synth.name,
        "config": synth.config(),
        "sources": [str(Path(s).resolve()) for s in sources],
        "variants": variants,
        "seed": seed,
        "size": list(size),
        "format": 2,  # 2: seeds from anomalib_synth.seeding
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def build_cache(
    synth: Synthesizer,
    sources: Sequence[str],
    cache_dir: str | Path,
    variants: int = 1,
    seed: int = 0,
    size: Sequence[int] = (256, 256),
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[Path, list[dict[str, Any]]]:
    """Build (or reuse, or finish) the cache entry for ``variants`` anomalies of each source image.

    Sample ``i`` comes from ``sources[i // variants]``. Returns the entry's folder and its manifest records.
    """
    if not sources:
        msg = "no source images to synthesize from"
        raise ValueError(msg)
    root = Path(cache_dir) / cache_key(synth, sources, variants, seed, size, batch_size)
    rank, world = _rank_world()
    digits = max(3, len(str(len(sources) * variants - 1)))
    writer = MVTecWriter(root, synth.name or "synthetic", digits=digits, shard=rank if world > 1 else None)
    if (root / COMPLETE).is_file():
        records = [r for _, r in sorted(writer.completed().items())]
        if len(records) == len(sources) * variants:
            return root, records
    if rank == 0:
        writer.remove_stale_temporaries()  # left by a killed build; before any rank starts writing
    _barrier()
    synth = synth.to(device)
    synthesize_to_folder(
        synth,
        writer,
        lambda ids: torch.stack([resize(read_image(sources[i]), size) for i in ids]),
        list(sources),
        source_of=lambda i: i // variants,
        num=len(sources) * variants,
        seed=seed,
        batch_size=batch_size,
        device=torch.device(device),
        progress=progress and rank == 0,
        rank=rank,
        world_size=world,
    )
    _barrier()
    if rank == 0:
        records = writer.finalize()
        (root / COMPLETE).write_text(f"{len(records)}\n")
    _barrier()
    return root, [r for _, r in sorted(writer.completed().items())]


def build_views(
    sources: Sequence[str], cache_dir: str | Path, count: int, seed: int, size: Sequence[int]
) -> list[Path]:
    """Write (or reuse) ``count`` augmented views of the ``sources`` images (:mod:`anomalib_synth.views`) as PNG
    files under ``cache_dir/views-<hash>/``: the normal images of a strict k-shot validation split."""
    from ..seeding import generator_for
    from ..views import augmented_views

    payload = {"sources": [str(Path(s).resolve()) for s in sources], "count": count, "seed": seed, "size": list(size)}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) / f"views-{key}"
    paths = [root / f"{i:03d}.png" for i in range(count)]
    if (root / COMPLETE).is_file() and all(p.is_file() for p in paths):
        return paths
    images = torch.stack([resize(read_image(s), size) for s in sources])
    views, _ = augmented_views(images, count, generator_for(seed, "val", 1))
    for path, view in zip(paths, views, strict=True):
        write_png(path, view)  # atomic
    (root / COMPLETE).write_text(f"{count}\n")
    return paths


def records_to_samples(root: Path, records: Sequence[dict[str, Any]], split: str) -> pd.DataFrame:
    """anomalib sample rows (``image_path``, ``label``, ``label_index``, ``mask_path``, ``split``) of a cache entry."""
    rows = [
        {
            "image_path": str(root / r["image"]),
            "label": "abnormal" if r["label"] else "normal",
            "label_index": int(bool(r["label"])),
            "mask_path": str(root / r["mask"]) if r["mask"] else "",
            "split": split,
        }
        for r in records
    ]
    return pd.DataFrame(rows, columns=["image_path", "label", "label_index", "mask_path", "split"])
