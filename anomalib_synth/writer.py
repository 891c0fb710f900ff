"""Write synthesized samples as an MVTec-style folder with a ``manifest.jsonl``, atomically and resumably.

Layout under ``root``::

    test/<name>/000.png                anomalous images
    ground_truth/<name>/000_mask.png   their masks (0/255)
    test/good/000.png                  samples the synthesizer left normal (e.g. an empty foreground)
    manifest.jsonl                     one JSON line per sample (per-process shards while several processes write)
    run.json                           the generation settings; a resumed run must match them

Every file is written to a temporary name and renamed into place, and a sample's manifest line is appended only
after both of its files exist, so an interrupted run leaves no half-written sample behind: rerunning it regenerates
exactly the missing ones. :meth:`MVTecWriter.completed` ignores manifest lines that are truncated or point at
missing or unreadable files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from .errors import RunMismatchError
from .io import write_png, write_text

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"


class MVTecWriter:
    """Writer of one synthesized defect class ``name`` under ``root``.

    Args:
        root (str | Path): output folder.
        name (str): defect folder name (usually the synthesizer's short name).
        digits (int, optional): zero padding of file numbers. Defaults to ``3``.
    """

    def __init__(self, root: str | Path, name: str, digits: int = 3, shard: int | None = None) -> None:
        self.root = Path(root)
        self.name = name
        self.digits = digits
        self.manifest = self.root / MANIFEST
        # with several processes each appends to its own shard; finalize() merges them
        self.shard_manifest = self.manifest if shard is None else self.root / f"manifest.rank{shard}.jsonl"

    def image_path(self, index: int, label: bool) -> str:
        folder = self.name if label else "good"
        return f"test/{folder}/{index:0{self.digits}d}.png"

    def mask_path(self, index: int) -> str:
        return f"ground_truth/{self.name}/{index:0{self.digits}d}_mask.png"

    def check_run(self, settings: dict[str, Any]) -> None:
        """Record ``settings`` in ``run.json``, or check that an existing run used the same ones."""
        path = self.root / RUN_FILE
        if path.is_file():
            previous = json.loads(path.read_text(encoding="utf-8"))
            if previous != settings:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                msg = (
                    f"{str(self.root)!r} holds a run with different settings ({', '.join(changed)}); "
                    "use another output folder or delete this one"
                )
                raise RunMismatchError(msg)
            return
        write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a killed run (``.<name>.<random>.tmp.png``); returns how many.

        Call it before writing, from one process only: it would also remove another live writer's files in flight.
        """
        removed = 0
        for path in self.root.rglob(".*.tmp*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def completed(self) -> dict[int, dict[str, Any]]:
        """Records of samples whose manifest line is valid and whose files exist and can be read."""
        lines = []
        for path in [self.manifest, *sorted(self.root.glob("manifest.rank*.jsonl"))]:
            if path.is_file():
                lines += path.read_text(encoding="utf-8").splitlines()
        records: dict[int, dict[str, Any]] = {}
        for line in lines:
            try:
                record = json.loads(line)
                index = int(record["index"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interruption
            if self._files_ok(record):
                records[index] = record
        return records

    def _files_ok(self, record: dict[str, Any]) -> bool:
        for key in ("image", "mask"):
            rel = record.get(key)
            if rel is None:
                continue
            path = self.root / rel
            try:
                with Image.open(path) as img:
                    img.verify()
            except (OSError, SyntaxError, ValueError):
                return False
        return True

    def write(self, index: int, image: Tensor, mask: Tensor, label: bool, record: dict[str, Any]) -> dict[str, Any]:
        """Write one sample (``image`` ``[C, H, W]``, ``mask`` ``[1, H, W]``) and append its manifest line."""
        image_rel = self.image_path(index, label)
        mask_rel = self.mask_path(index) if label else None
        write_png(self.root / image_rel, image)
        if mask_rel is not None:
            write_png(self.root / mask_rel, mask)
        full = {"index": index, "image": image_rel, "mask": mask_rel, "label": bool(label), **record}
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        prefix = ""
        if self.shard_manifest.is_file() and self.shard_manifest.stat().st_size:
            with self.shard_manifest.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                prefix = "" if f.read(1) == b"\n" else "\n"  # a line cut short by an interruption stays separate
        with self.shard_manifest.open("a", encoding="utf-8") as f:
            f.write(prefix + json.dumps(full, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return full

    def finalize(self) -> list[dict[str, Any]]:
        """Rewrite the manifest atomically: one line per completed sample, sorted by index."""
        records = [record for _, record in sorted(self.completed().items())]
        write_text(self.manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        for shard in self.root.glob("manifest.rank*.jsonl"):
            shard.unlink(missing_ok=True)
        return records
