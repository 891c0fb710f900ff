"""Checking the files of an anomalib dataset before its loaders meet them (shared by the datamodule wrapper and the
``SynthesizerSwap`` callback, which meets plain anomalib datamodules)."""

from __future__ import annotations

import logging
from typing import Any

from ..io import RAISE, ImageReadError, UnsupportedImageError, probe_image

logger = logging.getLogger(__name__)

__all__ = ["drop_unreadable"]


def drop_unreadable(dataset: Any, split: str, on_bad_file: str = "skip") -> list[str]:
    """Check every image and mask file of ``dataset`` (an anomalib dataset: headers and PNG checksums only) and
    drop the samples whose files cannot be read, with a warning naming each; returns the skipped files.

    Raises:
        ImageReadError: for an unreadable file when ``on_bad_file="raise"``.
        UnsupportedImageError: for files anomalib's own reader would read wrongly (16-bit grayscale), always.
    """
    samples = dataset.samples
    masks = samples["mask_path"] if "mask_path" in samples else [""] * len(samples)
    bad, skipped = [], []
    for row, (image, mask) in enumerate(zip(samples.image_path, masks, strict=True)):
        for path in (image, mask):
            if not isinstance(path, str) or not path:
                continue
            try:
                probe_image(path)
            except UnsupportedImageError:
                raise
            except ImageReadError as err:
                if on_bad_file == RAISE:
                    raise
                logger.warning("%s set: skipping %s", split, err)
                skipped.append(str(path))
                bad.append(row)
                break
    if bad:
        kept = samples.drop(index=samples.index[bad]).reset_index(drop=True)
        kept.attrs.update(samples.attrs)
        dataset.samples = kept
        logger.warning("%s set: skipped %d unreadable file(s); %d samples remain", split, len(bad), len(kept))
    return skipped
