"""The batch synthesis engine: fixed, seeded batches of a synthesizer written by an :class:`~.writer.MVTecWriter`.

Used by ``anomalib-synth generate`` (:mod:`.generate`) and by the datamodule's disk cache (:mod:`.data.cache`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .seeding import derive_seed
from .synthesizers import SynthesisResult, Synthesizer
from .writer import MVTecWriter

__all__ = ["batch_seed", "synthesize_seeded_batch", "synthesize_to_folder"]


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of batch ``batch_index``: independent of which batches were already done, so resumed runs match."""
    return derive_seed(seed, "batch", batch_index)


def synthesize_seeded_batch(
    synth: Synthesizer,
    images: torch.Tensor,
    seed: int,
    batch_index: int,
    device: torch.device | str = "cpu",
    fg_masks: torch.Tensor | None = None,
) -> SynthesisResult:
    """Batch ``batch_index`` of a run with base ``seed``: ``images`` moved to ``device`` and synthesized with a generator
    seeded by :func:`batch_seed` (what :func:`synthesize_to_folder` writes, and what ``anomalib-synth explore``
    shows)."""
    generator = torch.Generator().manual_seed(batch_seed(seed, batch_index))
    masks = None if fg_masks is None else fg_masks.to(device)
    return synth(images.to(device), masks, generator=generator)


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
            result = synthesize_seeded_batch(synth, load(source_ids), seed, batch_index, device)
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
