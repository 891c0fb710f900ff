"""Shared fixtures: small real photos shipped with scikit-image (no data set needed)."""

from __future__ import annotations

import pytest
import torch

from anomalib_synth.io import builtin_photo, resize

PHOTOS = ("brick", "grass", "gravel", "coffee")


@pytest.fixture(scope="session")
def photos() -> torch.Tensor:
    """Four real photos, ``[4, 3, 96, 96]`` in ``[0, 1]``."""
    return torch.stack([resize(builtin_photo(name), (96, 96)) for name in PHOTOS])


@pytest.fixture(scope="session")
def object_on_background() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 'objects' (textured discs) on a plain dark background, and their true foreground masks."""
    size = 96
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    texture = resize(builtin_photo("gravel"), (size, size))
    images, masks = [], []
    for cy, cx, r in ((40, 50, 28), (55, 45, 22)):
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).float()
        images.append(0.05 + disc * (0.3 + 0.6 * texture))
        masks.append(disc.bool().unsqueeze(0))
    return torch.stack(images).clamp(0, 1), torch.stack(masks)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Tiny random diffusion and CLIP models saved with ``save_pretrained`` (``sd``, ``sd-inpainting``, ``clip``)."""
    from anomalib_synth.testing import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
