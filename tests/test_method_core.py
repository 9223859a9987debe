"""Multi-aug inverses, dual drop with realistic thresholds, the gating rule, config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qualiteacher.config import ConfigError, load_config
from qualiteacher.method import augment, drop
from qualiteacher.method.gating import Scored, gate


# ---- multi-augmentation ----
@pytest.mark.parametrize("name", augment.KNOWN_AUGMENTATIONS)
def test_augmentations_invert_exactly_on_non_square(name):
    x = torch.rand(2, 3, 37, 53)
    y = augment.apply(name, x)
    if name == "rot90":
        assert y.shape == (2, 3, 53, 37)
    assert torch.equal(augment.invert(name, y), x)


def test_multi_aug_pseudo_labels_map_back():
    x = torch.rand(2, 3, 20, 30)
    calls = []

    def teacher(batch):
        calls.append(tuple(batch.shape))
        # A teacher that is not equivariant: adds a horizontal ramp, so a wrong inverse shows.
        ramp = torch.linspace(0, 1, batch.shape[-1]).expand_as(batch)
        return batch + ramp

    pls = augment.multi_aug_pseudo_labels(teacher, x)
    assert pls.shape == (2, 3, 3, 20, 30)
    # hflip PL = flip(flip(x) + ramp) = x + flipped ramp
    ramp = torch.linspace(0, 1, 30).expand(2, 3, 20, 30)
    assert torch.allclose(pls[:, 0], x + torch.flip(ramp, dims=(-1,)))
    assert torch.allclose(pls[:, 1], x + ramp)
    # hflip and vflip share one batched call; rot90 (shape changes) gets its own.
    assert sorted(calls) == sorted([(4, 3, 20, 30), (2, 3, 30, 20)])


def test_augmentation_names_come_from_one_place():
    from qualiteacher.services.bank.codec import build_entry

    assert load_config(None, []).labelling.augmentations == list(augment.AUGMENTATIONS)
    every = ",".join(augment.KNOWN_AUGMENTATIONS)
    assert load_config(None, [f"labelling.augmentations=[{every}]"]).labelling.augmentations == \
        list(augment.KNOWN_AUGMENTATIONS)
    with pytest.raises(ConfigError, match="labelling.augmentations"):
        load_config(None, ["labelling.augmentations=[rot180]"])
    for name in augment.KNOWN_AUGMENTATIONS:
        assert build_entry("i", "l", ensemble=5.0, image=np.zeros((2, 2, 3), np.uint8), augmentation=name)
    with pytest.raises(ValueError, match="rot180"):
        build_entry("i", "l", ensemble=5.0, image=np.zeros((2, 2, 3), np.uint8), augmentation="rot180")


def test_config_and_bank_import_without_torch():
    # The monitor and config tools read augmentation names without paying for torch.
    code = "import sys, qualiteacher.config, qualiteacher.services.monitor.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


# ---- dual drop ----
def _consistent_sets(n, k=3, m=3, noise=0.01, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, generator=gen) * 0.6 + 0.2
    return (base + noise * torch.randn(n, k, m, generator=gen)).clamp(0, 1)


def test_drop_keeps_consistent_sets_and_drops_inconsistent():
    sets = _consistent_sets(20)
    disagree = sets[:3].clone()
    disagree[:, 1, 0] = 0.95  # one metric loves PL 1 ...
    disagree[:, 1, 2] = 0.05  # ... another hates it
    unstable = sets[3:6].clone()
    unstable[:, 2, :] = (unstable[:, 2, :] - 0.4).clamp(0, 1)  # all metrics: PL 2 much worse
    batch = torch.cat([sets, disagree, unstable])
    decision = drop.dual_drop(batch, tau_multi=0.03, tau_aug=0.15)
    assert decision.keep[:20].all()
    assert decision.reasons[20:23] == [drop.METRIC_DISAGREEMENT] * 3
    assert decision.reasons[23:26] == [drop.AUGMENTATION_INSTABILITY] * 3
    assert decision.counts() == {drop.METRIC_DISAGREEMENT: 3, drop.AUGMENTATION_INSTABILITY: 3}


def test_reference_thresholds_never_drop_but_nan_is_dropped():
    batch = torch.rand(50, 3, 3)
    assert drop.dual_drop(batch, 1.0, 1.0).keep.all()  # why the reference code dropped nothing
    batch[7, 0, 0] = float("nan")
    decision = drop.dual_drop(batch, 1.0, 1.0)
    assert decision.reasons[7] == drop.NON_FINITE and decision.keep.sum() == 49


def test_calibration_keeps_most_consistent_fraction():
    gen = torch.Generator().manual_seed(1)
    noise = torch.rand(200, 1, 1, generator=gen) * 0.2  # per-set inconsistency level
    batch = (0.5 + noise * torch.randn(200, 3, 3, generator=gen)).clamp(0, 1)
    tau_multi, tau_aug = drop.calibrate_thresholds(batch, keep_fraction=0.8)
    decision = drop.dual_drop(batch, tau_multi, tau_aug)
    kept = decision.keep.float().mean().item()
    assert 0.55 <= kept <= 0.8
    # The kept sets are the consistent ones: their noise level is lower on average.
    assert noise.flatten()[decision.keep].mean() < noise.flatten()[~decision.keep].mean()


# ---- gating ----
entries = st.builds(
    Scored,
    label_id=st.sampled_from([f"l{i}" for i in range(8)]),
    score=st.sampled_from([0.0, 1.5, 3.0, 5.25, 7.0, 9.9]),
)


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(entries, max_size=5), max_size=6), top_k=st.integers(1, 4))
def test_gate_properties(batches, top_k):
    bank: list[Scored] = []
    seen: set[str] = set()
    offered: dict[str, Scored] = {}  # the version of each label id the gate considered
    for batch in batches:
        for e in batch:
            if e.label_id not in seen:
                offered.setdefault(e.label_id, e)
        before = list(bank)
        bank, evicted = gate(bank, batch, top_k, seen)
        seen |= {e.label_id for e in batch}
        assert len(bank) <= top_k
        assert len({e.label_id for e in bank}) == len(bank)
        assert all(a.score >= b.score for a, b in zip(bank, bank[1:]))
        assert {e.label_id for e in evicted} <= {e.label_id for e in before}
        # Idempotent: the same candidates again change nothing.
        again, evicted_again = gate(bank, batch, top_k, seen)
        assert again == bank and evicted_again == []
    # The bank is exactly the top-k of everything the gate considered over the history.
    best = sorted(offered.values(), key=lambda e: (-e.score, e.label_id))[:top_k]
    assert bank == best


def test_gate_deterministic_ties_and_top_k():
    bank, _ = gate([], [Scored("b", 5.0), Scored("a", 5.0), Scored("c", 5.0), Scored("d", 5.0)], 3)
    assert [e.label_id for e in bank] == ["a", "b", "c"]
    bank, evicted = gate(bank, [Scored("z", 6.0)], 3)
    assert [e.label_id for e in bank] == ["z", "a", "b"] and [e.label_id for e in evicted] == ["c"]


def test_gate_keeps_best_over_history():
    history = [Scored(f"l{i}", float(s)) for i, s in enumerate([3, 8, 1, 9, 2, 7, 5])]
    bank: list[Scored] = []
    for e in history:
        bank, _ = gate(bank, [e], 3)
    assert [e.score for e in bank] == [9.0, 8.0, 7.0]


# ---- config ----
def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"iqa\.block_grid"):
        load_config(overrides=["iqa.block_grid=0"])
    with pytest.raises(ConfigError, match=r"drop\.tau_multii"):
        load_config(overrides=["drop.tau_multii=0.1"])
    with pytest.raises(ConfigError, match=r"iqa\.metrics"):
        load_config(overrides=["iqa.metrics={nosuch: 1.0}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: wide\n")
    with pytest.raises(ConfigError, match=r"model\.width"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_files_load_and_override():
    quick = load_config("configs/quickstart.yaml", ["drop.tau_aug=0.2"])
    assert set(quick.iqa.metrics) == {"brisque", "niqe", "piqe"} and quick.drop.tau_aug == 0.2
    paper = load_config("configs/paper.yaml")
    assert set(paper.iqa.metrics) == {"musiq", "brisque", "clipiqa"}
