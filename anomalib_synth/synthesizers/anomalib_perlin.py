"""anomalib's own ``PerlinAnomalyGenerator`` as a :class:`Synthesizer`: the baseline every comparison is made against.

It is what anomalib users have today (DRAEM, DSR, GLASS and ``val_split_mode="synthetic"`` use it), so it runs
unchanged: images are processed one at a time by anomalib's code, which draws from the *global* torch RNG. To keep
this package's rule that a ``torch.Generator`` is the only source of randomness, :meth:`sample_params` draws one seed
per image from the generator and :meth:`apply` runs anomalib's generator on each image inside
``torch.random.fork_rng``, seeded with it: the caller's global RNG state is untouched, the same generator gives the
same output, and a sample can be replayed from its recorded seed.

Grayscale images are expanded to 3 channels for anomalib's colour augmentations and converted back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .base import Params, SynthesisResult, Synthesizer
from .ops import randint, to_grayscale
from .registry import register
from .validation import check_range

MIN_SIDE = 32
"""anomalib draws Perlin scales up to ``2**5`` and fails on a smaller side."""


@register("anomalib-perlin")
class AnomalibPerlinSynthesizer(Synthesizer):
    """anomalib's ``PerlinAnomalyGenerator(probability=1.0)`` wrapped as a synthesizer (the baseline).

    Args:
        texture_dir (str | Path | None, optional): anomaly-source folder (anomalib's ``anomaly_source_path``);
            ``None`` uses anomalib's Perlin-noise source. Defaults to ``None``.
        beta (tuple[float, float], optional): anomalib's ``blend_factor``. Defaults to ``(0.2, 1.0)``.
        rotation (tuple[float, float], optional): anomalib's ``rotation_range``. Defaults to ``(-90, 90)``.
    """

    description = "anomalib's PerlinAnomalyGenerator (per-image loop, global RNG isolated): the baseline"
    cost = "No network. anomalib's per-image loop (the baseline of the speed ratios)."
    anomalous_inside_any_foreground = False  # anomalib places its blob anywhere; the mask is only cut to the foreground
    texture_argument = "texture_dir"
    _param_keys = ("seed",)

    def __init__(
        self,
        texture_dir: str | Path | None = None,
        beta: tuple[float, float] = (0.2, 1.0),
        rotation: tuple[float, float] = (-90.0, 90.0),
    ) -> None:
        super().__init__()
        from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

        from ..io import list_images

        if texture_dir is not None:
            list_images(texture_dir)  # a clear error for a missing or empty folder
        self.texture_dir = None if texture_dir is None else str(texture_dir)
        self.beta = check_range("beta", beta, 0.0, 1.0)
        self.rotation = check_range("rotation", rotation, -360.0, 360.0)
        with torch.random.fork_rng(devices=[]):  # anomalib draws its solarize threshold at construction
            torch.default_generator.manual_seed(0)
            self.generator = PerlinAnomalyGenerator(
                anomaly_source_path=self.texture_dir,
                probability=1.0,
                blend_factor=self.beta,
                rotation_range=self.rotation,
            )

    def sample_params(self, images: Tensor, fg_masks: Tensor | None, generator: torch.Generator) -> Params:
        if min(images.shape[-2:]) < MIN_SIDE:
            msg = (
                f"anomalib's PerlinAnomalyGenerator needs images of at least {MIN_SIDE}x{MIN_SIDE} px (its Perlin "
                f"scale reaches 32), got {tuple(images.shape[-2:])}; use `perlin`, which works at any size"
            )
            raise ValueError(msg)
        params = {"seed": randint(0, 2**62, (images.shape[0],), generator, "cpu")}
        if fg_masks is not None:
            params["fg"] = fg_masks
        return params

    def apply(self, images: Tensor, params: Params) -> SynthesisResult:
        x = images.float()
        gray = x.shape[1] == 1
        rgb = x.expand(-1, 3, -1, -1) if gray else x
        cuda = x.device.type == "cuda"
        outputs, masks = [], []
        with torch.random.fork_rng(devices=[x.device] if cuda else []):
            # anomalib loops over images anyway; one seed per image makes each sample replayable on its own
            for image, seed in zip(rgb, params["seed"].tolist(), strict=True):
                torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it would reseed every GPU
                if cuda:
                    torch.cuda.default_generators[x.device.index or 0].manual_seed(seed)
                out, mask = self.generator(image)
                outputs.append(out)
                masks.append(mask)
        out, masks = torch.stack(outputs), torch.stack(masks) > 0.5
        if "fg" in params:  # anomalib knows no foreground: cut its mask to it
            masks &= params["fg"]
        out = to_grayscale(out) if gray else out
        out = torch.where(masks, out.clamp(0, 1), x)
        return self._result(images, out, masks, params, self._param_keys)
