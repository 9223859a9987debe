"""NIQE's local normalisation (`qualiteacher.iqa.fast_filters`) against pyiqa's own."""

from __future__ import annotations

import pytest
import torch
from pyiqa.archs import func_util, niqe_arch

from qualiteacher.imageio import read_image, to_tensor
from qualiteacher.iqa import fast_filters


@pytest.mark.parametrize("padding", ["replicate", "same"])
@pytest.mark.parametrize("shape", [(2, 1, 288, 288), (20, 1, 96, 96), (3, 1, 97, 130), (1, 1, 8, 8)])
def test_normalisation_matches_pyiqa(shape, padding):
    """Same numbers as pyiqa's convolution for 0-255 images, across chunk boundaries (20
    blocks of 96 px are 3 chunks) and odd sizes."""
    torch.manual_seed(0)
    img = (torch.rand(shape, dtype=torch.float64) * 255).round()
    ours = fast_filters.normalize_img_with_gauss(img, padding=padding)
    theirs = func_util.normalize_img_with_gauss(img, padding=padding)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_float32_inputs_keep_pyiqa_function():
    """BRISQUE and PIQE (float32) are not NIQE's concern: pyiqa's function, bit for bit."""
    img = torch.rand(2, 1, 40, 40) * 255
    torch.testing.assert_close(fast_filters.normalize_img_with_gauss(img, padding="replicate"),
                               func_util.normalize_img_with_gauss(img, padding="replicate"), rtol=0, atol=0)


def test_gradients_match_pyiqa():
    """NIQE is part of the differentiable reward: the gradient must be the same too."""
    torch.manual_seed(1)
    img = (torch.rand(3, 1, 40, 56, dtype=torch.float64) * 255)
    upstream = torch.randn(3, 1, 40, 56, dtype=torch.float64)
    grads = []
    for fn in (fast_filters.normalize_img_with_gauss, func_util.normalize_img_with_gauss):
        leaf = img.clone().requires_grad_(True)
        (fn(leaf, padding="replicate") * upstream).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    assert grads[0].abs().sum() > 0


def test_loaded_niqe_uses_it_with_unchanged_scores(offline_ensemble, calibration_dir, monkeypatch):
    """After the ensemble loads, pyiqa's NIQE runs the fast normalisation, and its scores
    (full images and 96 px blocks) equal those of pyiqa's convolution."""
    assert niqe_arch.normalize_img_with_gauss is fast_filters.normalize_img_with_gauss
    images = torch.cat([to_tensor(read_image(calibration_dir / f"{n}.bmp"))[:, :, :192, :288]
                        for n in ("I03", "I04", "I08", "I19")])
    blocks = images.unfold(2, 96, 96).unfold(3, 96, 96).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 96, 96)
    ours = [offline_ensemble.raw_scores(x, ["niqe"])["niqe"] for x in (images, blocks)]
    monkeypatch.setattr(niqe_arch, "normalize_img_with_gauss", func_util.normalize_img_with_gauss)
    theirs = [offline_ensemble.raw_scores(x, ["niqe"])["niqe"] for x in (images, blocks)]
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
