"""Faster versions of three pyiqa 0.1.16 internals behind BRISQUE and NIQE, same numbers.

The scorer, the reward and every benchmark spend most of their CPU time in pyiqa's
hand-crafted metrics. Profiled on 12 images of 288 px with 3x3 block maps, three internals
were slow for reasons unrelated to the maths:

* `normalize_img_with_gauss` in NIQE: a 7x7 Gaussian filter in float64, for which torch has
  no fast CPU convolution (it unfolds the image into a 49 x H*W matrix): 60% of a NIQE call.
  Here: 49 shifted multiply-adds over cache-sized chunks, ~7x faster.
* `estimate_aggd_param` / `estimate_ggd_param`: every call rebuilt the same 9801-entry
  gamma table (three `lgamma` passes) and copied it once per batch element: a third of the
  scorer path, more for one-image calls. Here: the table is built once per dtype and device.
* `resize_1d` (MATLAB-style imresize, both metrics' second scale): it gathered the kernel
  window at every input position and then kept every second one. Here: only the windows of
  the output samples, ~2x faster.

Each replacement keeps pyiqa's operations and their order (tests/test_pyiqa_speedups.py:
bit for bit on this machine, gradients included, since BRISQUE and NIQE are in the reward).
`install()` points pyiqa's modules at them; it runs when the ensemble loads a metric
(`pyiqa_as_released()` undoes it for a block). The tests compare against pyiqa's own
functions, so a pyiqa upgrade that changes them fails there first.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

# Batch elements per chunk of NIQE's filter: 512 KiB of float64, so the 49 passes over a
# chunk hit the cache (fastest of 2^13..2^18 on 288 px images and 96 px blocks here; 2^18
# was 2.3x slower).
_CHUNK_ELEMENTS = 1 << 16


# ---- NIQE's local normalisation (MSCN) ----
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
    from pyiqa.matlab_utils import fspecial

    if img.dtype != torch.float64 or img.shape[1] != 1 or kernel_size % 2 == 0 or padding == "symmetric":
        return pyiqa_normalize(img, kernel_size, sigma, C, padding)
    kernel = fspecial(kernel_size, sigma, 1).to(img)
    # Chunks are for the CPU's cache; on a GPU every pass is a kernel launch, so one chunk.
    per_chunk = img.shape[0] if img.is_cuda else max(1, _CHUNK_ELEMENTS // (img.shape[-2] * img.shape[-1]))
    return torch.cat([_normalize(chunk, kernel, C, padding) for chunk in img.split(per_chunk)])


def _normalize(img: torch.Tensor, kernel: torch.Tensor, C: int, padding: str) -> torch.Tensor:
    """pyiqa's formula on one chunk of the batch."""
    from pyiqa.archs.func_util import safe_sqrt

    mu = gaussian_filter(img, kernel, padding)
    std = gaussian_filter(img**2, kernel, padding)
    sigma = safe_sqrt((std - mu**2).abs())
    return (img - mu) / (sigma + C)


# ---- (A)GGD shape fits: the gamma table once ----
_GAMMA_TABLES: dict[tuple[str, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _gamma_table(kind: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma grid, r(gamma)) exactly as pyiqa builds them, cached per dtype and device."""
    key = (kind, like.dtype, like.device)
    if key not in _GAMMA_TABLES:
        gam = torch.arange(0.2, 10 + 0.001, 0.001).to(like)
        if kind == "aggd":
            r = (2 * torch.lgamma(2.0 / gam) - (torch.lgamma(1.0 / gam) + torch.lgamma(3.0 / gam))).exp()
        else:
            r = (torch.lgamma(1.0 / gam) + torch.lgamma(3.0 / gam) - 2 * torch.lgamma(2.0 / gam)).exp()
        _GAMMA_TABLES[key] = (gam, r)
    return _GAMMA_TABLES[key]


def estimate_ggd_param(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pyiqa's `estimate_ggd_param` with the cached table (broadcast, not repeated)."""
    gamma, r_table = _gamma_table("ggd", x)
    sigma_sq = x.pow(2).mean(dim=(-1, -2))
    sigma = sigma_sq.sqrt().squeeze(dim=-1)
    assert not torch.isclose(sigma, torch.zeros_like(sigma)).all(), (
        "Expected image with non zero variance of pixel values")
    E = x.abs().mean(dim=(-1, -2))
    rho = sigma_sq / E**2
    indexes = (rho - r_table).abs().argmin(dim=-1)
    return gamma[indexes], sigma


def estimate_aggd_param(block: torch.Tensor, return_sigma: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pyiqa's `estimate_aggd_param` with the cached table (broadcast, not repeated)."""
    gam, r_gam = _gamma_table("aggd", block)
    mask_left = block < 0
    mask_right = block > 0
    count_left = mask_left.sum(dim=(-1, -2), dtype=torch.float32)
    count_right = mask_right.sum(dim=(-1, -2), dtype=torch.float32)
    left_std = torch.sqrt((block * mask_left).pow(2).sum(dim=(-1, -2)) / (count_left))
    right_std = torch.sqrt((block * mask_right).pow(2).sum(dim=(-1, -2)) / (count_right))
    gammahat = left_std / right_std
    rhat = block.abs().mean(dim=(-1, -2)).pow(2) / block.pow(2).mean(dim=(-1, -2))
    rhatnorm = (rhat * (gammahat.pow(3) + 1) * (gammahat + 1)) / (gammahat.pow(2) + 1).pow(2)
    alpha = gam[(r_gam - rhatnorm).abs().argmin(dim=-1)]
    if return_sigma:
        return alpha, left_std.squeeze(-1), right_std.squeeze(-1)
    scale = (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)).exp().sqrt()
    return alpha, left_std.squeeze(-1) * scale, right_std.squeeze(-1) * scale


# ---- MATLAB-style resizing: only the windows that are kept ----
def resize_1d(x: torch.Tensor, dim: int, size: int, scale: float, kernel: str = "cubic", sigma: float = 2.0,
              padding_type: str = "reflect", antialiasing: bool = True) -> torch.Tensor:
    """pyiqa's `resize_1d` (x: (B*C, 1, H, W)); the kernel windows of the output samples are
    gathered directly instead of unfolding every input position and indexing."""
    from pyiqa.matlab_utils.resize import get_padding, get_weight, padding

    if scale == 1:
        return x
    kernel_size = 4 if kernel == "cubic" else math.floor(6 * sigma)
    antialiasing_factor = scale if antialiasing and scale < 1 else 1
    kernel_size = math.ceil(kernel_size / antialiasing_factor) + 2  # pyiqa's margin on both sides
    with torch.no_grad():  # the weights depend on the shapes only
        pos = torch.linspace(0, size - 1, steps=size, dtype=x.dtype, device=x.device)
        pos = (pos + 0.5) / scale - 0.5
        base = pos.floor() - (kernel_size // 2) + 1
        weight = get_weight(pos - base, kernel_size, kernel=kernel, sigma=sigma,
                            antialiasing_factor=antialiasing_factor)
        pad_pre, pad_post, base = get_padding(base, kernel_size, x.size(dim))
    x_pad = padding(x, dim, pad_pre, pad_post, padding_type=padding_type)[:, 0]
    window = base.unsqueeze(0) + torch.arange(kernel_size, device=x.device).unsqueeze(1)  # (kernel, size)
    if dim in (2, -2):
        sample = x_pad[:, window, :]  # (B, kernel, size, W), pyiqa's layout
        weight = weight.view(1, kernel_size, sample.size(2), 1)
    else:
        # pyiqa's (B, kernel, H, size) layout, made contiguous so the sum runs in its order
        sample = x_pad[:, :, window].permute(0, 2, 1, 3).contiguous()
        weight = weight.view(1, kernel_size, 1, sample.size(3))
    return (sample * weight).sum(dim=1, keepdim=True)


def _replacements() -> dict:
    """(pyiqa module, attribute) -> the function above that replaces it."""
    from pyiqa.archs import brisque_arch, niqe_arch
    from pyiqa.matlab_utils import resize

    return {(niqe_arch, "normalize_img_with_gauss"): normalize_img_with_gauss,
            (niqe_arch, "estimate_aggd_param"): estimate_aggd_param,
            (brisque_arch, "estimate_aggd_param"): estimate_aggd_param,
            (brisque_arch, "estimate_ggd_param"): estimate_ggd_param,
            (resize, "resize_1d"): resize_1d}


_PYIQA_OWN: dict = {}


def pyiqa_own() -> dict:
    """(pyiqa module, attribute) -> pyiqa's own function, read before `install()` first
    replaces anything (for comparisons)."""
    if not _PYIQA_OWN:
        _PYIQA_OWN.update({target: getattr(*target) for target in _replacements()})
    return _PYIQA_OWN


def install() -> None:
    """Point pyiqa's BRISQUE and NIQE at the functions above (idempotent; process-wide)."""
    pyiqa_own()  # keep pyiqa's functions before the first replacement
    for (module, name), function in _replacements().items():
        setattr(module, name, function)


@contextlib.contextmanager
def pyiqa_as_released():
    """pyiqa's own functions inside the block, the faster ones after it (benchmarks and
    tests compare the two)."""
    for (module, name), function in pyiqa_own().items():
        setattr(module, name, function)
    try:
        yield
    finally:
        install()
