"""A per-sample mix of synthesizers: the harness name ``perlin+cutpaste+nsa`` draws, for each sample, one of them.

Each member synthesizes the samples drawn for it, with the same generator (one draw of the member per sample
first), so the mix is as reproducible as its members.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..synthesizers import SynthesisResult, Synthesizer

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
        from ..synthesizers import make_generator

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
