"""The albumentations DualTransform: the mask follows the image through geometric transforms."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from anomalib_synth.albumentations import SynthesizeAnomaly
from anomalib_synth.io import builtin_photo, resize, to_uint8
from anomalib_synth.synthesizers import Synthesizer


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return to_uint8(resize(builtin_photo("brick"), (64, 80)))


def test_mask_marks_exactly_the_changed_pixels_after_a_flip(photo) -> None:
    pipeline = A.Compose([SynthesizeAnomaly("cutpaste", p=1.0), A.HorizontalFlip(p=1.0)], seed=0)
    out = pipeline(image=photo, mask=np.zeros(photo.shape[:2], np.uint8))
    changed = (out["image"] != photo[:, ::-1]).any(-1)
    assert changed.any()
    assert not (changed & (out["mask"] == 0)).any(), "every changed pixel is in the mask"
    assert set(np.unique(out["mask"])) == {0, 1}


def test_mask_follows_a_rotation_after_synthesis(photo) -> None:
    synth = A.Compose([SynthesizeAnomaly("nsa", p=1.0, mask_value=255)], seed=3)
    rotated = A.Compose([SynthesizeAnomaly("nsa", p=1.0, mask_value=255),
                         A.Affine(rotate=(30, 30), p=1.0, interpolation=0, mask_interpolation=0)], seed=3)  # fmt: skip
    plain = synth(image=photo, mask=np.zeros(photo.shape[:2], np.uint8))
    turned = rotated(image=photo, mask=np.zeros(photo.shape[:2], np.uint8))
    reference = A.Compose([A.Affine(rotate=(30, 30), p=1.0, interpolation=0, mask_interpolation=0)])
    expected = reference(image=plain["image"], mask=plain["mask"])
    assert np.array_equal(turned["mask"], expected["mask"]) and turned["mask"].max() == 255
    assert np.array_equal(turned["image"], expected["image"])


def test_same_seed_same_sample_and_label_is_set(photo) -> None:
    make = lambda: A.Compose([SynthesizeAnomaly("perlin", p=1.0)], seed=7)  # noqa: E731
    a = make()(image=photo, label=0)
    b = make()(image=photo, label=0)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert a["label"] == 1 and a["mask"].any() and a["image"].dtype == np.uint8


def test_float_and_grayscale_images_keep_dtype_and_shape(photo) -> None:
    gray = photo.mean(-1).astype(np.float32) / 255
    out = A.Compose([SynthesizeAnomaly("cutpaste", p=1.0)], seed=1)(image=gray)
    assert out["image"].dtype == np.float32 and out["image"].shape == gray.shape
    assert ((out["image"] != gray) <= (out["mask"] > 0)).all()


def test_real_defects_are_left_alone_and_p0_does_nothing(photo) -> None:
    real = np.zeros(photo.shape[:2], np.uint8)
    real[5:10, 5:10] = 1
    out = A.Compose([SynthesizeAnomaly("cutpaste", p=1.0)], seed=0)(image=photo, mask=real, label=1)
    assert np.array_equal(out["image"], photo) and np.array_equal(out["mask"], real)
    out = A.Compose([SynthesizeAnomaly("cutpaste", p=0.0)], seed=0)(image=photo, mask=real * 0, label=0)
    assert np.array_equal(out["image"], photo) and not out["mask"].any() and out["label"] == 0


def test_bad_images_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="C in"):
        A.Compose([SynthesizeAnomaly("cutpaste", p=1.0)])(image=np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        A.Compose([SynthesizeAnomaly("cutpaste", p=1.0)])(image=np.zeros((8, 8, 3), np.int32))


def test_each_call_and_each_pipeline_seed_draws_another_sample(photo) -> None:
    """The transform draws from albumentations' generator: a pipeline's next call, or another seed, gives another
    defect (the same seed, the same one: see above)."""
    pipeline = A.Compose([SynthesizeAnomaly("cutpaste", p=1.0)], seed=7)
    first, second = pipeline(image=photo)["mask"], pipeline(image=photo)["mask"]
    other = A.Compose([SynthesizeAnomaly("cutpaste", p=1.0)], seed=8)(image=photo)["mask"]
    assert first.any() and second.any() and other.any()
    assert not np.array_equal(first, second) and not np.array_equal(first, other)


class _LeavesNormal(Synthesizer):
    """Returns every sample unchanged and normal (as a synthesizer does for an empty foreground)."""

    name = "leaves-normal"

    def sample_params(self, images, fg_masks, generator):
        return {}

    def apply(self, images, params):
        return self._result(images, images, torch.zeros_like(images[:, :1], dtype=torch.bool), params, ())


def test_a_sample_the_synthesizer_leaves_normal_keeps_label_0(photo) -> None:
    out = A.Compose([SynthesizeAnomaly(_LeavesNormal(), p=1.0)], seed=0)(image=photo, label=0)
    assert out["label"] == 0 and not out["mask"].any() and np.array_equal(out["image"], photo)
