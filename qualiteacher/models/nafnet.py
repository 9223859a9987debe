"""NAFNet-style restoration network (Chen et al., "Simple Baselines for Image Restoration").

intro conv -> encoder levels (NAFBlocks, strided-conv downsampling) -> middle blocks
-> decoder levels (1x1 conv + PixelShuffle upsampling, additive skips) -> ending conv;
out = x + net(x). Score injection sits on the bottleneck ("middle") when
`cfg.score_condition` is true. Input is zero-padded to a multiple of 2**levels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qualiteacher.config import ModelConfig
from qualiteacher.models.injection import ConditionedRestorer


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of an NCHW tensor.

    One fused `layer_norm` on the channels-last view rather than mean/var/normalise as
    separate ops: the quickstart student's training step is a fifth faster on a CPU (the
    element-wise passes and their backward were a large share of it), and it is one kernel
    on a GPU. The result keeps the input's layout: with channels-last activations
    (`ModelConfig.channels_last`) the view is already contiguous and nothing is copied.
    Same parameters and checkpoints as before.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        nhwc = x.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if nhwc else torch.contiguous_format
        return y.permute(0, 3, 1, 2).contiguous(memory_format=layout)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (same parameters and state dict as `nn.Conv2d(c_in, c_out, 1)`).

    On channels-last activations it runs as one matrix product over the pixels' channel
    vectors (as ConvNeXt does), which a CPU computes faster than the convolution kernel:
    1.1-1.8x per layer in a training step here. NCHW input takes the plain convolution.
    """

    channels_last_weight = False  # the matrix product's weight gradient has default strides

    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__(c_in, c_out, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        weight = self.weight.reshape(self.out_channels, self.in_channels)
        return F.linear(x.permute(0, 2, 3, 1), weight, self.bias).permute(0, 3, 1, 2)


class SimpleGate(nn.Module):
    """Split channels in half and multiply: a nonlinearity without activation functions."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = PointwiseConv(c, dw)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = PointwiseConv(dw // 2, c)
        # Simplified channel attention: global average pool + 1x1 conv, no nonlinearity.
        self.sca = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), PointwiseConv(dw // 2, dw // 2)
        )
        self.sg = SimpleGate()
        ffn = c * ffn_expand
        self.conv4 = PointwiseConv(c, ffn)
        self.conv5 = PointwiseConv(ffn // 2, c)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        # Zero-init residual scales: each block starts as the identity (as in NAFNet).
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.sg(self.conv2(self.conv1(self.norm1(x))))
        y = self.conv3(y * self.sca(y))
        x = x + y * self.beta
        y = self.conv5(self.sg(self.conv4(self.norm2(x))))
        return x + y * self.gamma


def _blocks(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[NAFBlock(c) for _ in range(n)])


class NAFNet(ConditionedRestorer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.score_cap = cfg.score_cap
        self.pad_multiple = 2 ** len(cfg.enc_blocks)
        c = cfg.width
        self.intro = nn.Conv2d(cfg.in_channels, c, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        for n in cfg.enc_blocks:
            self.encoders.append(_blocks(c, n))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = _blocks(c, cfg.middle_blocks)
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for n in cfg.dec_blocks:
            self.ups.append(
                nn.Sequential(PointwiseConv(c, 2 * c, bias=False), nn.PixelShuffle(2))
            )
            c //= 2
            self.decoders.append(_blocks(c, n))
        self.ending = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        self.attach_bottleneck_injection(cfg)
        self.use_channels_last(cfg.channels_last)

    def merge(self, up: nn.Module, h: Tensor, skip: Tensor) -> Tensor:
        return up(h) + skip
