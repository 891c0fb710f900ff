"""Generation-quality metrics: IC-LPIPS clustering on crafted inputs, background preservation, weights errors, and
the `score` command."""

from __future__ import annotations

import json
import math
from urllib.error import URLError

import pytest
import torch

from anomalib_synth import metrics as M
from anomalib_synth.cli import main
from anomalib_synth.synthesizers.diffusion.loading import ModelNotFoundError


def _flat(values: list[float]) -> torch.Tensor:
    """One 1x1x1 'image' per value, so that pixel_distance is the squared difference of the values."""
    return torch.tensor(values).view(-1, 1, 1, 1)


def test_ic_lpips_clusters_around_real_images_and_averages_pairs() -> None:
    real = _flat([0.0, 1.0])
    generated = _flat([0.1, 0.3, 0.2, 0.9, 0.6])  # cluster of 0: {0.1, 0.3, 0.2}; of 1: {0.9, 0.6}
    cluster0 = ((0.1 - 0.3) ** 2 + (0.1 - 0.2) ** 2 + (0.3 - 0.2) ** 2) / 3
    cluster1 = (0.9 - 0.6) ** 2
    assert M.ic_lpips(generated, real, M.pixel_distance) == pytest.approx((cluster0 + cluster1) / 2, rel=1e-5)
    # a singleton cluster is skipped; no cluster of two -> NaN
    assert M.ic_lpips(_flat([0.1, 0.2, 0.95]), real, M.pixel_distance) == pytest.approx(0.01, rel=1e-4)
    assert math.isnan(M.ic_lpips(_flat([0.1, 0.9]), real, M.pixel_distance))
    identical = _flat([0.2, 0.2, 0.2])
    assert M.ic_lpips(identical, real, M.pixel_distance) == 0.0, "no diversity"
    with pytest.raises(ValueError, match="needs generated and real"):
        M.ic_lpips(generated[:0], real, M.pixel_distance)


def test_background_preservation_counts_only_outside_the_mask() -> None:
    inputs = torch.full((2, 3, 8, 8), 0.5)
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    masks[:, :, 2:4, 2:4] = True
    generated = torch.where(masks, torch.ones_like(inputs), inputs)
    clean = M.background_preservation(generated, inputs, masks, M.pixel_distance)
    assert clean == {"background_psnr": math.inf, "background_lpips": 0.0}
    damaged = generated.clone()
    damaged[:, :, 6:, 6:] += 0.1  # 4 of 60 outside pixels changed by 0.1
    out = M.background_preservation(damaged, inputs, masks, M.pixel_distance)
    assert out["background_psnr"] == pytest.approx(-10 * math.log10(4 * 0.01 / 60), rel=1e-4)
    assert out["background_lpips"] == pytest.approx(4 * 0.01 / 64, rel=1e-4)


def test_missing_weights_raise_a_clear_error(monkeypatch, tmp_path) -> None:
    def offline(*_args, **_kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelNotFoundError, match="alexnet-owt-7be5be79.pth"):
        M.LPIPSDistance("alex")
    with pytest.raises(ModelNotFoundError, match="weights-inception-2015-12-05"):
        M.kernel_inception_distance(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32))


def test_score_command(tmp_path, capsys) -> None:
    from PIL import Image

    from anomalib_synth.io import builtin_photo, resize, to_uint8

    generated, real = tmp_path / "gen", tmp_path / "real"
    assert main(["generate", "builtin:brick,coffee", str(generated), "-s", "cutpaste", "-n", "4", "--size", "32",
                 "32", "-q"]) == 0  # fmt: skip
    real.mkdir()
    for name in ("gravel", "grass"):
        Image.fromarray(to_uint8(resize(builtin_photo(name), (32, 32)))).save(real / f"{name}.png")
    code = main(["score", str(generated), "--real", str(real), "--metrics", "ic-lpips,background", "--distance",
                 "pixel", "--size", "32"])  # fmt: skip
    assert code == 0
    scores = json.loads((generated / "scores.json").read_text())
    assert scores["n_generated"] == 4 and scores["n_real"] == 2 and scores["ic_lpips"] >= 0
    assert math.isinf(scores["background_psnr"]), "cutpaste keeps the background bit-exact (PNG round trip)"
    assert "| ic_lpips" in (generated / "scores.md").read_text() and "ic_lpips" in capsys.readouterr().out
    assert main(["score", str(real), "--real", str(real)]) == 2, "a folder without manifest is refused"
