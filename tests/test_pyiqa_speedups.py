"""`qualiteacher.iqa.pyiqa_speedups` against the pyiqa functions it stands in for."""

from __future__ import annotations

import pytest
import torch
from pyiqa.archs import brisque_arch, func_util, niqe_arch
from pyiqa.matlab_utils import imresize, resize

from qualiteacher.imageio import read_image, to_tensor
from qualiteacher.iqa import pyiqa_speedups


def _images(shape, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return (torch.rand(shape, dtype=dtype) * 255).round()


@pytest.mark.parametrize("padding", ["replicate", "same"])
@pytest.mark.parametrize("shape", [(2, 1, 288, 288), (20, 1, 96, 96), (3, 1, 97, 130), (1, 1, 8, 8)])
def test_normalisation_matches_pyiqa(shape, padding):
    """Same numbers as pyiqa's convolution for 0-255 images, across chunk boundaries (20
    blocks of 96 px are 3 chunks) and odd sizes."""
    img = _images(shape)
    ours = pyiqa_speedups.normalize_img_with_gauss(img, padding=padding)
    theirs = func_util.normalize_img_with_gauss(img, padding=padding)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_float32_normalisation_keeps_pyiqa_function():
    """BRISQUE and PIQE (float32) have a fast convolution: pyiqa's function, bit for bit."""
    img = _images((2, 1, 40, 40), torch.float32)
    torch.testing.assert_close(pyiqa_speedups.normalize_img_with_gauss(img, padding="replicate"),
                               func_util.normalize_img_with_gauss(img, padding="replicate"), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9, 1, 96, 96), (1, 1, 288, 288), (3, 1, 48, 40)])
def test_shape_fits_match_pyiqa(shape, dtype):
    """AGGD (both return forms) and GGD fits on MSCN-like data (products of neighbours too,
    as the metrics feed them): same values and shapes."""
    torch.manual_seed(2)
    mscn = torch.randn(shape, dtype=dtype)
    for block in (mscn, mscn * torch.roll(mscn, (1, 1), dims=(2, 3))):
        for return_sigma in (False, True):
            ours = pyiqa_speedups.estimate_aggd_param(block, return_sigma)
            theirs = func_util.estimate_aggd_param(block, return_sigma)
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(pyiqa_speedups.estimate_ggd_param(block), func_util.estimate_ggd_param(block), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9, 1, 96, 96), (1, 3, 288, 288), (2, 1, 97, 51)])
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_resize_matches_pyiqa(monkeypatch, shape, dtype, scale):
    """imresize through the gathered windows: same values and shapes, down and up, odd sizes."""
    img = _images(shape, dtype)
    original = pyiqa_speedups.pyiqa_own()[(resize, "resize_1d")]
    assert original is not pyiqa_speedups.resize_1d
    monkeypatch.setattr(resize, "resize_1d", original)
    theirs = imresize(img, scale=scale, antialiasing=True)
    monkeypatch.setattr(resize, "resize_1d", pyiqa_speedups.resize_1d)
    ours = imresize(img, scale=scale, antialiasing=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_gradients_match_pyiqa(monkeypatch):
    """BRISQUE and NIQE are in the differentiable reward: the gradients must match too."""
    pyiqa_resize_1d = pyiqa_speedups.pyiqa_own()[(resize, "resize_1d")]  # before any replacement
    assert pyiqa_resize_1d is not pyiqa_speedups.resize_1d
    img = _images((3, 1, 40, 56), seed=1)
    upstream = torch.randn(3, 1, 40, 56, dtype=torch.float64)

    def grad(normalize, resize_1d):
        monkeypatch.setattr(resize, "resize_1d", resize_1d)
        leaf = img.clone().requires_grad_(True)
        mscn = normalize(leaf, padding="replicate")
        small = imresize(mscn, scale=0.5, antialiasing=True)
        _, left, right = func_util.estimate_aggd_param(small, return_sigma=True)
        ((mscn * upstream).sum() + (left + right).sum()).backward()
        return leaf.grad

    ours = grad(pyiqa_speedups.normalize_img_with_gauss, pyiqa_speedups.resize_1d)
    theirs = grad(func_util.normalize_img_with_gauss, pyiqa_resize_1d)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)  # float64 sums in another order
    assert ours.abs().sum() > 0


def test_loaded_metrics_use_them_with_unchanged_scores(offline_ensemble, calibration_dir):
    """After the ensemble loads, pyiqa's BRISQUE and NIQE run the faster functions, and
    their scores (full images and 96 px blocks) equal those of pyiqa's own."""
    assert niqe_arch.normalize_img_with_gauss is pyiqa_speedups.normalize_img_with_gauss
    assert brisque_arch.estimate_aggd_param is pyiqa_speedups.estimate_aggd_param
    assert resize.resize_1d is pyiqa_speedups.resize_1d
    images = torch.cat([to_tensor(read_image(calibration_dir / f"{n}.bmp"))[:, :, :192, :288]
                        for n in ("I03", "I04", "I08", "I19")])
    blocks = images.unfold(2, 96, 96).unfold(3, 96, 96).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 96, 96)
    names = ["brisque", "niqe"]
    ours = [offline_ensemble.raw_scores(x, names) for x in (images, blocks)]
    with pyiqa_speedups.pyiqa_as_released():
        assert niqe_arch.normalize_img_with_gauss is func_util.normalize_img_with_gauss
        assert resize.resize_1d is not pyiqa_speedups.resize_1d
        theirs = [offline_ensemble.raw_scores(x, names) for x in (images, blocks)]
    assert brisque_arch.estimate_ggd_param is pyiqa_speedups.estimate_ggd_param  # back after the block
    for a, b in zip(ours, theirs, strict=True):
        for name in names:
            assert torch.isfinite(a[name]).all()
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
