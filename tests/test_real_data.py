"""The routes on real MVTec AD bottle images (saturated white background, 900 px): skipped without the shared data.

Set ``ANOMALIB_SYNTH_DATA`` to the folder that holds ``mvtec_ad/`` (default: ``../shared/data`` next to the repo).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import Resize

from anomalib_synth.generate import generate
from anomalib_synth.seeding import derive_seed

os.environ.setdefault("HF_HUB_OFFLINE", "1")


REPOSITORY = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    """``ANOMALIB_SYNTH_DATA`` when set, else ``../shared/data`` relative to the repository: never a machine path, so
    whether these tests run depends on the checkout and the environment, not on the machine."""
    return Path(os.environ.get("ANOMALIB_SYNTH_DATA") or REPOSITORY / ".." / "shared" / "data")


DATA = _data_root()
pytestmark = pytest.mark.skipif(not (DATA / "mvtec_ad" / "bottle").is_dir(), reason="real MVTec data not present")


def _mvtec(**kwargs):
    from anomalib.data import MVTecAD

    return MVTecAD(root=DATA / "mvtec_ad", category="bottle", num_workers=0, **kwargs)


def _engine(tmp_path: Path, **kwargs):
    from anomalib.engine import Engine

    return Engine(max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path / "results"), logger=False,
                  limit_train_batches=2, limit_val_batches=0, **kwargs)  # fmt: skip


def _pre_processor(size: int):
    from anomalib.pre_processing import PreProcessor

    return PreProcessor(transform=Resize((size, size)))


def test_real_bottle_batches_overshoot_one_after_anomalibs_resize() -> None:
    """The fixture in test_robustness reproduces this: saturated white becomes slightly more than 1."""
    from anomalib.data.utils.image import read_image

    image = read_image(DATA / "mvtec_ad" / "bottle" / "train" / "good" / "000.png", as_tensor=True)
    assert float(Resize((256, 256))(image).max()) > 1.0


@pytest.mark.slow
def test_online_datamodule_on_real_bottle(tmp_path) -> None:
    from anomalib.models import Padim
    from lightning.pytorch import Callback

    from anomalib_synth.data import SyntheticAnomalyDataModule

    seen = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((batch.gt_label.clone(), float(batch.image.max()), batch.gt_mask.float().mean()))

    dm = SyntheticAnomalyDataModule(_mvtec(train_batch_size=4, eval_batch_size=4), synthesizer="perlin",
                                    anomaly_ratio=1.0, cache_dir=str(tmp_path / "cache"), seed=0)  # fmt: skip
    model = Padim(backbone="resnet18", layers=["layer1"], n_features=32, pre_trained=False,
                  pre_processor=_pre_processor(256))  # fmt: skip
    _engine(tmp_path, callbacks=[Spy()]).fit(model=model, datamodule=dm)
    assert len(seen) == 2
    assert all(bool(labels.all()) and high <= 1.0 and area > 0 for labels, high, area in seen)


@pytest.mark.slow
def test_draem_route_on_real_bottle(tmp_path) -> None:
    from anomalib.models import Draem

    from anomalib_synth.data import SynthesizerSwap

    (tmp_path / "dtd").mkdir()
    callback = SynthesizerSwap("cutpaste", probability=1.0, seed=0)
    model = Draem(dtd_dir=str(tmp_path / "dtd"), pre_processor=_pre_processor(64))
    from anomalib.engine import Engine

    # barebones: DRAEM's 97 M parameters are not checkpointed (that alone would take most of the test)
    engine = Engine(max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path / "results"), barebones=True,
                    limit_train_batches=1, limit_val_batches=0, callbacks=[callback])  # fmt: skip
    engine.fit(model=model, datamodule=_mvtec(train_batch_size=2))
    assert callback.replaced == "augmenter" and callback.augmenter is model.augmenter
    start = torch.Generator().manual_seed(derive_seed(0, "rank", 0)).get_state()
    assert not torch.equal(model.augmenter.generator.get_state(), start), "the swapped-in synthesizer drew anomalies"


def test_generate_on_real_bottle_every_classical_synthesizer(tmp_path) -> None:
    source = DATA / "mvtec_ad" / "bottle" / "train" / "good"
    for name in ("perlin", "cutpaste", "scar", "nsa", "anomalib-perlin"):
        records = generate(str(source), tmp_path / name, name, num=4, size=(256, 256), progress=False)
        assert len(records) == 4 and all(r["label"] for r in records)
        for r in records:
            mask = np.asarray(Image.open(tmp_path / name / r["mask"])) > 0
            assert mask.any() and r["mask_area"] == pytest.approx(mask.mean(), abs=1e-6)


def test_grayscale_grid_reads_as_gray_and_synthesizes(tmp_path) -> None:
    source = DATA / "mvtec_ad" / "grid" / "train" / "good"
    records = generate(str(source), tmp_path / "grid", "nsa", num=2, size=(128, 128), progress=False, channels=1)
    image = np.asarray(Image.open(tmp_path / "grid" / records[0]["image"]))
    assert image.ndim == 2 and 20 < image.mean() < 235
    assert records.written == 2


def _real_batch(folder: Path, count: int, size: int, channels: int = 3) -> torch.Tensor:
    from anomalib_synth.io import list_images, read_image, resize

    files = list_images(folder)[:count]
    return torch.stack([resize(read_image(f, channels=channels), (size, size)) for f in files])


REAL_SETS = {  # (folder under the data root, channels): an object on a plain background, a gray texture, a toy
    "bottle": ("mvtec_ad/bottle/train/good", 3),
    "grid": ("mvtec_ad/grid/train/good", 1),
    "hazelnut_toy": ("hazelnut_toy/train/good", 3),
}


@pytest.mark.parametrize("dataset", sorted(REAL_SETS))
@pytest.mark.parametrize("name", sorted(__import__("anomalib_synth.synthesizers").synthesizers.available()))
def test_contract_on_real_images(name: str, dataset: str, request, tmp_path) -> None:
    """The contract of tests/test_contract.py on real photos: untouched outside, visible inside, on the object."""
    from test_contract import BUILDERS

    from anomalib_synth.synthesizers import get, get_class
    from anomalib_synth.synthesizers.placement import estimate_foreground

    folder, channels = REAL_SETS[dataset]
    if not (DATA / folder).is_dir():
        pytest.skip(f"{folder} not present")
    cls = get_class(name)
    if cls.requires_weights:  # the tiny random models: mechanics on real pixels, not quality
        synth, images = BUILDERS[name](request.getfixturevalue("tiny"), tmp_path), _real_batch(DATA / folder, 2, 96)
    else:
        synth, images = get(name), _real_batch(DATA / folder, 4, 256)
    if channels == 1:
        images = images[:, :1]
    out = synth(images, generator=torch.Generator().manual_seed(0))
    outside = ~synth.affected_region(out.masks).expand_as(images)
    assert torch.equal(out.images[outside], images[outside])
    assert out.labels.all()
    changed = (out.images - images).abs().amax(1, keepdim=True) > 1 / 255
    mask = out.masks.bool()
    assert ((changed & mask).flatten(1).sum(1) / mask.flatten(1).sum(1) > 0.5).all(), "the mask claims unchanged pixels"
    if synth.config().get("foreground") == "auto":  # the default: defects on the object (a texture: everywhere)
        fg = estimate_foreground(images)
        assert not (mask & ~fg).any(), "a defect on the background"
        if dataset == "bottle":
            assert fg.float().mean() < 0.9, "the bottle's background was found"
