"""A compact U-Net (Ronneberger et al., 2015) for the segmentation protocol, trained from scratch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """4-level U-Net (16-32-64-128 channels by default) returning one logit map per image.

    Args:
        channels (Sequence[int]): channels per level. Defaults to ``(16, 32, 64, 128)``.
        in_channels (int): input channels. Defaults to ``3``.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), in_channels: int = 3) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for c in channels:
            self.down.append(_block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for c_skip, c in zip(reversed(channels[:-1]), reversed(channels[1:]), strict=True):
            self.up.append(nn.ConvTranspose2d(c, c_skip, 2, stride=2))
            self.fuse.append(_block(2 * c_skip, c_skip))
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips[:-1]), strict=True):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:
                x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = fuse(torch.cat((x, skip), dim=1))
        return self.head(x)
