"""Augmented normal views: identity, flips, seeding and ranges (values, not shapes)."""

from __future__ import annotations

import pytest
import torch

from anomalib_synth.views import ViewRanges, apply_views, augmented_views, sample_view_params


def _images() -> torch.Tensor:
    return torch.rand(3, 3, 24, 32, generator=torch.Generator().manual_seed(1))


def test_identity_views_return_the_images_exactly() -> None:
    images = _images()
    assert torch.equal(apply_views(images, sample_view_params(3, ViewRanges.identity(), None)), images)


@pytest.mark.parametrize(("key", "dim"), [("hflip", -1), ("vflip", -2)])
def test_a_flip_view_is_the_flipped_image(key: str, dim: int) -> None:
    images = _images()
    params = sample_view_params(3, ViewRanges.identity(), None)
    params[key][:] = True
    torch.testing.assert_close(apply_views(images, params), images.flip(dim), atol=1e-5, rtol=0)


def test_a_shift_moves_the_content_by_the_fraction_of_the_side() -> None:
    images = torch.zeros(1, 1, 32, 32)
    images[..., 8:12, 8:12] = 1
    params = sample_view_params(1, ViewRanges.identity(), None)
    params["tx"][:] = 0.25  # 8 pixels to the right
    out = apply_views(images, params)
    torch.testing.assert_close(out[..., 8:12, 16:20], torch.ones(1, 1, 4, 4), atol=1e-5, rtol=0)
    assert out[..., 8:12, 8:12].max() < 1e-5


def test_brightness_and_contrast_change_values_within_range() -> None:
    images = torch.full((1, 3, 8, 8), 0.5)
    params = sample_view_params(1, ViewRanges.identity(), None)
    params["brightness"][:] = 0.1
    torch.testing.assert_close(apply_views(images, params), torch.full_like(images, 0.6))
    params["brightness"][:] = 0.9
    assert apply_views(images, params).max() == 1  # clamped to [0, 1]


def test_same_generator_same_views_and_other_seed_other_views() -> None:
    images = _images()
    a, sa = augmented_views(images, 6, torch.Generator().manual_seed(0))
    b, sb = augmented_views(images, 6, torch.Generator().manual_seed(0))
    c, _ = augmented_views(images, 6, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, c)
    assert not torch.equal(a, images[sa])  # the default ranges move the images


def test_sampled_parameters_stay_within_the_ranges() -> None:
    ranges = ViewRanges(rotation=5, translate=0.1, scale=0.2, hflip=0, brightness=0.0, contrast=0.0)
    p = sample_view_params(500, ranges, torch.Generator().manual_seed(0), sources=4)
    assert p["angle"].abs().max() <= 5 and p["angle"].abs().max() > 4
    assert p["tx"].abs().max() <= 0.1 and (p["scale"] - 1).abs().max() <= 0.2
    assert not p["hflip"].any() and set(p["source"].tolist()) == {0, 1, 2, 3}


def test_negative_range_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="rotation"):
        ViewRanges(rotation=-1)
