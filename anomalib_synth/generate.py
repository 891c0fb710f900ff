"""Generate a synthetic anomaly set on disk from a folder of normal images (the ``anomalib-synth generate`` command)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .io import SKIP, load_source
from .synthesis import batch_seed, synthesize_to_folder
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


__all__ = ["GenerationRecords", "batch_seed", "generate", "resolve_device", "synthesize_to_folder"]
