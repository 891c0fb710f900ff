from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch, ImageItem
from torchvision import tv_tensors
from tiny_data import EveryOtherAnomalous
from torchvision.transforms import v2

from anomalib_synth.synthesizers import get
from anomalib_synth.transforms import SynthesizeAnomaly


def _items(photos: torch.Tensor, labels=(False, False, False, False)) -> list[ImageItem]:
    items = []
    for image, label in zip(photos, labels, strict=True):
        mask = torch.zeros(96, 96, dtype=torch.bool)
        if label:
            mask[10:20, 10:20] = True  # a "real" defect
        items.append(ImageItem(image=image, gt_label=torch.tensor(label), gt_mask=mask, image_path="x.png"))
    return items


def test_plain_tensor_single_and_batched(photos: torch.Tensor) -> None:
    t = SynthesizeAnomaly("perlin", p=1.0, seed=0)
    out = t(photos[0])
    assert out.shape == photos[0].shape and not torch.equal(out, photos[0])
    batch = t(photos)
    assert batch.shape == photos.shape and (batch != photos).flatten(1).any(1).all()


def test_p_zero_is_identity_and_p_one_changes_all(photos: torch.Tensor) -> None:
    assert torch.equal(SynthesizeAnomaly("cutpaste", p=0.0, seed=0)(photos), photos)
    image, mask = SynthesizeAnomaly("cutpaste", p=1.0, seed=0)(photos, torch.zeros(4, 96, 96, dtype=torch.bool))
    assert mask.shape == (4, 96, 96) and mask.flatten(1).any(1).all()
    outside = ~mask.unsqueeze(1).expand_as(photos)
    assert torch.equal(image[outside], photos[outside])


def test_probability_is_per_sample(photos: torch.Tensor) -> None:
    images = photos.repeat(8, 1, 1, 1)  # 32 samples
    _, mask = SynthesizeAnomaly("scar", p=0.5, seed=1)(images, torch.zeros(32, 1, 96, 96))
    changed = mask.flatten(1).any(1)
    gate = torch.rand(32, generator=torch.Generator().manual_seed(1)) < 0.5  # the transform's first draw
    assert torch.equal(changed, gate) and 0 < int(gate.sum()) < 32


def test_image_mask_pair_keeps_types_and_leaves_real_defects_alone(photos: torch.Tensor) -> None:
    t = SynthesizeAnomaly("nsa", p=1.0, seed=0)
    empty = torch.zeros(1, 96, 96, dtype=torch.bool)
    image, mask = t(tv_tensors.Image(photos[0]), tv_tensors.Mask(empty))
    assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
    assert mask.shape == empty.shape and mask.dtype == torch.bool and mask.any()
    real = empty.clone()
    real[0, :5, :5] = True
    image, mask = t(photos[0], real)
    assert torch.equal(image, photos[0]) and torch.equal(mask, real)


def test_same_seed_same_output(photos: torch.Tensor) -> None:
    a = SynthesizeAnomaly("perlin", p=0.5, seed=3)(photos)
    b = SynthesizeAnomaly("perlin", p=0.5, seed=3)(photos)
    assert torch.equal(a, b)


def test_image_batch_sets_labels_and_masks_and_keeps_real_anomalies(photos: torch.Tensor) -> None:
    batch = ImageBatch.collate(_items(photos, labels=(True, False, False, False)))
    out = SynthesizeAnomaly("cutpaste", p=1.0, seed=0)(batch)
    assert isinstance(out, ImageBatch)
    assert out.gt_label.tolist() == [True, True, True, True]
    assert out.gt_mask.shape == (4, 96, 96) and out.gt_mask.dtype == torch.bool
    # the real anomaly is untouched: same image, same mask
    assert torch.equal(out.image[0], batch.image[0])
    assert torch.equal(out.gt_mask[0], batch.gt_mask[0])
    # the others: mask covers exactly the changed pixels' region, image unchanged outside it
    for i in range(1, 4):
        outside = ~out.gt_mask[i].expand(3, -1, -1)
        assert out.gt_mask[i].any()
        assert torch.equal(out.image[i][outside], batch.image[i][outside])
    assert not batch.gt_label[1:].any(), "the input batch is not modified"


def test_image_item(photos: torch.Tensor) -> None:
    item = _items(photos)[0]
    out = SynthesizeAnomaly("perlin", p=1.0, seed=0)(item)
    assert isinstance(out, ImageItem)
    assert bool(out.gt_label) and out.gt_mask.any() and out.gt_mask.shape == (96, 96)


def test_item_without_mask(photos: torch.Tensor) -> None:
    out = SynthesizeAnomaly("perlin", p=1.0, seed=0)(ImageItem(image=photos[1]))
    assert bool(out.gt_label) and out.gt_mask.shape == (96, 96)


def test_composes_with_torchvision(photos: torch.Tensor) -> None:
    pipeline = v2.Compose([v2.RandomHorizontalFlip(p=1.0), SynthesizeAnomaly(get("scar"), p=1.0, seed=0)])
    image, mask = pipeline(photos, torch.zeros(4, 1, 96, 96, dtype=torch.bool))
    flipped = photos.flip(-1)
    outside = ~mask.expand_as(photos)
    assert mask.flatten(1).any(1).all() and torch.equal(image[outside], flipped[outside])
    assert not torch.equal(image, flipped)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="p must be in"):
        SynthesizeAnomaly("perlin", p=1.5)
    with pytest.raises(ValueError, match="only accepted with a synthesizer name"):
        SynthesizeAnomaly(get("perlin"), beta=(0.1, 0.2))
    with pytest.raises(TypeError, match="Synthesizer or a registry name"):
        SynthesizeAnomaly(42)
    with pytest.raises(ValueError, match="does not match image"):
        SynthesizeAnomaly("perlin", p=1.0)(torch.rand(3, 32, 32), torch.zeros(16, 16))
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        SynthesizeAnomaly("perlin", p=1.0)(torch.randn(3, 32, 32) * 3)


def test_dataloader_workers_get_different_anomalies(photos: torch.Tensor) -> None:
    class Same(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            return transform(photos[0])

    transform = SynthesizeAnomaly("cutpaste", p=1.0, seed=0)
    loader = torch.utils.data.DataLoader(Same(), batch_size=1, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    batches = [b[0] for b in loader]  # workers interleave: 0, 1, 0, 1
    assert not torch.equal(batches[0], batches[1])


def test_a_sample_the_synthesizer_leaves_normal_keeps_a_normal_label(photos: torch.Tensor) -> None:
    batch = ImageBatch.collate(_items(photos))
    out = SynthesizeAnomaly(EveryOtherAnomalous(), p=1.0, seed=0)(batch)
    assert out.gt_label.tolist() == [True, False, True, False]
    assert out.gt_mask.flatten(1).any(1).tolist() == out.gt_label.tolist()
    assert torch.equal(out.image[1::2], batch.image[1::2])
