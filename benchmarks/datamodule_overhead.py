"""Overhead of SyntheticAnomalyDataModule, measured in one run (issue 3 targets).

    python benchmarks/datamodule_overhead.py [--images 64] [--size 256] [--batch 16] [--epochs 3]
                                             [--synthesizer perlin] [--data-root ROOT/category] [--quick]

1. A training epoch with online synthesis vs the same epoch without it (target <= 1.15x).
2. An epoch served from the cache vs the same images served by a plain ``Folder`` datamodule (target <= 1.2x).

The consumer is a deliberately small convolutional segmentation model trained on (image, mask) through a Lightning
``Trainer``, so data handling is a large share of the epoch and the ratios are conservative (a real detector makes
them smaller). Epoch times are medians over ``--epochs`` after one warm-up epoch. Without ``--data-root`` the normal
images are crops of scikit-image's photos written to a temporary folder; with it, ``ROOT/category/train/good`` is used.
``--quick`` is a smoke run (8 images at 64 px, one timed epoch; the ratios mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image
from torch import nn

from anomalib_synth.data import SyntheticAnomalyDataModule
from anomalib_synth.io import builtin_photo, list_images, resize, to_uint8


class TinySegmenter(LightningModule):
    """A few convolutions predicting the mask: the cheapest realistic consumer of (image, mask) batches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        target = batch.gt_mask.float().unsqueeze(1) if batch.gt_mask is not None else torch.zeros_like(batch.image[:, :1])
        return nn.functional.binary_cross_entropy_with_logits(self.net(batch.image), target)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.01)


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.times.append(time.perf_counter() - self.start)


def epoch_time(datamodule, epochs: int) -> float:
    timer = EpochTimer()
    trainer = Trainer(max_epochs=epochs + 1, accelerator="auto", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                      limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(TinySegmenter(), datamodule=datamodule)
    return statistics.median(timer.times[1:])


def write_normals(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photos = [resize(builtin_photo(n), (2 * size, 2 * size)) for n in ("brick", "grass", "gravel", "coffee")]
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        top, left = torch.randint(0, size, (2,), generator=generator).tolist()
        crop = photos[i % len(photos)][:, top : top + size, left : left + size]
        Image.fromarray(to_uint8(crop)).save(folder / f"{i:03d}.png")
    return folder


def folder(root: Path, normal: str, batch: int, size: int, **kwargs):
    from anomalib.data import Folder
    from torchvision.transforms.v2 import Resize

    return Folder(name="bench", root=root, normal_dir=normal, train_batch_size=batch, eval_batch_size=batch,
                  num_workers=0, augmentations=Resize((size, size)), val_split_mode="none", **kwargs)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--synthesizer", default="perlin")
    parser.add_argument("--data-root", default=None, help="an MVTec category folder (uses train/good)")
    parser.add_argument("--quick", action="store_true", help="8 images at 64 px, batch 4, one epoch: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.batch, args.epochs = 8, 64, 4, 1

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data_root:
            root, normal = Path(args.data_root), "train/good"
            list_images(root / normal)
        else:
            root, normal = tmp, "good"
            write_normals(tmp / normal, args.images, args.size)

        plain = epoch_time(folder(root, normal, args.batch, args.size), args.epochs)
        online = epoch_time(
            SyntheticAnomalyDataModule(folder(root, normal, args.batch, args.size), args.synthesizer,
                                       anomaly_ratio=0.5, synthetic_val=False, cache_dir=str(tmp / "c")),
            args.epochs,
        )  # fmt: skip
        cached_dm = SyntheticAnomalyDataModule(folder(root, normal, args.batch, args.size), args.synthesizer,
                                               mode="cache", synthetic_val=False, cache_dir=str(tmp / "cache"),
                                               image_size=(args.size, args.size))  # fmt: skip
        cached = epoch_time(cached_dm, args.epochs)
        entry = next(p for p in (tmp / "cache").iterdir() if p.is_dir())
        name = cached_dm.synthesizer.name
        same_images = folder(root, normal, args.batch, args.size, abnormal_dir=str(entry / "test" / name),
                             mask_dir=str(entry / "ground_truth" / name), test_split_mode="none")  # fmt: skip
        same_images.setup()
        # a plain Folder serving the very images of the cache (its abnormal images moved into training)
        same_images.train_data = same_images.train_data + same_images.test_data
        same_images.setup = lambda stage=None: None  # keep that training set
        reference = epoch_time(same_images, args.epochs)

    n = len(cached_dm.train_data)
    print(f"{args.images if not args.data_root else 'real'} normal images at {args.size}px, batch {args.batch}, "
          f"synthesizer {args.synthesizer}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'epoch':<44}{'seconds':>9}{'ratio':>8}{'target':>8}  ok")
    rows = [
        ("plain Folder (normal images)", plain, None, None),
        ("same + online synthesis (anomaly_ratio 0.5)", online, online / plain, 1.15),
        (f"plain Folder serving the cached images ({n})", reference, None, None),
        ("served from the cache", cached, cached / reference, 1.2),
    ]
    for label, seconds, ratio, target in rows:
        extra = "" if ratio is None else f"{ratio:>8.2f}"
        if ratio is not None and not args.quick:
            extra += f"{target:>8.2f}  {'yes' if ratio <= target else 'NO'}"
        print(f"{label:<44}{seconds:>9.3f}{extra}")


if __name__ == "__main__":
    main()
