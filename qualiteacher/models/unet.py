"""U-Net restoration network with the same interface as NAFNet.

Level i has width * 2**i channels; each block is two 3x3 convs with LeakyReLU and a
residual connection. Downsampling by strided conv, upsampling by transposed conv,
concatenated skips fused by a 1x1 conv. Score injection on the bottleneck ("middle"),
global residual out = x + net(x), input zero-padded to a multiple of 2**levels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qualiteacher.config import ModelConfig
from qualiteacher.models.injection import ConditionedRestorer


class ConvBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


def _blocks(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ConvBlock(c) for _ in range(n)])


class Up(nn.Module):
    """Transposed-conv upsample, concatenate the skip, fuse back to the level's width."""

    def __init__(self, c_in: int):
        super().__init__()
        c = c_in // 2
        self.up = nn.ConvTranspose2d(c_in, c, 2, stride=2)
        self.fuse = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class UNet(ConditionedRestorer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.score_cap = cfg.score_cap
        self.pad_multiple = 2 ** len(cfg.enc_blocks)
        c = cfg.width
        self.intro = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c, 3, padding=1), nn.LeakyReLU(0.2)
        )
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        for n in cfg.enc_blocks:
            self.encoders.append(_blocks(c, n))
            self.downs.append(
                nn.Sequential(
                    nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.2)
                )
            )
            c *= 2
        self.middle = _blocks(c, cfg.middle_blocks)
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for n in cfg.dec_blocks:
            self.ups.append(Up(c))
            c //= 2
            self.decoders.append(_blocks(c, n))
        self.ending = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        self.attach_bottleneck_injection(cfg)
        self.use_channels_last(cfg.channels_last)

    def merge(self, up: nn.Module, h: Tensor, skip: Tensor) -> Tensor:
        return up(h, skip)
