"""``SyntheticAnomalyDataModule``: wrap any anomalib datamodule and add synthetic, labelled anomalies."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base import AnomalibDataset
from anomalib.data.utils import TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Resize

from ..io import ON_ERROR
from ..seeding import derive_seed, generator_for
from ..synthesizers import Synthesizer, get
from ..transforms import synthesize_batch
from .cache import build_cache, build_views, records_to_samples
from .checks import drop_unreadable

logger = logging.getLogger(__name__)

MODES = ("online", "cache")


def _anomalib_split_names(
    val_split_mode: ValSplitMode | str | None,
    val_split_ratio: float | None,
    test_split_mode: TestSplitMode | str | None,
    synthetic_val: bool | None,
    synthetic_test: bool,
    val_ratio: float,
) -> tuple[bool | None, bool, float]:
    """anomalib's split arguments -> this wrapper's ``synthetic_val``, ``synthetic_test`` and ``val_ratio``."""
    if val_split_mode is not None:
        mode = ValSplitMode(val_split_mode)
        if mode not in (ValSplitMode.SYNTHETIC, ValSplitMode.NONE):
            msg = (
                f"val_split_mode={mode.value!r}: the wrapper makes a 'synthetic' split or 'none'; give other modes "
                "to the wrapped datamodule"
            )
            raise ValueError(msg)
        synthetic_val = mode == ValSplitMode.SYNTHETIC
    if test_split_mode is not None:
        synthetic_test = TestSplitMode(test_split_mode) == TestSplitMode.SYNTHETIC
    return synthetic_val, synthetic_test, val_ratio if val_split_ratio is None else float(val_split_ratio)


def _model_resize(module: AnomalibDataModule) -> tuple[int, int] | None:
    """``(H, W)`` of the model PreProcessor's first ``Resize``, if a trainer with such a model is attached."""
    try:
        transform = module.trainer.model.pre_processor.transform  # type: ignore[union-attr]
    except AttributeError:
        return None
    from anomalib.data.transforms.utils import extract_transforms_by_type

    resizes = extract_transforms_by_type(transform, Resize)
    if not resizes:
        return None
    size = resizes[0].size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


class SyntheticAnomalyDataModule(AnomalibDataModule):
    """Wrap an anomalib datamodule (MVTecAD, Folder, Visa, ...) and add synthetic, labelled anomalies.

    Two modes:

    - ``"online"``: in ``on_after_batch_transfer``, on the training device and for the whole batch, each normal
      training sample becomes anomalous with probability ``anomaly_ratio``; ``gt_mask`` and ``gt_label`` are set,
      real anomalies in the batch are kept. This runs before the model's ``PreProcessor`` (images are in ``[0, 1]``
      at model resolution) and only while training. Every epoch gets new anomalies, reproducible from
      ``seed`` + epoch + batch index + rank. Use it for models that learn from labelled anomalies (SuperSimpleNet,
      UniNet); memory-bank and density models (PatchCore, Padim, ...) would store the synthetic anomalies as normal,
      so give them ``anomaly_ratio=0`` and a synthetic validation split instead.
    - ``"cache"``: ``variants_per_image`` anomalies per training image are synthesized once into
      ``cache_dir/<config hash>/`` (MVTec layout + ``manifest.jsonl``) and served, with the normal images, as the
      training set. Meant for slow (diffusion) synthesizers; resumable and sharded over DDP ranks
      (:mod:`anomalib_synth.data.cache`).

    Synthetic validation/test: when the wrapped datamodule has no anomalous validation images (the usual one-class
    case), or ``synthetic_val=True``, a validation split is made of held-out normal images plus synthetic anomalies
    of them, written to disk so that anomalib's visualizer can reload them. With ``n_shots`` the run is strict
    k-shot: the normal validation images are ``val_views`` augmented views of the shots (:mod:`anomalib_synth.views`,
    written to the cache), and other training images are used only when asked for (``extra_normals``); without
    ``n_shots``, ``val_ratio`` of the normal training images are held out. ``synthetic_test=True`` adds synthetic anomalies of the normal test images to the
    test set; unlike anomalib's ``test_split_mode="synthetic"`` real anomalous test images are never dropped.

    Args:
        datamodule (AnomalibDataModule): the wrapped datamodule.
        synthesizer (Synthesizer | str): a synthesizer or a registry name. Defaults to ``"perlin"``.
        mode (str): ``"online"`` or ``"cache"``. Defaults to ``"online"``.
        anomaly_ratio (float): online: probability that a normal training sample is made anomalous; cache: ignored
            (every cached sample is anomalous; use ``variants_per_image`` for the balance). Defaults to ``0.5``.
        n_shots (int | None): keep only ``k`` normal training images, chosen reproducibly from ``seed``; ``None``
            keeps all. Defaults to ``None``.
        cache_dir (str): where cache and synthetic splits are written. Defaults to
            ``"./datasets/anomalib_synth_cache"``.
        variants_per_image (int): cache mode: anomalies per training image. Defaults to ``1``.
        synthetic_val (bool | None): ``None``: only if the wrapped validation set has no anomalies. Defaults to
            ``None``.
        synthetic_test (bool): add synthetic anomalies to the test set. Defaults to ``False``.
        seed (int): seed of shot selection, splits and synthesis. Defaults to ``0``.
        val_ratio (float): share of normal training images held out for synthetic validation when ``n_shots`` is
            ``None``. Defaults to ``0.2``.
        image_size (tuple[int, int] | None): size of images synthesized to disk; ``None`` uses the model's
            ``Resize`` (or 256). Defaults to ``None``.
        synthesis_batch_size (int): batch size of on-disk synthesis. Defaults to ``16``.
        val_split_mode (ValSplitMode | str | None): anomalib's name for the validation split: ``"synthetic"`` (held-out
            normal images plus synthetic anomalies of them) or ``"none"``; ``None`` decides as ``synthetic_val=None``.
            Defaults to ``None``.
        val_split_ratio (float | None): anomalib's name for ``val_ratio``. Defaults to ``None``.
        test_split_mode (TestSplitMode | str | None): ``"synthetic"`` adds synthetic anomalies of the normal test
            images (real anomalies are kept); ``"from_dir"`` / ``"none"`` keep the wrapped test set. Defaults to
            ``None`` (as ``synthetic_test``).
        extra_normals (int): with ``n_shots``, normal training images beyond the shots held out for validation; ``0``
            is strict k-shot. Defaults to ``0``.
        val_views (int): augmented views of the shots that make the normal validation images when none is held
            out. Defaults to ``8``.
        on_bad_file (str): ``"skip"`` image or mask files that cannot be read (with a warning naming each), or
            ``"raise"``. Files anomalib's reader would misread (16-bit grayscale) always raise. Defaults to
            ``"skip"``.
    """

    def __init__(
        self,
        datamodule: AnomalibDataModule,
        synthesizer: Synthesizer | str = "perlin",
        mode: Literal["online", "cache"] = "online",
        anomaly_ratio: float = 0.5,
        n_shots: int | None = None,
        cache_dir: str = "./datasets/anomalib_synth_cache",
        variants_per_image: int = 1,
        synthetic_val: bool | None = None,
        synthetic_test: bool = False,
        seed: int = 0,
        val_ratio: float = 0.2,
        image_size: tuple[int, int] | None = None,
        synthesis_batch_size: int = 16,
        on_bad_file: Literal["skip", "raise"] = "skip",
        val_split_mode: ValSplitMode | str | None = None,
        val_split_ratio: float | None = None,
        test_split_mode: TestSplitMode | str | None = None,
        extra_normals: int = 0,
        val_views: int = 8,
    ) -> None:
        super().__init__(
            train_batch_size=datamodule.train_batch_size,
            eval_batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            seed=seed,
        )
        if mode not in MODES:
            msg = f"mode must be one of {MODES}, got {mode!r}"
            raise ValueError(msg)
        if not 0.0 <= anomaly_ratio <= 1.0:
            msg = f"anomaly_ratio must be in [0, 1], got {anomaly_ratio}"
            raise ValueError(msg)
        if n_shots is not None and n_shots < 1:
            msg = f"n_shots must be a positive integer or None, got {n_shots}"
            raise ValueError(msg)
        if on_bad_file not in ON_ERROR:
            msg = f"on_bad_file must be one of {ON_ERROR}, got {on_bad_file!r}"
            raise ValueError(msg)
        synthetic_val, synthetic_test, val_ratio = _anomalib_split_names(
            val_split_mode, val_split_ratio, test_split_mode, synthetic_val, synthetic_test, val_ratio
        )
        if extra_normals < 0 or val_views < 1:
            msg = f"extra_normals must be >= 0 and val_views >= 1, got {extra_normals} and {val_views}"
            raise ValueError(msg)
        if variants_per_image < 1:
            msg = f"variants_per_image must be >= 1, got {variants_per_image}"
            raise ValueError(msg)
        self.datamodule = datamodule
        self.synthesizer = get(synthesizer) if isinstance(synthesizer, str) else synthesizer
        self.mode = mode
        self.anomaly_ratio = float(anomaly_ratio)
        self.n_shots = n_shots
        self.cache_dir = Path(cache_dir)
        self.variants_per_image = int(variants_per_image)
        self.synthetic_val = synthetic_val
        self.synthetic_test = synthetic_test
        self.val_ratio = float(val_ratio)
        self.image_size = tuple(image_size) if image_size else None
        self.synthesis_batch_size = int(synthesis_batch_size)
        self.on_bad_file = on_bad_file
        self.extra_normals = int(extra_normals)
        self.val_views = int(val_views)
        self.skipped_files: list[str] = []
        self._epoch = -1
        self._batch = 0

    # --- forwarded identity -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.datamodule.name

    @property
    def category(self) -> str:
        return self.datamodule.category

    @category.setter
    def category(self, category: str) -> None:
        self.datamodule.category = category

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    # --- setup ----------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.datamodule.trainer = self.trainer  # so that the model's Resize reaches the inner datasets
        self.datamodule.setup(stage)
        if not self._is_setup:
            self._setup(stage)
            self._is_setup = True
        else:  # the inner datasets may have new augmentations (e.g. the model's Resize): hand them on
            self._sync_augmentations()

    def _setup(self, _stage: str | None = None) -> None:
        inner = self.datamodule
        for split in ("train", "val", "test"):
            dataset = getattr(inner, f"{split}_data", None)
            if dataset is not None:
                self.skipped_files += drop_unreadable(dataset, split, self.on_bad_file)
        train: AnomalibDataset = inner.train_data
        normal = [i for i, label in enumerate(train.samples.label_index) if int(label) == 0]
        generator = generator_for(self.seed or 0, "shots")
        order = [normal[i] for i in torch.randperm(len(normal), generator=generator).tolist()]
        if self.n_shots is not None:
            if self.n_shots > len(order):
                msg = f"n_shots={self.n_shots} but the training set has only {len(order)} normal images"
                raise ValueError(msg)
            # strict k-shot: no other normal image, unless asked for (extra_normals)
            shots, held_out = order[: self.n_shots], order[self.n_shots : self.n_shots + self.extra_normals]
        else:
            shots, held_out = order, []
        inner_val = getattr(inner, "val_data", None)
        want_val = self.synthetic_val
        if want_val is None:
            want_val = inner_val is None or not inner_val.has_anomalous
        if want_val and not held_out:
            if self.n_shots is None and len(shots) > 1:
                n_val = max(1, round(self.val_ratio * len(shots)))
                shots, held_out = shots[n_val:], shots[:n_val]
        self.train_data = train.subsample(sorted(shots))
        self.test_data = inner.test_data
        if inner_val is not None:
            self.val_data = inner_val
        size = self._synthesis_size()
        if want_val:
            eval_augmentations = self._inner_split("val").augmentations
            normal = train.subsample(sorted(held_out)) if held_out else self._views_of(self.train_data, size)
            self.val_data = self._with_synthetic(normal, "val", size, eval_augmentations)
            if inner_val is not None and inner_val.has_anomalous:
                # e.g. Folder's default val split takes real anomalies from the test set: give them back
                self.test_data = self._return_anomalies(self.test_data, inner_val)
        if self.synthetic_test:
            normal_test = [i for i, label in enumerate(self.test_data.samples.label_index) if int(label) == 0]
            synthetic = self._cached(self.test_data.subsample(normal_test), "test", size)
            self.test_data = self._concat(self.test_data, synthetic)
        if self.mode == "cache":
            self.train_data = self._with_synthetic(self.train_data, "train", size, train.augmentations)

    def _views_of(self, shots: AnomalibDataset, size: tuple[int, int]) -> AnomalibDataset:
        """``val_views`` augmented views of the shots, written to the cache: the normal validation images when no
        other normal image may be used."""
        paths = build_views(list(shots.samples.image_path), self.cache_dir, self.val_views, self.seed or 0, size)
        dataset = copy.deepcopy(shots)
        dataset.samples = pd.DataFrame({"image_path": [str(p) for p in paths], "label": "normal", "label_index": 0,
                                        "mask_path": "", "split": "train"})  # fmt: skip
        dataset.samples.attrs.update(shots.samples.attrs)
        return dataset

    def _synthesis_size(self) -> tuple[int, int]:
        if self.image_size:
            return self.image_size  # type: ignore[return-value]
        return _model_resize(self) or (256, 256)

    def _cached(self, source: AnomalibDataset, split: str, size: tuple[int, int]) -> AnomalibDataset:
        """A dataset of synthetic anomalies of ``source``'s images, built (or reused) in the cache."""
        variants = self.variants_per_image if split == "train" else 1
        root, records = build_cache(
            self.synthesizer,
            list(source.samples.image_path),
            self.cache_dir,
            variants=variants,
            seed=derive_seed(self.seed or 0, split),
            size=size,
            batch_size=self.synthesis_batch_size,
            device=self._device(),
        )
        dataset = copy.deepcopy(source)
        dataset.samples = records_to_samples(root, records, split)
        return dataset

    def _device(self) -> torch.device:
        """The trainer's device (its accelerator's), else the CPU: never a GPU the user did not ask for."""
        strategy = getattr(self.trainer, "strategy", None)
        try:
            return strategy.root_device if strategy is not None else torch.device("cpu")
        except (AttributeError, RuntimeError):
            return torch.device("cpu")

    def _with_synthetic(
        self, normal: AnomalibDataset, split: str, size: tuple[int, int], augmentations
    ) -> AnomalibDataset:
        dataset = self._concat(normal, self._cached(normal, split, size))
        dataset.augmentations = augmentations
        return dataset

    @staticmethod
    def _concat(first: AnomalibDataset, second: AnomalibDataset) -> AnomalibDataset:
        """Concatenate; a segmentation dataset when every anomalous sample has a mask (synthetic ones do), else
        classification (e.g. real test anomalies of a Folder set without ``mask_dir``)."""
        columns = ["image_path", "label", "label_index", "mask_path", "split"]
        samples = pd.concat([first.samples.reindex(columns=columns), second.samples[columns]], ignore_index=True)
        samples["mask_path"] = samples["mask_path"].fillna("").astype(str)
        dataset = copy.deepcopy(first)
        dataset.samples = samples
        anomalous = dataset.samples[dataset.samples.label_index == 1]
        has_masks = bool((anomalous.mask_path != "").all())
        dataset.samples.attrs["task"] = "segmentation" if has_masks else "classification"
        return dataset

    @staticmethod
    def _return_anomalies(test: AnomalibDataset, val: AnomalibDataset) -> AnomalibDataset:
        """``test`` plus the anomalous samples of ``val`` that it lacks."""
        extra = val.samples[(val.samples.label_index == 1) & ~val.samples.image_path.isin(test.samples.image_path)]
        if extra.empty:
            return test
        dataset = copy.deepcopy(test)
        samples = pd.concat([test.samples, extra], ignore_index=True)
        samples.attrs.update(test.samples.attrs)
        dataset.samples = samples
        return dataset

    def _inner_split(self, split: str) -> AnomalibDataset:
        """The wrapped dataset whose augmentations ``split`` uses (validation falls back to the test set's)."""
        inner = self.datamodule
        if split == "val":
            return getattr(inner, "val_data", None) or inner.test_data
        return getattr(inner, f"{split}_data")

    def _sync_augmentations(self) -> None:
        for split in ("train", "val", "test"):
            mine = getattr(self, f"{split}_data", None)
            if mine is not None:
                mine.augmentations = self._inner_split(split).augmentations

    def val_dataloader(self):  # noqa: ANN201
        return super().val_dataloader() if hasattr(self, "val_data") else []

    # --- online synthesis -----------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = self.datamodule.on_after_batch_transfer(batch, dataloader_idx)
        trainer = self.trainer
        if self.mode != "online" or trainer is None or not trainer.training:
            return batch
        # The fit loop counts this batch as ready only after the transfer: its count is this batch's index. The
        # loop's progress is checkpointed, so a resumed run draws the same anomalies as an uninterrupted one.
        index = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return self.synthesize_train_batch(batch, trainer.current_epoch, trainer.global_rank, batch_index=index)

    def synthesize_train_batch(self, batch: Any, epoch: int, rank: int = 0, batch_index: int | None = None) -> Any:
        """Online synthesis of one training batch (``ImageBatch``), seeded by ``seed``, epoch, batch index and rank.

        Without ``batch_index`` the calls of each epoch are counted (for use outside a Lightning loop).
        """
        if batch_index is None:
            if epoch != self._epoch:
                self._epoch, self._batch = epoch, 0
            batch_index, self._batch = self._batch, self._batch + 1
        generator = generator_for(self.seed or 0, "online", epoch, batch_index, rank)
        images = batch.image.as_subclass(torch.Tensor)
        b, _, h, w = images.shape
        masks = None if batch.gt_mask is None else batch.gt_mask.as_subclass(torch.Tensor).reshape(b, 1, h, w).bool()
        labels = None if batch.gt_label is None else batch.gt_label.reshape(b).bool()
        self.synthesizer.to(images.device)
        images, masks, labels = synthesize_batch(self.synthesizer, images, masks, labels, self.anomaly_ratio, generator)
        return batch.update(in_place=False, image=images, gt_mask=masks[:, 0], gt_label=labels)
