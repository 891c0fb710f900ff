"""A per-sample mix of synthesizers: the name ``perlin+cutpaste+nsa`` draws, for each sample, one of them.

Each member synthesizes the samples drawn for it, with the same generator (one draw of the member per sample
first), so the mix is as reproducible as its members. :func:`build` makes a synthesizer or a mix from such a name
(the evaluation harness and the models of :mod:`anomalib_synth.models` both use it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import SynthesisResult, Synthesizer, make_generator
from .registry import get, get_class

__all__ = ["SEPARATOR", "MixSynthesizer", "build"]

SEPARATOR = "+"


class MixSynthesizer(Synthesizer):
    """Each sample is made by one of ``members``, drawn uniformly (or with ``weights``).

    Args:
        members (Sequence[Synthesizer]): the synthesizers.
        weights (Sequence[float] | None): relative draw probabilities. Defaults to uniform.
    """

    name = "mix"
    description = "a per-sample mix of synthesizers"

    def __init__(self, members: Sequence[Synthesizer], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            msg = "a mix needs at least one synthesizer"
            raise ValueError(msg)
        self.members = torch.nn.ModuleList(members)
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * len(members))

    def forward(self, images: Tensor, fg_masks: Tensor | None = None,
                generator: torch.Generator | None = None) -> SynthesisResult:  # fmt: skip
        generator = make_generator(generator)
        b = images.shape[0]
        choice = torch.multinomial(self.weights, b, replacement=True, generator=generator)
        out = images.clone()
        masks = images.new_zeros(b, 1, *images.shape[-2:], dtype=torch.float32)
        labels = torch.zeros(b, dtype=torch.bool, device=images.device)
        params: list[dict] = [{} for _ in range(b)]
        for index, member in enumerate(self.members):
            rows = (choice == index).nonzero().flatten()
            if rows.numel() == 0:
                continue
            fg = None if fg_masks is None else fg_masks[rows.to(fg_masks.device)]
            result = member(images[rows.to(images.device)], fg, generator=generator)
            out[rows] = result.images
            masks[rows] = result.masks
            labels[rows] = result.labels
            for j, row in enumerate(rows.tolist()):
                params[row] = {"member": member.name, **(result.params[j] if result.params else {})}
        return SynthesisResult(out, masks, labels, params)

    def config(self) -> dict:
        return {"members": [m.name for m in self.members], "weights": self.weights.tolist()}


def build(name: str, texture_dir: str | None = None, **kwargs: Any) -> Synthesizer:
    """The synthesizer ``name``, with ``texture_dir`` given to each one that takes an anomaly source; ``a+b+c`` is a
    per-sample :class:`MixSynthesizer` of them (``kwargs`` go to every member)."""
    if SEPARATOR in name:
        return MixSynthesizer([build(part, texture_dir, **kwargs) for part in name.split(SEPARATOR)])
    argument = get_class(name).texture_argument
    if texture_dir is not None and argument is not None:
        kwargs.setdefault(argument, texture_dir)
    return get(name, **kwargs)
