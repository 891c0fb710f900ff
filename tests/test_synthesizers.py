"""The classical synthesizers' own behaviour (the contract all synthesizers share: tests/test_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import gen
from PIL import Image
from scipy import ndimage

from anomalib_synth import metrics
from anomalib_synth.io import builtin_photo, resize
from anomalib_synth.synthesizers.placement import upsample_nearest
from anomalib_synth.synthesizers import (
    CutPasteSynthesizer,
    NSASynthesizer,
    PerlinSynthesizer,
    Synthesizer,
    available,
    get,
    get_class,
    names,
)

NAMES = names(kind="classical")


def test_registry_lists_every_classical_synthesizer() -> None:
    assert {"perlin", "cutpaste", "scar", "nsa", "anomalib-perlin"} <= set(NAMES)
    assert all(description for description in available().values())
    assert isinstance(get("perlin", beta=(0.5, 1.0)), PerlinSynthesizer)
    assert get("scar").mode == "scar"


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown synthesizer 'nope'.*perlin"):
        get("nope")


def test_nsa_changes_exactly_where_the_mask_says(photos: torch.Tensor) -> None:
    out = NSASynthesizer()(photos, generator=gen(3))
    changed = (out.images - photos).abs().amax(1, keepdim=True) > 0
    assert torch.equal(changed, out.masks > 0)
    assert torch.equal(metrics.mask_agreement(out, photos, tau=0.0), torch.ones(4))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "floating point"),
        (torch.rand(2, 3, 32, 32) * 2, r"\[0,1\]"),
        (torch.full((2, 3, 32, 32), float("nan")), r"\[0,1\]"),
        (torch.rand(3, 32, 32), "rank 4"),
        (torch.rand(2, 4, 32, 32), "1 or 3 channels"),
        (np.zeros((2, 3, 32, 32), dtype=np.float32), "torch.Tensor"),
    ],
)
def test_bad_images_raise_clear_errors(images, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get("cutpaste")(images)


def test_bad_fg_masks_raise() -> None:
    with pytest.raises(ValueError, match=r"fg_masks must have shape \[B,1,H,W\]"):
        get("nsa")(torch.rand(2, 3, 32, 32), fg_masks=torch.ones(2, 1, 16, 16))


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="beta"):
        PerlinSynthesizer(beta=(0.8, 0.2))
    with pytest.raises(ValueError, match="mode"):
        CutPasteSynthesizer(mode="paste")
    with pytest.raises(ValueError, match="foreground"):
        NSASynthesizer(foreground="otsu")
    with pytest.raises(ValueError, match="num_defects"):
        CutPasteSynthesizer(num_defects=(2, 1))


def test_missing_or_empty_texture_folder_raises(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        PerlinSynthesizer(texture_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        PerlinSynthesizer(texture_dir=tmp_path / "empty")


def _write_textures(folder, names=("gravel", "grass")) -> None:
    (folder / "sub").mkdir(parents=True)
    for name in names:
        array = (resize(builtin_photo(name), (40, 60)) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / "sub" / f"{name}.png")


def test_perlin_fills_the_mask_from_textures(tmp_path) -> None:
    _write_textures(tmp_path)
    flat = torch.full((3, 3, 64, 64), 0.5)
    synth = PerlinSynthesizer(texture_dir=tmp_path, beta=(1.0, 1.0), n_augment=0, texture_size=64)
    assert synth.textures.shape == (2, 3, 64, 64) and synth.textures.dtype == torch.uint8
    out = synth(flat, generator=gen(0))
    # full opacity, no augmentation, texture at image size: the mask shows exactly the chosen texture's pixels
    for i, params in enumerate(out.params):
        inside = out.masks[i].bool().expand(3, -1, -1)
        texture = synth.textures[params["texture"]].float() / 255
        assert torch.allclose(out.images[i][inside], texture[inside], atol=1e-5)
        assert torch.equal(out.images[i][~inside], flat[i][~inside])


def test_perlin_area_range_controls_defect_size(photos: torch.Tensor) -> None:
    out = PerlinSynthesizer(area_range=(0.1, 0.1))(photos, generator=gen(0))
    area = out.masks.mean((1, 2, 3))
    assert torch.allclose(area, torch.full_like(area, 0.1), atol=0.02)


def test_perlin_never_returns_an_empty_mask_for_a_non_empty_foreground(photos: torch.Tensor) -> None:
    out = PerlinSynthesizer(threshold=0.99, min_area=0.01)(photos, generator=gen(0))
    assert out.labels.all()
    assert (out.masks.mean((1, 2, 3)) >= 0.005).all()


def test_cutpaste_num_defects_places_several_patches(photos: torch.Tensor) -> None:
    synth = CutPasteSynthesizer(area_range=(0.01, 0.01), rotation=(0, 0), num_defects=(3, 3), source="other")
    out = synth(photos, generator=gen(0))
    components = [ndimage.label(m[0].numpy())[1] for m in out.masks]
    assert max(components) >= 2
    assert all(p["num_defects"] == 3 for p in out.params)
    single = CutPasteSynthesizer(area_range=(0.01, 0.01), rotation=(0, 0))(photos, generator=gen(0))
    assert (single.masks.mean((1, 2, 3)) - 0.01).abs().max() < 0.005


def test_cutpaste_other_source_takes_patches_from_another_image(photos: torch.Tensor) -> None:
    out = CutPasteSynthesizer(source="other")(photos, generator=gen(0))
    assert all(p["source_index"] != i for i, p in enumerate(out.params))


def test_scar_masks_are_thin(photos: torch.Tensor) -> None:
    paper = get("cutpaste", mode="scar")(photos, generator=gen(0))
    # 2-16 x 10-25 px at 256 px, scaled to 96 px: at most ~6 x 9.4 px
    assert (paper.masks.sum((1, 2, 3)) <= 6.1 * 9.5 + 4).all()
    scar = get("scar")(photos, generator=gen(0))
    # 4-16 x 32-96 px at 256 px, scaled to 96 px: 1.5-6 x 12-36 px
    areas = scar.masks.sum((1, 2, 3))
    assert (areas <= 6.1 * 36.1 + 8).all() and (areas >= 1.5 * 12 - 4).all()


def test_synthesizer_is_a_plain_module_that_moves_with_to() -> None:
    synth = get("perlin")
    assert isinstance(synth, Synthesizer) and isinstance(synth, torch.nn.Module)
    assert synth.to("cpu") is synth
    assert "beta=" in repr(synth)


def test_nsa_takes_the_patch_from_the_recorded_donor_at_the_recorded_place() -> None:
    # image i: vertical stripes of its own frequency. Poisson blending keeps the donor's gradients, so inside the
    # region the horizontal gradient must match the donor's at the recorded source place (scale 1).
    b, size = 5, 96
    xs = torch.arange(size) + 0.5
    images = torch.stack([(0.5 + 0.3 * torch.sin(2 * torch.pi * (i + 3) * xs / size)).expand(3, size, size)
                          for i in range(b)])  # fmt: skip
    synth = NSASynthesizer(change_threshold=0.0, patch_size=(0.3, 0.4), scale=(1.0, 1.0))
    params = synth.sample_params(images, None, gen(0))
    out = synth.apply(images, params)
    for i in range(b):
        donor = int(params["source_index"][i, 0])
        shift = params["source_centre"][i, 0] - params["centre"][i, 0]
        region = out.masks[i, 0].bool()
        region[:, -1] = False
        yy, xx = region.nonzero(as_tuple=True)
        inner = region[yy, (xx + 1).clamp_max(size - 1)]
        yy, xx = yy[inner], xx[inner]
        got = out.images[i, 0, yy, xx + 1] - out.images[i, 0, yy, xx]
        sx = (xx + 0.5 + shift[1]).clamp(0.5, size - 1.5)

        def gradient(j: int) -> torch.Tensor:
            f = 2 * torch.pi * (j + 3) / size
            return torch.sin(f * (sx + 1)) - torch.sin(f * sx)

        scores = [float(torch.corrcoef(torch.stack((got, gradient(j))))[0, 1]) for j in range(b)]
        assert donor != i
        assert max(range(b), key=scores.__getitem__) == donor, f"image {i}: donor {donor}, correlations {scores}"


def test_float64_outside_mask_is_bit_exact() -> None:
    images = torch.rand(3, 3, 40, 40, dtype=torch.float64, generator=gen(0)) * (1 - 1e-9) + 1e-10
    for name in NAMES:
        out = get(name)(images, generator=gen(1))
        outside = (out.masks == 0).expand_as(images)
        assert torch.equal(out.images[outside], images[outside]), name


@pytest.mark.parametrize("size", [8, 16, 32])
def test_perlin_masks_on_tiny_images_are_not_whole_images(size: int) -> None:
    images = torch.rand(64, 3, size, size, generator=gen(2))
    out = PerlinSynthesizer()(images, generator=gen(3))
    area = out.masks.mean((1, 2, 3))
    assert (area < 1.0).float().mean() > 0.9 and out.labels.all()


def test_perlin_area_range_with_tiny_foreground_is_never_empty() -> None:
    fg = torch.zeros(16, 1, 128, 128, dtype=torch.bool)
    fg[:, :, 60:65, 60:65] = True
    out = PerlinSynthesizer(area_range=(0.1, 0.3))(torch.rand(16, 3, 128, 128, generator=gen(0)), fg, gen(1))
    assert out.labels.all() and not (out.masks.bool() & ~fg).any()


def test_empty_batch_returns_empty_result() -> None:
    for name in NAMES:
        out = get(name)(torch.rand(0, 3, 16, 16))
        assert out.images.shape == (0, 3, 16, 16) and out.masks.shape == (0, 1, 16, 16) and out.labels.numel() == 0


def test_anomalib_perlin_samples_replay_alone(photos: torch.Tensor) -> None:
    synth = get("anomalib-perlin")
    params = synth.sample_params(photos, None, gen(0))
    whole = synth.apply(photos, params)
    alone = synth.apply(photos[2:3], {"seed": params["seed"][2:3]})
    assert torch.equal(whole.images[2:3], alone.images)


def test_nsa_pastes_unblended_when_the_blend_is_invisible() -> None:
    # a flat image and a donor that differs only by a constant: Poisson blending removes constants entirely
    images = torch.stack((torch.full((3, 64, 64), 0.3), torch.full((3, 64, 64), 0.6)))
    blended_only = NSASynthesizer(min_visible=0.0)(images, generator=gen(0))
    assert not blended_only.labels.any(), "the blend alone leaves nothing visible"
    with_fallback = NSASynthesizer()(images, generator=gen(0))
    assert with_fallback.labels.all()
    changed = (with_fallback.images - images).abs().amax(1, keepdim=True) > 0
    assert torch.equal(changed, with_fallback.masks > 0)


def test_registry_metadata_replaces_name_lists() -> None:
    from anomalib_synth.synthesizers import names

    assert names(kind="classical") == ["anomalib-perlin", "cutpaste", "nsa", "perlin", "scar"]
    assert names(kind="diffusion") == names(requires_weights=True) == ["anomalyany", "anomalycontrol", "inpainting",
                                                                       "xfusion"]  # fmt: skip
    assert {n for n in names() if get_class(n).texture_argument} == {"perlin", "anomalib-perlin"}
    assert all(get_class(n).cost for n in names())


def test_a_third_party_synthesizer_registers_through_an_entry_point(monkeypatch, tmp_path) -> None:
    import importlib.metadata
    import sys

    from anomalib_synth.synthesizers import registry

    (tmp_path / "my_plugin.py").write_text(
        "from anomalib_synth.synthesizers.cutpaste import CutPasteSynthesizer\n"
        "class Mine(CutPasteSynthesizer):\n    description = 'a plugin'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.metadata.EntryPoint("my-synth", "my_plugin:Mine", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [entry] if group == entry.group else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_LAZY", dict(registry._LAZY))
    assert "my-synth" in registry.available()
    out = registry.get("my-synth")(torch.rand(2, 3, 32, 32), generator=gen(0))
    assert out.labels.all() and type(registry.get("my-synth")).__name__ == "Mine"
    sys.modules.pop("my_plugin", None)


@pytest.mark.parametrize(("name", "kwargs"), [("cutpaste", {}), ("cutpaste", {"source": "other"}), ("scar", {}),
                                             ("nsa", {})])  # fmt: skip
def test_source_patches_come_from_the_foreground(name: str, kwargs: dict, object_on_background) -> None:
    """Objects on a plain background: patches are cut from the object, so no plain background is pasted onto it."""
    images, truth = object_on_background
    images, truth = images.repeat(3, 1, 1, 1), truth.repeat(3, 1, 1, 1)
    pasted = {}
    for source_foreground in (True, False):
        synth = get(name, source_foreground=source_foreground, **kwargs)
        counts = torch.zeros(2, dtype=torch.long)
        for seed in range(4):
            params = synth.sample_params(images, truth, gen(seed))
            if source_foreground:  # every source centre lies on its donor's object
                centre = params["source_centre"].long()
                donor = params["source_index"]
                assert truth[donor, 0, centre[..., 0], centre[..., 1]].all()
                half = torch.stack((params["height"], params["width"]), -1) / 2  # and the patch fits in the image
                assert ((params["source_centre"] >= half) & (params["source_centre"] <= 96 - half)).all()
            out = synth.apply(images, params)
            counts += torch.stack([c.sum() for c in metrics.background_pasted_counts(out, images)])
        pasted[source_foreground] = float(counts[0] / counts[1])
    if name == "nsa":  # the Poisson blend takes its boundary from the target, background at the object's edge
        assert pasted[True] < 0.02
    else:
        assert pasted[True] == 0.0 and pasted[False] > 0.3


@pytest.mark.parametrize("name", ["cutpaste", "scar", "nsa"])
def test_source_foreground_keeps_texture_outputs(name: str, photos: torch.Tensor) -> None:
    """A foreground that is the whole image (a texture) gives the output of a patch cut from anywhere."""
    full = torch.ones(len(photos), 1, *photos.shape[-2:], dtype=torch.bool)
    a = get(name, num_defects=(1, 3))(photos, fg_masks=full, generator=gen(5))
    b = get(name, num_defects=(1, 3), source_foreground=False)(photos, fg_masks=full, generator=gen(5))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="source_foreground must be True or False, got 'no'"):
        get(name, source_foreground="no")


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_images_give_the_contiguous_result(name: str, photos: torch.Tensor) -> None:
    """Synthesizers index pixels through flat views: a channels-last or strided batch must give the same result."""
    images = photos[:2]
    ref = get(name)(images, generator=gen(5))
    for layout in (images.contiguous(memory_format=torch.channels_last), images.transpose(-1, -2).transpose(-1, -2),
                   torch.cat((images, images), -1)[..., : images.shape[-1]]):  # fmt: skip
        out = get(name)(layout, generator=gen(5))
        assert torch.equal(out.images, ref.images) and torch.equal(out.masks, ref.masks), layout.stride()


@pytest.mark.parametrize("size", [(256, 256), (200, 130), (100, 100), (257, 300)])
def test_perlin_coarse_foreground_shortcut_equals_the_area_majority(size: tuple[int, int]) -> None:
    """With ``foreground="auto"`` perlin takes the noise-size foreground from the coarse estimate; the masks equal
    those made from the area majority of the full-size estimate."""
    images = torch.full((3, 3, *size), 0.2)
    colour = torch.rand(3, 3, 1, 1, generator=gen(0))
    images[:, :, size[0] // 4 : size[0] * 3 // 4, size[1] // 5 : size[1] // 2] = colour
    synth = get("perlin")
    params = synth.sample_params(images, None, gen(1))
    assert ("fg_noise" in params) == (size != (257, 300)), "the shortcut applies where the blocks nest exactly"
    if "fg_noise" in params:
        from anomalib_synth.synthesizers.ops import area_majority

        assert torch.equal(params["fg_noise"], area_majority(params["fg"], params["fg_noise"].shape[-2:]))
    fast = synth._mask(params, size)
    params.pop("fg_noise", None)
    slow = synth._mask(params, size)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    b, at = fast
    assert len(at) and bool(params["fg"].reshape(-1)[b * size[0] * size[1] + at].all()), "inside the foreground"


@pytest.mark.parametrize("foreground", ["auto", "none"])
def test_perlin_sample_masks_are_the_masks_of_the_call(photos: torch.Tensor, foreground: str) -> None:
    """``sample_masks`` (the mask generator other synthesizers borrow) draws the masks the full call would make,
    on textures and on an object on a plain background."""
    obj = torch.full((3, 3, 256, 256), 0.9)
    obj[:, :, 60:200, 80:180] = torch.rand(3, 3, 140, 100, generator=gen(2)) * 0.5
    synth = get("perlin", foreground=foreground)
    textures = F.interpolate(photos[:3], size=(256, 256), mode="bilinear", align_corners=False).clamp(0, 1)
    for images in (textures, obj):
        masks = synth.sample_masks(images, None, gen(4))
        assert masks.dtype == torch.bool and masks.shape == (3, 1, 256, 256)
        assert torch.equal(masks, synth(images, generator=gen(4)).masks > 0.5)


@pytest.mark.parametrize("size", [(256, 256), (512, 384), (200, 136)])
def test_perlin_cell_threshold_gives_the_output_of_the_dense_threshold(
    photos: torch.Tensor, size: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """perlin's masks and images equal those of upsampling the noise to full size and thresholding it (factors 2, 4
    and 1; textures and an object, where the foreground filter applies), pixel order included."""
    import anomalib_synth.synthesizers.perlin as perlin_module
    from anomalib_synth.synthesizers.ops import mask_positions

    def dense(values, threshold, out_size):
        return mask_positions(F.interpolate(values, size=out_size, mode="bilinear", align_corners=False) >= threshold)

    textures = F.interpolate(photos[:3], size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    obj = torch.full((3, 3, *size), 0.9)
    obj[:, :, size[0] // 4 : size[0] * 3 // 4, size[1] // 3 : size[1] * 2 // 3] = 0.3
    synth = get("perlin")
    for images in (textures, obj):
        fast = synth(images, generator=gen(6))
        with monkeypatch.context() as patch:
            patch.setattr(perlin_module, "upsampled_mask_positions", dense)
            slow = synth(images, generator=gen(6))
        assert torch.equal(fast.masks, slow.masks) and torch.equal(fast.images, slow.images)
        assert bool(fast.labels.all())


@pytest.mark.parametrize("kwargs", [{}, {"area_range": (0.05, 0.2)}])
def test_perlin_on_a_batch_of_textures_equals_an_everywhere_foreground(photos: torch.Tensor, kwargs: dict) -> None:
    """A batch with no plain background skips the foreground passes; the result equals an explicit all-true mask,
    including the rescue of a mask that the full-size threshold would leave empty."""
    textures = photos[:3]
    synth = get("perlin", **kwargs)
    assert "fg_everywhere" in synth.sample_params(textures, None, gen(0))
    everywhere = torch.ones_like(textures[:, :1], dtype=torch.bool)
    for seed in range(3):
        auto, given = synth(textures, generator=gen(seed)), synth(textures, fg_masks=everywhere, generator=gen(seed))
        assert torch.equal(auto.images, given.images) and torch.equal(auto.masks, given.masks)
    # a threshold at the single highest noise-size pixel: upsampling averages it away, so only the rescue keeps
    # the masks from being empty
    peak = get("perlin", min_area=1e-9, threshold=0.99)
    large = F.interpolate(textures, size=(256, 256), mode="bilinear", align_corners=False).clamp(0, 1)  # noise at 128
    assert not peak_none(large).flatten(1).any(1).any(), "without the rescue the masks are empty"
    masks = peak(large, generator=gen(0)).masks
    assert masks.flatten(1).any(1).all(), "every mask rescued"
    everywhere = torch.ones_like(large[:, :1], dtype=torch.bool)
    assert torch.equal(masks, peak(large, fg_masks=everywhere, generator=gen(0)).masks)



@pytest.mark.parametrize("name", ["cutpaste", "scar", "nsa"])
def test_patch_methods_on_a_batch_of_textures_equal_an_everywhere_foreground(photos: torch.Tensor, name: str) -> None:
    """A batch with no plain background builds no mask: the centres are drawn as from an all-true one, and the
    output equals the one an explicit all-true mask gives."""
    from anomalib_synth.synthesizers.placement import resolve_foreground_or_everywhere

    textures = photos[:3]
    assert resolve_foreground_or_everywhere(textures, None, "auto") == (None, True, None)
    everywhere = torch.ones_like(textures[:, :1], dtype=torch.bool)
    synth = get(name, num_defects=(1, 3))
    for seed in range(3):
        auto, given = synth(textures, generator=gen(seed)), synth(textures, fg_masks=everywhere, generator=gen(seed))
        assert torch.equal(auto.images, given.images) and torch.equal(auto.masks, given.masks), seed
        assert auto.params == given.params


@pytest.mark.parametrize("name", ["cutpaste", "scar", "nsa"])
def test_patch_methods_on_objects_draw_from_the_coarse_blocks_as_from_the_full_mask(name: str, object_on_background) -> None:
    """Under ``"auto"`` the centres are drawn from the coarse foreground blocks; the output equals the one the same
    estimate, given as a full-size ``fg_masks``, gives."""
    from anomalib_synth.synthesizers.placement import estimate_foreground, resolve_foreground_or_everywhere

    images, _ = object_on_background
    found = resolve_foreground_or_everywhere(images, None, "auto")
    assert found.blocks is not None and not found.everywhere
    assert torch.equal(upsample_nearest(found.blocks[0], found.blocks[1], images.shape[-2:]), found.mask)
    synth = get(name, num_defects=(1, 3))
    given = estimate_foreground(images)
    for seed in range(3):
        auto, full = synth(images, generator=gen(seed)), synth(images, fg_masks=given, generator=gen(seed))
        assert torch.equal(auto.images, full.images) and torch.equal(auto.masks, full.masks), seed
        assert auto.params == full.params

def peak_none(images: torch.Tensor) -> torch.Tensor:
    return get("perlin", foreground="none", min_area=1e-9, threshold=0.99)(images, generator=gen(0)).masks
