"""Batch generation of a synthetic anomaly set on disk (the ``anomalib-synth generate`` command)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .io import load_source
from .synthesizers import Synthesizer, get
from .writer import MVTecWriter


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of batch ``batch_index``: independent of which batches were already done, so resumed runs match."""
    return (int(seed) * 1_000_003 + batch_index) % (2**63 - 1)


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def generate(
    source: str,
    output: str | Path,
    synthesizer: Synthesizer | str,
    num: int = 16,
    seed: int = 0,
    size: Sequence[int] | None = (256, 256),
    device: str | None = None,
    batch_size: int = 16,
    name: str | None = None,
    progress: bool = True,
    channels: int = 3,
    **synthesizer_kwargs: Any,
) -> list[dict[str, Any]]:
    """Synthesize ``num`` anomalies from the normal images of ``source`` into an MVTec-style folder ``output``.

    Source images are used in turn (sample ``i`` comes from image ``i % N``); batch ``k`` draws its randomness from
    a generator seeded with :func:`batch_seed`, so the same settings give identical files, and rerunning an
    interrupted call regenerates only the missing samples.

    Args:
        source (str): a folder of normal images, or ``builtin:<name>[,<name>...]`` (scikit-image photos).
        output (str | Path): output folder (see :mod:`anomalib_synth.writer` for its layout).
        synthesizer (Synthesizer | str): a synthesizer or a registry name.
        num (int, optional): number of samples. Defaults to ``16``.
        seed (int, optional): base seed. Defaults to ``0``.
        size (Sequence[int] | None, optional): ``(H, W)`` the images are resized to. Defaults to ``(256, 256)``.
        device (str | None, optional): torch device; ``None`` picks CUDA when available. Defaults to ``None``.
        batch_size (int, optional): images synthesized per call. Defaults to ``16``.
        name (str | None, optional): defect folder name. Defaults to the synthesizer's short name.
        progress (bool, optional): show a progress bar. Defaults to ``True``.
        channels (int, optional): 3 (RGB) or 1 (grayscale). Defaults to ``3``.
        **synthesizer_kwargs: constructor arguments when ``synthesizer`` is a name.

    Returns:
        list[dict]: the manifest records, sorted by index.

    Raises:
        ValueError: for a missing or empty source, bad arguments, or an output folder holding a different run.
    """
    if num < 1 or batch_size < 1:
        msg = f"num and batch_size must be positive, got num={num}, batch_size={batch_size}"
        raise ValueError(msg)
    synth = get(synthesizer, **synthesizer_kwargs) if isinstance(synthesizer, str) else synthesizer
    dev = resolve_device(device)
    synth = synth.to(dev)
    images, sources = load_source(source, size, channels)
    label = name or synth.name or type(synth).__name__.lower()
    writer = MVTecWriter(output, label, digits=max(3, len(str(num - 1))))
    settings = {
        "source": source,
        "sources": sources,
        "synthesizer": synth.name,
        "config": synth.config(),
        "num": num,
        "seed": seed,
        "size": list(size) if size else None,
        "batch_size": batch_size,
        "channels": channels,
    }
    writer.check_run(settings)
    done = writer.completed()
    n_batches = math.ceil(num / batch_size)
    with tqdm(total=num, initial=len(done), desc=f"generate {label}", unit="img", disable=not progress) as bar:
        for batch_index in range(n_batches):
            ids = [i for i in range(batch_index * batch_size, min(num, (batch_index + 1) * batch_size))]
            if all(i in done for i in ids):
                continue
            index = torch.tensor([i % len(images) for i in ids])
            generator = torch.Generator().manual_seed(batch_seed(seed, batch_index))
            result = synth(images[index].to(dev), generator=generator)
            for j, i in enumerate(ids):
                if i in done:
                    continue
                record = {
                    "source": sources[int(index[j])],
                    "synthesizer": synth.name,
                    "seed": seed,
                    "batch": batch_index,
                    "params": result.params[j],
                }
                done[i] = writer.write(i, result.images[j], result.masks[j], bool(result.labels[j]), record)
                bar.update(1)
    return writer.finalize()
