"""`assemble_bank_batch`: the student's view of bank records (qualiteacher/method/bank_batch.py)."""

from __future__ import annotations

import numpy as np
import torch

from qualiteacher.method.bank_batch import BankLabel, assemble_bank_batch

SIZE, CROP = 40, 24


def _coordinates(offset: int) -> np.ndarray:
    """An image whose pixels encode their own position (row in R, column in G), plus an offset in B."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([rows * 5, cols * 5, np.full_like(rows, offset)], axis=-1).astype(np.uint8)


def test_input_and_labels_share_one_crop_box_and_slots_pad():
    image = _coordinates(0)
    grid = np.array([[0.5, 2.0], [1.0, 1.0]], np.float32)
    labels = [[BankLabel(_coordinates(10 + j), grid, level) for j, level in enumerate((9.0, 6.0, 2.5))],
              [BankLabel(_coordinates(50), np.zeros((0, 0), np.float32), 4.0)]]
    batch = assemble_bank_batch([image, image], labels, CROP, cap=7.0, rng=np.random.default_rng(3))
    assert batch.x.shape == (2, 3, CROP, CROP) and batch.pl.shape == (2, 3, 3, CROP, CROP)
    assert batch.weights.shape == (2, 3, 1, CROP, CROP)
    for i in range(2):
        # same box: the position channels of every label equal the input's
        for j in range(3):
            assert torch.equal(batch.pl[i, j, :2], batch.x[i, :2])
    assert batch.level.tolist() == [[7.0, 6.0, 2.5], [4.0, 7.0, 7.0]]  # merged at the cap; padding at the cap
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(batch.pl[1, 1], batch.pl[1, 0]) and torch.equal(batch.pl[1, 2], batch.pl[1, 0])
    assert torch.equal(batch.weights[1], torch.ones(3, 1, CROP, CROP))  # an empty grid is uniform
    # the weight map is the grid upsampled over the whole image, then cut at the box
    top = int(round(batch.x[0, 0, 0, 0].item() * 255 / 5))
    left = int(round(batch.x[0, 1, 0, 0].item() * 255 / 5))
    full = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(SIZE, SIZE), mode="bilinear",
                                           align_corners=False)[0]
    torch.testing.assert_close(batch.weights[0, 0], full[:, top:top + CROP, left:left + CROP])
    assert batch.boxes[0] == (top, left, CROP)  # the box is reported, for callers with aligned data


def test_ladder_rungs_are_blends_of_the_best_laddered_label_on_the_same_crop():
    image = _coordinates(0)
    label = _coordinates(200)
    labels = [[BankLabel(label, np.zeros((0, 0), np.float32), 6.0, ((0.0, 1.5), (0.5, 3.5))),
               BankLabel(_coordinates(100), np.zeros((0, 0), np.float32), 5.0)]]
    batch = assemble_bank_batch([image], labels, CROP, cap=7.0, rng=np.random.default_rng(1))
    assert batch.level.tolist() == [[6.0, 5.0, 1.5, 3.5]]
    assert batch.mask.tolist() == [[True] * 4] and batch.label_mask.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(batch.pl[0, 2], batch.x[0])  # a = 0: the input itself
    torch.testing.assert_close(batch.pl[0, 3], 0.5 * batch.pl[0, 0] + 0.5 * batch.x[0])
    assert torch.equal(batch.weights[0, 2:], torch.ones(2, 1, CROP, CROP))


def test_nothing_to_assemble():
    assert assemble_bank_batch([_coordinates(0)], [[]], CROP, 7.0, np.random.default_rng(0)) is None
