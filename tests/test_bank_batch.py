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


# ---------------------------------------------------------------------------- from a real Redis bank
CAP = 7.0
AUGS = ("hflip", "vflip", "rot90")


def _grid(*values: float) -> np.ndarray:
    return np.array(values, np.float32).reshape(2, 2)


# image id -> its input's offset and its labels: (ensemble, the label's offset, block weights, ladder).
# "a": three labels, the best above the cap with two ladder rungs (one also above the cap), the
# poorest by content (offset 10) not the last by score; "b": one label, so it pads.
BANK = {
    "a": (0, [(9.0, 10, _grid(0.5, 2.0, 1.0, 1.0), {0.0: 1.5, 0.5: 8.0}),
              (6.0, 60, _grid(1.5, 1.0, 0.5, 1.0), None),
              (2.5, 30, None, None)]),  # no block weights: uniform
    "b": (100, [(4.0, 150, _grid(1.0, 1.0, 1.0, 3.0), None)]),
}


def _fill(bank) -> None:
    """The bank as the labeller and the scorer leave it: inputs in the InputStore, each label
    set built by `build_entry` and offered to the bank's Lua gate."""
    from qualiteacher.services.bank import build_entry
    from qualiteacher.services.bank.inputs import InputStore

    InputStore(bank.client, bank.prefix).put_many({i: _coordinates(offset) for i, (offset, _) in BANK.items()})
    for image_id, (_, labels) in BANK.items():
        entries = [build_entry(image_id, f"{image_id}.v1.{aug}", ensemble=score, image=_coordinates(offset),
                               teacher_version=1, augmentation=aug, level_cap=CAP, weights=grid,
                               teacher_q_min=0.25, ladder=ladder)
                   for (score, offset, grid, ladder), aug in zip(labels, AUGS)]
        assert len(bank.gate(image_id, entries).admitted) == len(entries)


def test_batch_from_records_in_a_real_redis_bank(bank, redis_url):
    """The student's reader (`qualiteacher.services.student.BankBatches`) on records the gate stored: one
    crop for the input and every label, the stored weight grids upsampled, padded slots, levels
    at the cap, and Eq. 8's q_min over the labels alone on that crop."""
    from qualiteacher.services.bank import decode_weights
    from qualiteacher.services.student import BankBatches

    from qualiteacher.config import load_config
    from qualiteacher.method.bank_batch import upsample_block_weights
    from qualiteacher.student_step import poorest_label_quality

    _fill(bank)
    assert [(e.ensemble, e.level) for e in bank.entries("a")] == [(9.0, CAP), (6.0, 6.0), (2.5, 2.5)]
    grids = {i: [decode_weights(e.weights) for e in bank.entries(i)] for i in BANK}
    cfg = load_config(None, [f"redis.prefix={bank.prefix}", f"data.crop_size={CROP}", f"model.score_cap={CAP}",
                             "loss.consistency.enabled=false"])
    batch = BankBatches(cfg, redis_url, np.random.default_rng(5)).sample(6, torch.device("cpu"))

    rows = [("a" if round(batch.x[i, 2, 0, 0].item() * 255) == 0 else "b") for i in range(batch.x.shape[0])]
    assert set(rows) == {"a", "b"} and batch.x.shape[1:] == (3, CROP, CROP)
    assert batch.pl.shape[1] == 5  # "a": three labels and two rungs; "b" pads to five
    q_min = poorest_label_quality(batch, lambda images: images.mean(dim=(1, 2, 3)))
    for i, image_id in enumerate(rows):
        top, left, side = batch.boxes[i]
        corner = batch.x[i, :2, 0, 0] * 255 / 5  # the input's own row and column there
        assert side == CROP and (top, left) == tuple(round(v) for v in corner.tolist())
        assert all(torch.equal(batch.pl[i, j, :2], batch.x[i, :2]) for j in range(5))  # one crop for all
        box = (slice(None), slice(top, top + CROP), slice(left, left + CROP))
        n = len(grids[image_id])
        for j, grid in enumerate(grids[image_id]):
            torch.testing.assert_close(batch.weights[i, j], upsample_block_weights(grid, (SIZE, SIZE))[box])
        if image_id == "a":
            assert batch.level[i].tolist() == [CAP, 6.0, 2.5, 1.5, CAP]
            assert batch.mask[i].all() and batch.label_mask[i].tolist() == [True] * 3 + [False] * 2
            torch.testing.assert_close(batch.pl[i, 3], batch.x[i])  # rung a = 0: the input
            torch.testing.assert_close(batch.pl[i, 4], 0.5 * batch.pl[i, 0] + 0.5 * batch.x[i])
            assert torch.equal(batch.weights[i, 2:], torch.ones(3, 1, CROP, CROP))  # no grid; rungs uniform
            # q_min: the poorest label (offset 10, the best by score), not the input-like rung
            torch.testing.assert_close(q_min[i], batch.pl[i, 0].mean())
            assert q_min[i] > batch.x[i].mean()
        else:
            assert batch.level[i].tolist() == [4.0] + [CAP] * 4  # padding sits at the cap
            assert batch.mask[i].tolist() == [True] + [False] * 4 == batch.label_mask[i].tolist()
            assert all(torch.equal(batch.pl[i, j], batch.pl[i, 0]) for j in range(n, 5))
            assert all(torch.equal(batch.weights[i, j], batch.weights[i, 0]) for j in range(n, 5))
            torch.testing.assert_close(q_min[i], batch.pl[i, 0].mean())


def test_the_reader_caps_levels_whatever_the_records_hold(bank, redis_url):
    """Levels are capped when written (`build_entry`) and again when read: a student with a lower
    cap than the records' trains no label, rung or padding slot above its own."""
    from qualiteacher.services.student import BankBatches

    from qualiteacher.config import load_config

    _fill(bank)
    cfg = load_config(None, [f"redis.prefix={bank.prefix}", f"data.crop_size={CROP}", "model.score_cap=5.0",
                             "loss.consistency.enabled=false"])
    batch = BankBatches(cfg, redis_url, np.random.default_rng(5)).sample(6, torch.device("cpu"))
    levels = {tuple(row) for row in batch.level.tolist()}
    assert levels == {(5.0, 5.0, 2.5, 1.5, 5.0), (4.0, 5.0, 5.0, 5.0, 5.0)}
