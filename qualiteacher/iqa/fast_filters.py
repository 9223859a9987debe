"""NIQE's local normalisation without torch's float64 convolution, same numbers, ~10x faster.

NIQE computes its MSCN coefficients (pyiqa's `normalize_img_with_gauss`: a 7x7 Gaussian
filter of the image and of its square) in float64, to match the MATLAB reference. On a CPU,
torch has no fast float64 convolution: it unfolds the image into a 49 x H*W matrix and
multiplies, so the two filters took about 60% of a NIQE call (profiled on 12 images of
288 px). The same filter as 49 shifted multiply-adds, with pyiqa's own kernel values and
padding, gives the same result (bit for bit in tests/test_iqa.py on this machine; the
summation order is the same) in a tenth of the time, and stays differentiable for the reward.

`install()` points NIQE at it; float32 inputs (BRISQUE, PIQE: fast convolutions exist)
keep pyiqa's function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Batch elements per chunk: 512 KiB of float64, so the 49 filter passes over a chunk hit the
# cache (fastest of 2^13..2^18 on 288 px images and 96 px blocks here; 2^18 was 2.3x slower).
_CHUNK_ELEMENTS = 1 << 16


def gaussian_filter(img: torch.Tensor, kernel: torch.Tensor, padding: str) -> torch.Tensor:
    """pyiqa's `imfilter(img, kernel, padding=padding)` for a (1, 1, k, k) kernel and odd k:
    pad, then sum the k*k shifted copies of the image, each times its kernel tap."""
    size = kernel.shape[-1]
    half = size // 2
    taps = kernel.reshape(size, size).tolist()
    h, w = img.shape[-2:]
    padded = F.pad(img, (half, half, half, half), mode="constant" if padding == "same" else padding)
    out = padded[..., :h, :w] * taps[0][0]
    for i in range(size):
        for j in range(size):
            if i or j:
                out.add_(padded[..., i:i + h, j:j + w], alpha=taps[i][j])
    return out


def normalize_img_with_gauss(img: torch.Tensor, kernel_size: int = 7, sigma: float = 7.0 / 6, C: int = 1,
                             padding: str = "same") -> torch.Tensor:
    """Drop-in for `pyiqa.archs.func_util.normalize_img_with_gauss` (same signature, formula,
    kernel and padding); float64 single-channel inputs take `gaussian_filter`."""
    from pyiqa.archs.func_util import normalize_img_with_gauss as pyiqa_normalize
    from pyiqa.archs.func_util import safe_sqrt
    from pyiqa.matlab_utils import fspecial

    if img.dtype != torch.float64 or img.shape[1] != 1 or kernel_size % 2 == 0 or padding == "symmetric":
        return pyiqa_normalize(img, kernel_size, sigma, C, padding)
    kernel = fspecial(kernel_size, sigma, 1).to(img)
    # Chunks are for the CPU's cache; on a GPU every pass is a kernel launch, so one chunk.
    per_chunk = img.shape[0] if img.is_cuda else max(1, _CHUNK_ELEMENTS // (img.shape[-2] * img.shape[-1]))
    return torch.cat([_normalize(chunk, kernel, C, padding, safe_sqrt) for chunk in img.split(per_chunk)])


def _normalize(img: torch.Tensor, kernel: torch.Tensor, C: int, padding: str, safe_sqrt) -> torch.Tensor:
    """pyiqa's formula on one chunk of the batch."""
    mu = gaussian_filter(img, kernel, padding)
    std = gaussian_filter(img**2, kernel, padding)
    sigma = safe_sqrt((std - mu**2).abs())
    return (img - mu) / (sigma + C)


def install() -> None:
    """Make pyiqa's NIQE use `normalize_img_with_gauss` above (idempotent; process-wide)."""
    from pyiqa.archs import niqe_arch

    niqe_arch.normalize_img_with_gauss = normalize_img_with_gauss
