"""The synthesizer contract, checked on values for every registered synthesizer (classical and diffusion).

As diffusers' ``PipelineTesterMixin``: one suite, parametrized over the whole registry. The diffusion synthesizers
run on tiny random-weight models (``anomalib_synth.testing``), which prove the mechanics, not image quality.
What a synthesizer legitimately does differently is declared on its class, never special-cased here:
``keeps_pixels_outside_mask`` / ``affected_region`` (AnomalyControl's blurred halo) and
``anomalous_inside_any_foreground`` (anomalib's baseline knows no foreground).

A new synthesizer is covered by adding its module: classical ones are built with their defaults; one that needs
weights adds a builder to :data:`BUILDERS` (the meta-test below fails until it does).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gen
from PIL import Image
from tiny_data import ANOMALYANY_FAST

from anomalib_synth import metrics
from anomalib_synth.io import builtin_photo, resize, to_uint8
from anomalib_synth.synthesizers import Synthesizer, available, get, get_class, names

SMALL_STEPS = {"num_inference_steps": 3}


def _references(folder: Path) -> Path:
    """Two reference defects with their masks (``<stem>_mask.png``), as a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:26, 8:22] = 255
    for name in ("brick", "grass"):
        Image.fromarray(to_uint8(resize(builtin_photo(name), (40, 40)))).save(folder / f"a_crack_in_{name}.png")
        Image.fromarray(mask).save(folder / f"a_crack_in_{name}_mask.png")
    return folder


def _xfusion(tiny: dict, tmp: Path) -> Synthesizer:
    from anomalib_synth.synthesizers.diffusion.xfusion import XFusionModel

    torch.manual_seed(0)
    adapter = XFusionModel(tiny["sd"], tiny["clip"], num_tokens=2).save_adapter(tmp / "xfusion-adapter")
    return get("xfusion", adapter=adapter, references=_references(tmp / "refs"), category="bottle", **SMALL_STEPS)


def _anomalycontrol(tiny: dict, tmp: Path) -> Synthesizer:
    from anomalib_synth.synthesizers.diffusion.anomalycontrol import AnomalyControlModel

    torch.manual_seed(0)
    model = AnomalyControlModel(tiny["sd-inpainting"], tiny["blip2"], image_embed_dim=48, asea_steps=1)
    adapter = model.save_adapter(tmp / "control-adapter")
    return get("anomalycontrol", adapter=adapter, references=_references(tmp / "refs"), category="bottle",
               asea_steps=1, **SMALL_STEPS)  # fmt: skip


BUILDERS: dict[str, Callable[[dict, Path], Synthesizer]] = {
    "inpainting": lambda tiny, tmp: get("inpainting", model=tiny["sd-inpainting"], category="bottle", **SMALL_STEPS),
    "anomalyany": lambda tiny, tmp: get(
        "anomalyany", model=tiny["sd"], clip_model=tiny["clip"], category="bottle", **ANOMALYANY_FAST
    ),  # fmt: skip
    "xfusion": _xfusion,
    "anomalycontrol": _anomalycontrol,
}
"""How to build the synthesizers that need weights, on the tiny models (the others are built with defaults)."""

NAMES = sorted(available())


def test_every_registered_synthesizer_is_covered() -> None:
    uncovered = [name for name in NAMES if get_class(name).requires_weights and name not in BUILDERS]
    assert not uncovered, f"add a builder on the tiny models to BUILDERS for {uncovered}"
    assert {"perlin", "cutpaste", "scar", "nsa", "anomalib-perlin", "inpainting", "anomalyany", "xfusion",
            "anomalycontrol"} <= set(NAMES)  # fmt: skip


@pytest.fixture(scope="module")
def built(request, tmp_path_factory) -> Callable[[str], Synthesizer]:
    """Each synthesizer built once per module (the diffusion ones load their tiny models once)."""
    cache: dict[str, Synthesizer] = {}

    def build(name: str) -> Synthesizer:
        if name not in cache:
            if get_class(name).requires_weights:
                tiny = request.getfixturevalue("tiny")
                cache[name] = BUILDERS[name](tiny, tmp_path_factory.mktemp(name))
            else:
                cache[name] = get(name)
        return cache[name]

    return build


def _images(name: str, photos: torch.Tensor) -> torch.Tensor:
    """Four 96 px photos for the classical synthesizers, two for the (slower) diffusion ones."""
    return photos[:2] if get_class(name).requires_weights else photos


def _coverage(out, images: torch.Tensor) -> torch.Tensor:
    """Per sample: the fraction of mask pixels that changed by more than one grey level."""
    changed = (out.images.float() - images.float()).abs().amax(1, keepdim=True) > 1 / 255
    mask = out.masks.bool()
    return (changed & mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def _outside(synth: Synthesizer, out) -> torch.Tensor:
    return ~synth.affected_region(out.masks).expand_as(out.images)


@pytest.mark.parametrize("name", NAMES)
def test_result_contract(name: str, built, photos: torch.Tensor) -> None:
    images = _images(name, photos)
    before = images.clone()
    out = built(name)(images, generator=gen(0))
    assert torch.equal(images, before), "the input tensor was written in place"
    b = len(images)
    assert out.images.shape == images.shape and out.images.dtype == images.dtype
    assert out.masks.shape == (b, 1, 96, 96) and out.masks.dtype == torch.float32
    assert set(out.masks.unique().tolist()) <= {0.0, 1.0}
    assert out.labels.dtype == torch.bool
    assert torch.equal(out.labels, out.masks.flatten(1).amax(1) > 0)
    assert out.labels.all(), "every default synthesizer makes every sample anomalous on textured photos"
    assert len(out.params) == b
    json.dumps(out.params)  # manifests need JSON
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_pixels_outside_the_affected_region_are_unchanged(name: str, built, photos: torch.Tensor) -> None:
    synth, images = built(name), _images(name, photos)
    out = synth(images, generator=gen(1))
    outside = _outside(synth, out)
    assert torch.equal(out.images[outside], images[outside])
    if synth.keeps_pixels_outside_mask:
        assert torch.isinf(metrics.background_psnr(out, images)).all()
        assert torch.equal(synth.affected_region(out.masks), out.masks.bool())
    else:  # a declared halo is a halo: it reaches a little way beyond the mask, not over the image
        assert synth.affected_region(out.masks).float().mean() < 2 * out.masks.mean() + 0.1


@pytest.mark.parametrize("name", NAMES)
def test_inside_the_mask_changed_visibly(name: str, built, photos: torch.Tensor) -> None:
    images = _images(name, photos)
    out = built(name)(images, generator=gen(2))
    assert (metrics.anomaly_visibility(out, images) > 0.02).all()
    coverage = _coverage(out, images)
    assert (coverage > 0.6).all(), f"the mask claims pixels that did not change: {coverage.tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output_different_seed_different_output(name: str, built, photos: torch.Tensor) -> None:
    synth, images = built(name), _images(name, photos)
    a, b, c = synth(images, generator=gen(7)), synth(images, generator=gen(7)), synth(images, generator=gen(8))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and a.params == b.params
    assert not torch.equal(a.images, c.images) and not torch.equal(a.masks, c.masks)


@pytest.mark.parametrize("name", NAMES)
def test_apply_replays_sampled_params(name: str, built, photos: torch.Tensor) -> None:
    synth, images = built(name), _images(name, photos)
    params = synth.sample_params(images, None, gen(4))
    first, second = synth.apply(images, params), synth.apply(images, params)
    assert torch.equal(first.images, second.images) and torch.equal(first.masks, second.masks)
    assert torch.equal(first.images, synth(images, generator=gen(4)).images)


@pytest.mark.parametrize("name", NAMES)
def test_global_rng_is_not_used(name: str, built, photos: torch.Tensor) -> None:
    synth, images = built(name), _images(name, photos)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    synth(images, generator=gen(0))
    synth(images)  # no generator: a private one is seeded from OS entropy
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", NAMES)
def test_grayscale_images(name: str, built, photos: torch.Tensor) -> None:
    synth = built(name)
    gray = _images(name, photos).mean(1, keepdim=True)
    out = synth(gray, generator=gen(5))
    assert out.images.shape == gray.shape
    outside = _outside(synth, out)
    assert torch.equal(out.images[outside], gray[outside])
    assert out.labels.all() and _coverage(out, gray).min() > 0.6, "gray images change inside the mask"


@pytest.mark.parametrize("name", NAMES)
def test_float64_and_non_square_images(name: str, built, photos: torch.Tensor) -> None:
    synth = built(name)
    images = _images(name, photos)[:, :, :, :80].double()
    out = synth(images, generator=gen(6))
    assert out.images.dtype == torch.float64 and out.images.shape == images.shape
    assert out.masks.shape == (len(images), 1, 96, 80)
    outside = _outside(synth, out)
    assert torch.equal(out.images[outside], images[outside]), "float64 pixels outside are the input's, bit-exact"
    assert out.labels.all() and _coverage(out, images).min() > 0.6, "float64 images change inside the mask"



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", names(kind="classical"))
def test_half_precision_pixels_outside_the_mask_are_the_inputs(name: str, dtype: torch.dtype, photos) -> None:
    """README: pixels outside the mask are never changed, bit-exact, for any float dtype."""
    images = photos.to(dtype)
    out = get(name)(images, generator=gen(7))
    assert out.images.dtype == dtype and out.images.shape == images.shape
    outside = (out.masks == 0).expand_as(images)
    assert torch.equal(out.images[outside], images[outside])
    assert out.labels.any() and not torch.equal(out.images, images)

def test_a_synthesizer_computing_in_float32_keeps_float64_pixels_outside_bit_exact(photos: torch.Tensor) -> None:
    """The base class's guarantee for any new synthesizer: a result computed in float32 (as diffusion models do) is
    put back together with the input's own float64 values outside the mask."""

    class Float32Inside(Synthesizer):
        name = "float32-inside"

        def sample_params(self, images, fg_masks, generator):
            return {}

        def apply(self, images, params):
            masks = torch.zeros_like(images[:, :1], dtype=torch.bool)
            masks[..., 10:30, 20:40] = True
            return self._result(images, torch.where(masks, 0.5, images.float()), masks, params, ())

    images = photos.double() * (1 - 1e-9)  # values float32 cannot hold
    out = Float32Inside()(images, generator=gen(0))
    outside = ~out.masks.bool().expand_as(images)
    assert out.images.dtype == torch.float64 and torch.equal(out.images[outside], images[outside])
    assert out.labels.all()


@pytest.mark.parametrize("name", NAMES)
def test_masks_stay_inside_given_foreground(name: str, built, photos: torch.Tensor) -> None:
    synth, images = built(name), _images(name, photos)
    fg = torch.zeros(len(images), 1, 96, 96, dtype=torch.bool)
    fg[:, :, 20:70, 30:80] = True
    out = synth(images, fg_masks=fg, generator=gen(9))
    assert not (out.masks.bool() & ~fg).any()
    if synth.anomalous_inside_any_foreground:
        assert out.labels.all()


@pytest.mark.parametrize("name", NAMES)
def test_empty_foreground_gives_normal_samples(name: str, built, photos: torch.Tensor) -> None:
    synth, images = built(name), _images(name, photos)
    fg = torch.zeros(len(images), 1, 96, 96)
    fg[0, :, 10:60, 10:60] = 1
    out = synth(images, fg_masks=fg, generator=gen(0))
    assert not out.labels[1:].any() and torch.equal(out.images[1:], images[1:])
    if synth.anomalous_inside_any_foreground:
        assert out.labels[0]


@pytest.mark.parametrize("name", NAMES)
def test_bad_images_raise_the_documented_error(name: str, built, photos: torch.Tensor) -> None:
    synth = built(name)
    for images, message in (
        ((photos[:1] * 255).to(torch.uint8), "floating point"),
        (photos[:1] * 255, r"in \[0,1\]"),
        (photos[:1, :2], "1 or 3 channels"),
        (torch.cat([photos[:1], photos[:1, :1]], 1), "1 or 3 channels"),  # RGBA
        (photos[0], "rank 4"),
    ):
        with pytest.raises(ValueError, match=message):
            synth(images, generator=gen(0))
    with pytest.raises(ValueError, match="fg_masks must have shape"):
        synth(photos[:1], fg_masks=torch.ones(1, 1, 8, 8), generator=gen(0))


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_returns_an_empty_result(name: str, built, photos: torch.Tensor) -> None:
    out = built(name)(photos[:0], generator=gen(0))
    assert out.images.shape == (0, 3, 96, 96) and out.masks.shape == (0, 1, 96, 96) and out.labels.shape == (0,)


@pytest.mark.parametrize("name", NAMES)
def test_config_rebuilds_the_same_synthesizer(name: str, built, photos: torch.Tensor) -> None:
    synth, images = built(name), _images(name, photos)[:1]
    config = synth.config()
    json.dumps(config)  # manifests and cache keys need JSON
    twin = type(synth)(**config)
    assert twin.config() == config
    a, b = synth(images, generator=gen(11)), twin(images, generator=gen(11))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)


@pytest.mark.parametrize("name", NAMES)
def test_default_placement_keeps_defects_on_the_object(name: str, built, object_on_background) -> None:
    """Without ``fg_masks``, the one default (``foreground="auto"``) puts every change on the object, not on the
    plain background (textured photos cannot show this: their foreground is the whole image)."""
    synth = built(name)
    images, disc = object_on_background
    out = synth(images, generator=gen(12))
    if "foreground" not in synth.config():  # anomalib's baseline has no placement option: it is declared so
        assert not synth.anomalous_inside_any_foreground
        return
    assert synth.config()["foreground"] == "auto"
    assert out.labels.all() and not (out.masks.bool() & ~disc).any(), "a defect on the background"
    assert torch.equal(out.images[~disc.expand_as(images)], images[~disc.expand_as(images)]) or (
        not synth.keeps_pixels_outside_mask
    )
