"""Batch generation of a synthetic anomaly set on disk (the ``anomalib-synth generate`` command)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .io import SKIP, load_source
from .synthesizers import Synthesizer, get
from .writer import MVTecWriter


class GenerationRecords(list):
    """The manifest records of a generated folder (a ``list``), with what this call did.

    Attributes:
        written (int): samples written by this call (``0`` when a rerun found everything done).
        skipped (list[tuple[str, str]]): ``(file, reason)`` of each unreadable source file that was skipped.
    """

    def __init__(self, records: list[dict[str, Any]], written: int, skipped: list[tuple[str, str]]) -> None:
        super().__init__(records)
        self.written = written
        self.skipped = skipped


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
    on_error: str = SKIP,
    **synthesizer_kwargs: Any,
) -> GenerationRecords:
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
        on_error (str, optional): ``"skip"`` unreadable source files with a warning, or ``"raise"``
            :class:`~anomalib_synth.io.ImageReadError`. Defaults to ``"skip"``.
        **synthesizer_kwargs: constructor arguments when ``synthesizer`` is a name.

    Returns:
        GenerationRecords: the manifest records, sorted by index (a list), with ``written`` and ``skipped``.

    Raises:
        ValueError: for a missing or empty source, bad arguments, or an output folder holding a different run.
    """
    if num < 1 or batch_size < 1:
        msg = f"num and batch_size must be positive, got num={num}, batch_size={batch_size}"
        raise ValueError(msg)
    synth = get(synthesizer, **synthesizer_kwargs) if isinstance(synthesizer, str) else synthesizer
    dev = resolve_device(device)
    synth = synth.to(dev)
    images, sources, skipped = load_source(source, size, channels, on_error)
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
    writer.remove_stale_temporaries()
    written = synthesize_to_folder(
        synth,
        writer,
        lambda ids: images[ids],
        sources,
        source_of=lambda i: i % len(images),
        num=num,
        seed=seed,
        batch_size=batch_size,
        device=dev,
        progress=progress,
    )
    return GenerationRecords(writer.finalize(), written, [(str(p), reason) for p, reason in skipped])


def synthesize_to_folder(
    synth: Synthesizer,
    writer: MVTecWriter,
    load: Callable[[list[int]], torch.Tensor],
    sources: Sequence[str],
    source_of: Callable[[int], int],
    num: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Write samples ``0 .. num-1`` that ``writer`` does not have yet; sample ``i`` comes from source ``source_of(i)``.

    The samples are cut into fixed batches of ``batch_size``; batch ``k`` is seeded with :func:`batch_seed` and done
    by process ``k % world_size``, so the files do not depend on how many processes wrote them or on what was
    already written. ``load(ids)`` returns the source images ``[len(ids), C, H, W]``. Returns how many were written.
    """
    done = writer.completed()
    batches = [k for k in range(math.ceil(num / batch_size)) if k % world_size == rank]
    total = sum(min(batch_size, num - k * batch_size) for k in batches)
    initial = sum(1 for k in batches for i in range(k * batch_size, min(num, (k + 1) * batch_size)) if i in done)
    written = 0
    desc = f"synthesize {writer.name}" + (f" [rank {rank}]" if world_size > 1 else "")
    with tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not progress) as bar:
        for batch_index in batches:
            ids = list(range(batch_index * batch_size, min(num, (batch_index + 1) * batch_size)))
            if all(i in done for i in ids):
                continue
            source_ids = [source_of(i) for i in ids]
            generator = torch.Generator().manual_seed(batch_seed(seed, batch_index))
            result = synth(load(source_ids).to(device), generator=generator)
            areas = result.masks.flatten(1).mean(1).tolist()  # what the written masks cover, one host transfer
            for j, i in enumerate(ids):
                if i in done:
                    continue
                record = {
                    "source": sources[source_ids[j]],
                    "synthesizer": synth.name,
                    "seed": seed,
                    "batch": batch_index,
                    "mask_area": round(areas[j], 6),
                    "params": result.params[j],
                }
                done[i] = writer.write(i, result.images[j], result.masks[j], bool(result.labels[j]), record)
                written += 1
                bar.update(1)
    return written
