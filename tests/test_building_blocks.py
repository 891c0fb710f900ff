"""Values of the batched building blocks: noise, Poisson solver, placement, sampling helpers, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch
import torch.nn.functional as F
from conftest import gen

from anomalib_synth import metrics
from anomalib_synth.synthesizers import SynthesisResult
from anomalib_synth.synthesizers.ops import (
    mask_positions,
    all_per_sample,
    any_per_sample,
    binary_dilate,
    area_majority,
    binary_open_close,
    choose_k_of_n,
    fill_holes,
    fill_holes_torch,
    rotated_rect_mask,
    rotation_grid,
    sample_at,
    sample_derangement,
    sample_points,
    upsampled_mask_positions,
    whole_image_points,
)
from anomalib_synth.synthesizers.perlin import perlin_noise, threshold_with_floor
from anomalib_synth.synthesizers.placement import estimate_foreground, otsu_threshold
from anomalib_synth.synthesizers.poisson import membrane, seamless_clone


def _reference_perlin(h: int, w: int, ry: int, rx: int, angles: np.ndarray) -> np.ndarray:
    """Textbook per-pixel Perlin noise (loops), for comparison."""

    def fade(t):
        return t * t * t * (t * (t * 6 - 15) + 10)

    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            y, x = (i + 0.5) / h * ry, (j + 0.5) / w * rx
            y0, x0 = int(y), int(x)
            fy, fx = y - y0, x - x0
            dots = {}
            for dy in (0, 1):
                for dx in (0, 1):
                    a = angles[y0 + dy, x0 + dx]
                    dots[dy, dx] = math.cos(a) * (fx - dx) + math.sin(a) * (fy - dy)
            u, v = fade(fx), fade(fy)
            top = dots[0, 0] + u * (dots[0, 1] - dots[0, 0])
            bottom = dots[1, 0] + u * (dots[1, 1] - dots[1, 0])
            out[i, j] = math.sqrt(2) * (top + v * (bottom - top))
    return out


def test_batched_perlin_matches_per_pixel_reference() -> None:
    g = gen(0)
    angles = torch.rand(2, 9, 9, generator=g) * 2 * math.pi
    res_y, res_x = torch.tensor([2, 8]), torch.tensor([4, 1])
    noise = perlin_noise((24, 20), res_y, res_x, angles)
    assert noise.shape == (2, 1, 24, 20)
    for b in range(2):
        ref = _reference_perlin(24, 20, int(res_y[b]), int(res_x[b]), angles[b].numpy())
        np.testing.assert_allclose(noise[b, 0].numpy(), ref, atol=1e-5)



def test_threshold_with_floor_equals_the_threshold_capped_by_the_kth_highest() -> None:
    values = torch.rand(6, 50, generator=gen(1)) * 2 - 1
    values[1] = -0.5  # no value reaches the threshold
    values[2, :3] = 0.9  # exactly k reach it
    values[3, :2] = 0.7  # one short
    values[4, 10:] = float("-inf")  # fewer than k candidates at all (outside a foreground)
    values[5] = 0.5  # every value is the threshold itself
    for k in (1, 3, 20):
        expected = torch.minimum(torch.tensor(0.5), values.topk(k, dim=1).values[:, -1:])
        assert torch.equal(threshold_with_floor(values, 0.5, k), expected), k

def _exact_membrane(values: np.ndarray, region: np.ndarray) -> np.ndarray:
    index = -np.ones(region.shape, dtype=int)
    points = np.argwhere(region)
    index[region] = np.arange(len(points))
    rows, cols, data = [], [], []
    rhs = np.zeros(len(points))
    for n, (i, j) in enumerate(points):
        rows.append(n), cols.append(n), data.append(4.0)
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            a, b = i + di, j + dj
            if region[a, b]:
                rows.append(n), cols.append(index[a, b]), data.append(-1.0)
            else:
                rhs[n] += values[a, b]
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(len(points), len(points)))
    out = values.copy()
    out[region] = spl.spsolve(matrix, rhs)
    return out


def test_membrane_matches_exact_sparse_solve() -> None:
    g = gen(1)
    values = F.avg_pool2d(torch.rand(2, 1, 60, 60, generator=g), 7, 1, 3) + 0.05 * torch.rand(2, 1, 60, 60, generator=g)
    region = torch.zeros(2, 1, 60, 60, dtype=torch.bool)
    region[0, :, 8:50, 12:55] = True
    region[1, :, 20:40, 5:30] = True
    solved = membrane(values, region, sweeps=4)
    for b in range(2):
        exact = _exact_membrane(values[b, 0].double().numpy(), region[b, 0].numpy())
        error = np.abs(solved[b, 0].numpy() - exact)
        assert error.mean() < 0.005 and error.max() < 0.03
        assert np.array_equal(solved[b, 0].numpy()[~region[b, 0].numpy()], values[b, 0].numpy()[~region[b, 0].numpy()])


def test_seamless_clone_of_identical_images_is_identity_and_removes_offsets() -> None:
    dst = torch.rand(1, 3, 40, 40, generator=gen(2)) * 0.5
    region = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    region[..., 10:30, 10:30] = True
    assert torch.allclose(seamless_clone(dst, dst, region), dst, atol=1e-6)
    # a constant brightness offset has no gradient: cloning it back leaves the destination (up to solver error)
    assert (seamless_clone(dst, dst + 0.3, region) - dst).abs().max() < 0.02


def test_estimate_foreground_finds_objects_and_keeps_textures_whole(object_on_background, photos) -> None:
    images, truth = object_on_background
    fg = estimate_foreground(images)
    iou = (fg & truth).sum((1, 2, 3)).float() / (fg | truth).sum((1, 2, 3)).float()
    assert (iou > 0.9).all()
    assert estimate_foreground(photos[:3]).all(), "brick, grass and gravel have no background"
    # a batch of textures alone skips the clean-up; in a mixed batch each image gets its own answer
    mixed = estimate_foreground(torch.cat((images, photos[:3])))
    assert torch.equal(mixed[: len(images)], fg) and mixed[len(images) :].all()



def test_an_estimated_foreground_under_one_percent_of_the_image_means_no_background() -> None:
    """A speck on a plain background (under ``min_fraction`` = 1 %) is not an object to confine defects to: the
    whole image is foreground. A larger object is found, and the background stays out."""
    images = torch.full((2, 3, 96, 96), 0.1)
    images[0, :, 44:52, 44:52] = 0.9  # 64 pixels: 0.7 %
    images[1, :, 30:50, 30:50] = 0.9  # 400 pixels: 4.3 %
    fg = estimate_foreground(images)
    assert fg[0].all()
    assert fg[1, :, 30:50, 30:50].all() and int(fg[1].sum()) == 400

def test_auto_foreground_keeps_defects_on_the_object(object_on_background) -> None:
    from anomalib_synth.synthesizers import get

    images, truth = object_on_background
    for name in ("perlin", "cutpaste", "nsa"):
        out = get(name, foreground="auto")(images, generator=gen(3))
        assert out.labels.all()
        outside = (out.masks.bool() & ~truth).sum() / out.masks.sum()
        assert outside < 0.05, name


def _blobs(batch: int, h: int, w: int, level: float, seed: int) -> torch.Tensor:
    """Bool ``[B, 1, H, W]`` blobs (thresholded smooth noise): masks with holes, islands and border contact."""
    noise = torch.rand(batch, 1, max(1, h // 4), max(1, w // 4), generator=gen(seed))
    return F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False) < level


def test_binary_morphology_equals_max_pool_reference() -> None:
    def dilate(m, r):
        return F.max_pool2d(m.float(), 2 * r + 1, stride=1, padding=r) > 0.5

    for seed, (h, w, r) in enumerate(((31, 40, 1), (64, 50, 2), (40, 33, 5), (21, 60, 9))):
        m = _blobs(3, h, w, 0.5, seed)
        assert torch.equal(binary_dilate(m, r), dilate(m, r)), (h, w, r)
        # opening then closing, each step a max-pool (erosion counts the outside as set)
        ref = ~dilate(~dilate(dilate(~dilate(~m, r), r), r), r)
        assert torch.equal(binary_open_close(m, r), ref), (h, w, r)
        assert not torch.equal(ref, m)


def test_fill_holes_equals_scipy_per_image_on_both_routes() -> None:
    from scipy.ndimage import binary_fill_holes

    for seed, (h, w, level) in enumerate(((48, 40, 0.5), (33, 57, 0.4), (60, 60, 0.6))):
        m = _blobs(4, h, w, level, seed)
        m[0, 0, 10:20, 10:20] = True
        m[0, 0, 13:17, 13:17] = False  # a hole at least once
        ref = torch.stack([torch.from_numpy(binary_fill_holes(x[0].numpy())) for x in m]).unsqueeze(1)
        assert (ref & ~m).any()
        assert torch.equal(fill_holes(m), ref)
        assert torch.equal(fill_holes_torch(m), ref)
    # a diagonal gap is closed for 4-connected background: the inside of a ring of 8-connected pixels is a hole
    ring = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    for i in range(9):
        ring[0, 0, abs(4 - i), i] = ring[0, 0, 8 - abs(4 - i), i] = True
    assert fill_holes(ring)[0, 0, 4, 4] and fill_holes_torch(ring)[0, 0, 4, 4]


def test_area_majority_equals_float_area_interpolation() -> None:
    for seed, (fy, fx) in enumerate(((2, 2), (3, 2), (4, 4), (1, 3))):
        m = torch.rand(2, 1, 9 * fy, 7 * fx, generator=gen(seed)) < 0.5
        ref = F.interpolate(m.float(), size=(9, 7), mode="area") > 0.5
        assert torch.equal(area_majority(m, (9, 7)), ref), (fy, fx)
    m = torch.rand(2, 1, 19, 15, generator=gen(9)) < 0.5  # not a multiple: the float route
    assert torch.equal(area_majority(m, (9, 7)), F.interpolate(m.float(), size=(9, 7), mode="area") > 0.5)


def test_reduced_size_foreground_matches_full_size_and_covers_blocks(object_on_background) -> None:
    from anomalib_synth.synthesizers.placement import upsample_nearest

    images, truth = object_on_background
    big = F.interpolate(images, scale_factor=3, mode="bilinear", align_corners=False)  # 288 px: step 4
    full = estimate_foreground(big, work_size=None)
    fast = estimate_foreground(big)
    iou = (full & fast).sum((1, 2, 3)).float() / (full | fast).sum((1, 2, 3)).float()
    assert (iou > 0.95).all()
    small = torch.rand(2, 1, 5, 4, generator=gen(1)) < 0.5
    up = upsample_nearest(small, 3, (17, 11))  # a column of blocks cut, the last row of blocks repeated
    for y, x in ((0, 0), (4, 7), (13, 10), (16, 2)):
        assert torch.equal(up[:, :, y, x], small[:, :, min(y // 3, 4), min(x // 3, 3)])
    assert torch.equal(upsample_nearest(small, 3, (15, 12)), small.repeat_interleave(3, -2).repeat_interleave(3, -1))


def test_otsu_threshold_splits_two_levels() -> None:
    values = torch.cat((torch.full((1, 300), 0.2), torch.full((1, 100), 0.8)), dim=1)
    threshold = float(otsu_threshold(values))
    assert 0.2 <= threshold < 0.8


def test_derangement_is_a_permutation_without_fixed_points() -> None:
    source = sample_derangement(7, 5, gen(0), "cpu")
    for column in source.t():
        assert sorted(column.tolist()) == list(range(7))
        assert (column != torch.arange(7)).all()
    assert sample_derangement(1, 2, gen(0), "cpu").tolist() == [[0, 0]]


def test_choose_k_of_n_and_sample_points() -> None:
    gate = choose_k_of_n(50, 7, 3, gen(0), "cpu")
    assert (gate.sum(1) == 3).all()
    weights = torch.zeros(3, 10, 10)
    weights[0, 2, 3] = 1
    weights[1, 7:, 7:] = 1
    points = sample_points(weights, torch.tensor([0.5, 0.99, 0.0]))
    assert points[0].tolist() == [2.0, 3.0]
    assert (points[1] >= 7).all()
    assert points[2].tolist() == [0.0, 0.0], "empty weights fall back to a uniform draw"


def test_sample_points_of_a_mask_equal_the_float_cdf_and_share_one_cdf_per_image() -> None:
    masks = _blobs(4, 37, 29, 0.3, 7).squeeze(1)
    masks[2] = False  # empty: uniform over the image
    u = torch.rand(4, 64, generator=gen(8))
    u[0, 0], u[1, 0] = 0.0, 1 - 2**-24  # the ends of the CDF
    got = sample_points(masks, u)
    assert got.shape == (4, 64, 2)
    for k in range(64):
        ref = sample_points(masks.float(), u[:, k])  # the float CDF, one point per image
        assert torch.equal(got[:, k], ref), k
    y, x = got[..., 0].long(), got[..., 1].long()
    inside = masks[torch.arange(4).view(4, 1), y, x]
    assert inside[[0, 1, 3]].all() and got[2, :, 0].unique().numel() > 1


def test_sample_at_equals_dense_grid_sample() -> None:
    images = torch.rand(3, 2, 12, 16, generator=gen(4))
    index = torch.tensor([2, 0, 2, 1, 0])
    sy = torch.tensor([0.5, 3.2, 11.9, 6.0, -2.0])
    sx = torch.tensor([0.5, 7.7, 15.0, 2.5, 20.0])
    got = sample_at(images, index, sy, sx)
    for n in range(5):
        grid = torch.tensor([[[[sx[n] / 16 * 2 - 1, sy[n] / 12 * 2 - 1]]]])
        ref = F.grid_sample(images[index[n] : index[n] + 1], grid, padding_mode="border", align_corners=False)
        assert torch.allclose(got[n], ref.flatten(), atol=1e-6)
    assert torch.equal(sample_at(images, index.sort().values, sy, sx, presorted=True),
                       sample_at(images, index.sort().values, sy, sx))  # fmt: skip
    # a non-increasing index is not sorted: each point still comes from its own image
    down = index.sort(descending=True).values
    ref = torch.stack([sample_at(images[i : i + 1], torch.zeros(1, dtype=torch.long), sy[n : n + 1], sx[n : n + 1])[0]
                       for n, i in enumerate(down.tolist())])  # fmt: skip
    assert torch.equal(sample_at(images, down, sy, sx), ref)


def test_any_and_all_per_sample_equal_torch_any_and_all() -> None:
    masks = torch.rand(6, 1, 9, 7, generator=gen(3)) > 0.2
    masks[0], masks[1], masks[2] = False, True, False
    masks[2, 0, 4, 5] = True
    for m in (masks, masks.transpose(-1, -2)):  # contiguous and not
        assert torch.equal(any_per_sample(m), m.flatten(1).any(1))
        assert torch.equal(all_per_sample(m), m.flatten(1).all(1))
    assert any_per_sample(masks).tolist()[:3] == [False, True, True] and all_per_sample(masks).tolist()[:3] == [
        False, True, False]  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "factor"),
    [((6, 1, 32, 32), 2), ((4, 1, 16, 24), 4), ((3, 1, 11, 7), 3), ((2, 1, 1, 1), 2), ((3, 1, 5, 9), 5),
     ((3, 1, 12, 12), (25, 24)), ((2, 1, 10, 10), 1)],
)  # fmt: skip
def test_upsampled_mask_positions_equal_thresholding_the_upsampled_map(shape: tuple, factor: int | tuple) -> None:
    """The cell-by-cell threshold gives the pixels of ``F.interpolate(values) >= threshold``, each once, ``b``
    sorted; a pixel may differ only where the upsampled value is within float rounding of the threshold. Sizes that
    are not a multiple of the map (``(25, 24)``) and factor 1 take the dense route."""
    values = F.avg_pool2d(torch.randn(shape[0], 1, shape[2] + 2, shape[3] + 2, generator=gen(8)), 3, 1)  # smooth
    size = factor if isinstance(factor, tuple) else (shape[2] * factor, shape[3] * factor)
    threshold = torch.quantile(values.flatten(1), 0.8, dim=1).view(-1, 1, 1, 1)
    threshold[0] = 10.0  # no pixel
    threshold[1] = -10.0  # every pixel
    up = F.interpolate(values, size=size, mode="bilinear", align_corners=False)
    b, p = upsampled_mask_positions(values, threshold, size)
    assert bool((b[1:] >= b[:-1]).all()) and bool((p >= 0).all()) and bool((p < size[0] * size[1]).all())
    key = b * (size[0] * size[1]) + p
    assert key.unique().numel() == key.numel(), "each pixel once"
    mask = torch.zeros_like(up, dtype=torch.bool)
    mask.view(-1)[key] = True
    differ = mask ^ (up >= threshold)
    assert int(differ.sum()) <= 3 and bool(((up - threshold).abs()[differ] <= 1e-6).all())
    assert int(mask[0].sum()) == 0 and bool(mask[1].all())


def test_upsampled_mask_positions_keep_values_equal_to_the_threshold() -> None:
    """``>=``, as the dense threshold: a flat map at the threshold is all mask."""
    values = torch.full((2, 1, 8, 8), 0.3)
    b, p = upsampled_mask_positions(values, torch.full((2, 1, 1, 1), 0.3), (16, 16))
    assert torch.equal(b.bincount(minlength=2), torch.tensor([256, 256])) and p.unique().numel() == 256
    b, p = upsampled_mask_positions(values[:0], torch.full((0, 1, 1, 1), 0.3), (16, 16))  # an empty batch
    assert b.numel() == 0 and p.numel() == 0


def test_upsampled_mask_positions_on_a_batch_of_noise_maps() -> None:
    """At perlin's sizes (128 -> 256 px, 64 -> 256 px) the pixels are exactly those of the dense threshold."""
    for small, big in ((128, 256), (64, 256)):
        values = F.interpolate(torch.randn(8, 1, small // 8, small // 8, generator=gen(9)), size=(small, small),
                               mode="bicubic", align_corners=False)  # fmt: skip
        threshold = torch.full((8, 1, 1, 1), 0.5)
        up = F.interpolate(values, size=(big, big), mode="bilinear", align_corners=False)
        b, p = upsampled_mask_positions(values, threshold, (big, big))
        dense_b, dense_p = mask_positions(up >= threshold)
        order = (b * big * big + p).argsort()
        assert torch.equal(b[order], dense_b) and torch.equal(p[order], dense_p)


@pytest.mark.parametrize("sweeps", [0, 1, 2, 5])
def test_jacobi_sweeps_equal_the_textbook_update(sweeps: int) -> None:
    """The double-buffered sweeps are Jacobi's: every interior pixel of the region becomes the mean of its four
    neighbours from the previous sweep, everything else stays; bit for bit."""
    from anomalib_synth.synthesizers.poisson import _jacobi

    x = torch.rand(2, 3, 9, 11, generator=gen(10))
    region = torch.rand(2, 1, 9, 11, generator=gen(11)) < 0.6
    region[..., 0, :] = region[..., -1, :] = region[..., :, 0] = region[..., :, -1] = False
    expected = x.clone()
    for _ in range(sweeps):
        e = expected
        mean = (e[..., :-2, 1:-1] + e[..., 2:, 1:-1] + e[..., 1:-1, :-2] + e[..., 1:-1, 2:]) * 0.25
        expected[..., 1:-1, 1:-1] = torch.where(region[..., 1:-1, 1:-1], mean, expected[..., 1:-1, 1:-1])
    out = _jacobi(x, region, sweeps)
    assert torch.equal(out, expected) and out.data_ptr() != x.data_ptr()


def test_mask_positions_equal_nonzero() -> None:
    # sizes that are not a multiple of 8 are scanned byte by byte, the others by 8-byte words
    for shape in ((4, 1, 7, 9), (3, 1, 1, 5), (2, 1, 6, 1), (0, 1, 4, 4), (3, 1, 8, 16), (2, 1, 5, 8)):
        for fraction in (0.0, 0.02, 0.3, 1.0):
            mask = torch.rand(shape, generator=gen(6)) < fraction
            if len(mask) > 2:
                mask[2] = False
            b, _, y, x = mask.nonzero(as_tuple=True)
            pb, pos = mask_positions(mask)
            assert torch.equal(pb, b) and torch.equal(pos, y * shape[-1] + x), (shape, fraction)

    unaligned = (torch.rand(80, generator=gen(7)) < 0.3)[3:67].view(1, 1, 8, 8)  # bytes not readable as words
    b, _, y, x = unaligned.nonzero(as_tuple=True)
    pb, pos = mask_positions(unaligned)
    assert torch.equal(pb, b) and torch.equal(pos, y * 8 + x)



def test_centres_of_an_everywhere_foreground_equal_those_of_an_all_true_mask() -> None:
    from anomalib_synth.synthesizers.placement import sample_centres

    for h, w in ((7, 9), (64, 64), (1, 5)):
        shape = (3, 3, h, w)
        everywhere = sample_centres(None, shape, 4, gen(5), "cpu", everywhere=True)
        assert torch.equal(everywhere, sample_centres(torch.ones(3, 1, h, w, dtype=torch.bool), shape, 4, gen(5), "cpu"))
    # the ends of the draws: u = 0 and the largest float below 1
    u = torch.tensor([[0.0, 1 - 2**-24, 0.5, 0.999, 1 / 143]])
    for h, w in ((11, 13), (1, 1), (256, 256)):
        assert torch.equal(whole_image_points(u, h, w), sample_points(torch.ones(1, h, w, dtype=torch.bool), u))


def test_draws_from_coarse_blocks_equal_those_from_the_full_size_mask() -> None:
    from anomalib_synth.synthesizers.ops import sample_points_blocks
    from anomalib_synth.synthesizers.placement import sample_source_centres, upsample_nearest

    g = gen(8)
    for hs, ws, step in ((16, 16, 4), (8, 12, 3), (5, 7, 1)):
        coarse = torch.rand(6, 1, hs, ws, generator=g) > 0.7
        coarse[1] = False  # empty: uniform pixels
        coarse[2] = True
        coarse[3] = False
        coarse[3, :, 0, :2] = True  # only a corner: no patch fits, the whole foreground is used
        full = upsample_nearest(coarse, step, (hs * step, ws * step))
        u = torch.rand(6, 9, generator=g)
        u[:, 0], u[:, 1] = 0.0, 1 - 2**-24
        assert torch.equal(sample_points_blocks(coarse.squeeze(1), step, u), sample_points(full.squeeze(1), u))
        source = torch.randint(0, 6, (6, 9), generator=g)
        source[:, 0] = 3
        half = torch.rand(6, 9, 2, generator=g) * (hs * step / 3) + 0.5
        expected = sample_source_centres(full, source, half, u.unsqueeze(-1).expand(-1, -1, 2))
        got = sample_source_centres(full, source, half, u.unsqueeze(-1).expand(-1, -1, 2), blocks=(coarse, step))
        assert torch.equal(got, expected), (hs, ws, step)

def test_rotation_grid_equals_affine_grid() -> None:
    angle = torch.rand(5, generator=gen(2)) * 6 - 3
    for h, w in ((16, 16), (12, 20)):
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
        theta = torch.stack((torch.stack((cos, -sin * h / w, zero), -1), torch.stack((sin * w / h, cos, zero), -1)), 1)
        ref = F.affine_grid(theta, [5, 1, h, w], align_corners=False)
        assert torch.allclose(rotation_grid((h, w), angle), ref, atol=1e-6)


def test_rotated_rect_mask_area_and_rotation() -> None:
    centre = torch.tensor([[50.0, 50.0], [50.0, 50.0]])
    half = torch.tensor([[10.0, 20.0], [10.0, 20.0]])
    masks = rotated_rect_mask((100, 100), centre, half, torch.tensor([0.0, math.pi / 2]))
    assert masks[0].sum() == 20 * 40 and abs(int(masks[1].sum()) - 800) <= 2
    ys, xs = masks[1, 0].nonzero(as_tuple=True)
    assert int(ys.max() - ys.min()) + 1 == 40, "rotated by 90 degrees, the long side is vertical"


def _result(images: torch.Tensor, out: torch.Tensor, masks: torch.Tensor) -> SynthesisResult:
    return SynthesisResult(images=out, masks=masks.float(), labels=masks.flatten(1).any(1))


def test_metrics_on_crafted_values() -> None:
    images = torch.zeros(2, 3, 10, 10)
    masks = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    masks[:, :, :5] = True  # top half
    out = images.clone()
    out[0, :, :5] = 0.4  # sample 0: exactly the mask changed by 0.4
    out[1, :, :5, :5] = 0.2  # sample 1: a quarter of the image inside the mask ...
    out[1, :, 9, :] = 0.1  # ... and a background row changed by 0.1
    result = _result(images, out, masks)
    psnr = metrics.background_psnr(result, images)
    assert math.isinf(psnr[0]) and psnr[1] == pytest.approx(10 * math.log10(1 / (0.01 * 10 / 50)), rel=1e-4)
    assert metrics.anomaly_visibility(result, images).tolist() == pytest.approx([0.4, 0.1])
    assert metrics.mask_agreement(result, images).tolist() == pytest.approx([1.0, 25 / 60])
    summary = metrics.summarize(result, images)
    assert summary["anomalous"] == 1.0 and summary["mask_area"] == pytest.approx(0.5)


def test_background_pasted_on_an_object_on_plain_background() -> None:
    background = torch.tensor([0.9, 0.8, 0.7]).view(3, 1, 1)
    image = background.expand(3, 20, 20).clone()
    image[:, 0, :3] = 0.0  # a few dark border pixels: the median ignores them, a mean would not
    image[:, 0, 17:] = 0.0
    image[:, 3:18, 3:18] = torch.tensor([0.2, 0.3, 0.1]).view(3, 1, 1)  # the object: most of the image
    images = torch.stack((image, image))
    masks = torch.zeros(2, 1, 20, 20, dtype=torch.bool)
    masks[0, 0, 2:12, 2:12] = True  # the object's corner and a strip of background
    out = images.clone()
    out[0, :, 4:6, 4:10] = background + 0.03  # 12 px: background pasted onto the object (within tolerance)
    out[0, :, 6:8, 4:10] = 0.5  # 12 px: changed, not to the background colour
    out[0, :, 8, 4:10] = torch.tensor([0.9, 0.8, 0.8]).view(3, 1)  # 6 px: one channel 0.1 off: not background
    out[0, 0, 9, 4:10] += 2 / 255  # 6 px: one channel changed by more than tau: changed
    out[0, :, 10, 4:10] += 0.5 / 255  # 6 px: changed by less than tau: not counted
    out[0, :, 2, 2:12] = background.view(3, 1) + 0.02  # 10 px: background already, changed a little: not pasted
    out[0, :, 14, 8] = background.flatten()  # outside the mask: not counted
    result = _result(images, out, masks)
    expected = 12 / (12 + 12 + 6 + 6 + 10)
    assert metrics.background_pasted(result, images).tolist() == pytest.approx([expected, 0.0])
    assert metrics.summarize(result, images)["background_pasted"] == pytest.approx(expected)


def test_sample_source_centres_where_the_patch_fits_on_the_foreground() -> None:
    from anomalib_synth.synthesizers.placement import sample_source_centres

    fg = torch.zeros(4, 1, 64, 64, dtype=torch.bool)
    fg[:2, :, :4] = True  # a strip along the top border: no patch of half-side 10 fits there
    fg[0, :, 60:] = True  # and along the bottom
    fg[0, :, 40:44, 20:24] = True  # ... but it fits on this block
    fg[3] = True  # a texture
    k = 50
    source = torch.arange(4).view(4, 1).expand(4, k)
    half = torch.full((4, k, 2), 10.0)
    u = torch.rand(4, k, 2, generator=gen(3))
    centres = sample_source_centres(fg, source, half, u)
    assert ((centres[0] >= torch.tensor([40, 20])) & (centres[0] < torch.tensor([44, 24]))).all()
    assert (centres[1, :, 0] < 4).all(), "fits nowhere on the foreground: anywhere on it"
    anywhere = half + u * (64 - 2 * half)
    assert torch.equal(centres[2:], anywhere[2:]), "empty or whole foreground: uniform where the patch fits"
    donor = sample_source_centres(fg, torch.zeros(4, k, dtype=torch.long), half, u)
    assert ((donor >= torch.tensor([40, 20])) & (donor < torch.tensor([44, 24]))).all(), "the donor's foreground"
    left = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    left[..., :4] = True  # a strip along the left border: rows fit, columns do not
    left[..., 30:34, 30:34] = True
    centres = sample_source_centres(left, torch.zeros(1, k, dtype=torch.long), half[:1], u[:1])
    assert ((centres >= 30) & (centres < 34)).all(), "the columns where the patch fits"
