"""The oracle scorer and the factorial's reference loop (experiments/oracle*.py, reference_loop.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from experiments.oracle_scorer import OracleReward, OracleScale, OracleScorer, psnr


def _pair(noise: float, seed: int = 0, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(1, 3, size, size, generator=g)
    return (gt + noise * torch.randn(gt.shape, generator=g)).clamp(0, 1), gt


def test_psnr_matches_the_definition():
    pred, gt = _pair(0.1)
    mse = float(((pred - gt) ** 2).mean())
    assert psnr(pred, gt).item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)


def test_scale_puts_inputs_at_the_bottom_and_room_above_the_teacher():
    scale = OracleScale.fit(np.array([10.0, 11.0, 12.0]), np.array([15.0, 16.0, 18.0]))
    assert scale.unit(torch.tensor(scale.low_db)).item() == pytest.approx(0.0)
    best_label_level = 10 * scale.unit(torch.tensor(np.percentile([15.0, 16.0, 18.0], 98))).item()
    assert 5.5 < best_label_level < 7.5  # the teacher's best labels sit near the cap, with room above


def test_oracle_ranks_by_distance_to_ground_truth_and_weights_blocks():
    scorer = OracleScorer(OracleScale(5.0, 40.0), block_grid=2, min_block_weight=0.1)
    gt = _pair(0.0)[1]
    noisy = torch.cat([_pair(n)[0] for n in (0.02, 0.1, 0.3)])  # same gt (seed 0), more and more noise
    units = scorer.normalized(noisy, gt.expand(3, -1, -1, -1))
    assert units[0] > units[1] > units[2]
    damaged = gt.clone()
    damaged[..., :16, 16:] = (damaged[..., :16, 16:] + 0.4).clamp(0, 1)
    weights = scorer.block_weights(damaged, gt)
    assert weights.shape == (1, 2, 2) and weights[0, 0, 1] < weights[0, 1, 0]


def test_oracle_reward_matches_its_batch_layouts_and_has_gradients():
    reward = OracleReward(OracleScale(5.0, 40.0))
    gt = torch.rand(2, 3, 16, 16)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    reward.bind(gt, mask)
    y = gt.clone().requires_grad_(True)
    q = reward(torch.cat([y, (y + 0.2).clamp(0, 1)]))  # [y_high; y_low]
    assert q.shape == (4,) and (q[:2] > q[2:]).all()
    q.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
    assert reward(gt[[0, 0, 1]]).shape == (3,)  # the masked labels' layout
    with pytest.raises(ValueError, match="match no layout"):
        reward(torch.rand(5, 3, 16, 16))


def test_oracle_level_cells_score_their_rungs_and_nr_cells_construct_them():
    """Under the oracle a rung's level is measured; under the NR judge it is set by rule."""
    from types import SimpleNamespace

    from experiments.oracle import cell_config
    from qualiteacher.config import load_config

    cfg = load_config("configs/quality_budget.yaml", ["labelling.ladder_levels=constructed"])
    task = SimpleNamespace(cfg=cfg, oracle_taus=(0.5, 0.5))
    for reward in ("off", "nr", "oracle"):
        assert cell_config(task, "oracle", reward).labelling.ladder_levels == "scored"
        assert cell_config(task, "nr", reward).labelling.ladder_levels == "constructed"
    assert cell_config(task, "oracle", "off").drop.tau_multi == 0.5
    assert cfg.labelling.ladder_levels == "constructed"  # the task's config is not changed


def test_factorial_fast_runs_and_reports(tmp_path, capsys, weights_dir):
    """`--fast` on one task and two cells: the report and JSON hold every cell and the
    teacher, Spearman values are numbers in [-1, 1] or NaN (a flat sweep), and the labels
    in the bank have levels on the 0-10 scale."""
    from benchmarks.common import parse_result
    from experiments import oracle

    results = oracle.main(["--fast", "--tasks", "haze", "--cells", "oracle:off,nr:nr", "--ladder", "0,0.5",
                           "--out", str(tmp_path), "--no-baseline"])
    task = results["tasks"]["haze"]
    assert set(task["cells"]) == {"oracle:off", "nr:nr"}
    for cell in task["cells"].values():
        rho = cell["spearman_psnr"]["mean"]
        assert math.isnan(rho) or -1.0 <= rho <= 1.0
        assert len(cell["sweep_psnr"]) == 8
    run = task["runs"]["oracle:off"][0]
    assert run["bank_labels"] > 0 and all(0.0 <= v <= 10.0 for v in run["bank_levels"])
    assert (tmp_path / "oracle.md").read_text().count("| oracle | off |") == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert parse_result(last).name == "oracle_controllable_cells"
    assert results["ladder"] == [0.0, 0.5]


def test_merge_pools_the_seeds_of_runs_made_apart(tmp_path):
    """`--merge`: each cell's stats over the runs of every part; a part with another stage-1
    teacher or a seed already merged is refused, naming the folder."""
    import copy

    from experiments import oracle

    def part(seed: int, psnr: float) -> dict:
        run = {"at7": {"psnr": psnr, "ssim": 0.5, "nr": 6.0}, "train_psnr7": psnr, "ema_at7": {"psnr": 15.0},
               "spearman_psnr": 1.0, "spearman_nr": 0.5,
               "sweep": [{"psnr": 10.0 + i + seed, "nr": 5.0} for i in range(8)]}
        task = {"teacher": {"psnr": 15.5, "ssim": 0.5, "nr": 6.0, "train_psnr7": 16.0}, "test_images": 40,
                "oracle_scale": {}, "runs": {"nr:off": [run]}, "cells": {"nr:off": oracle.summarise([run])},
                "baseline": oracle.summarise([run])}
        return {"command": f"seed {seed}", "fast": False, "machine": "m", "ladder": [0.0, 0.5], "seeds": [seed],
                "test_split": "regions", "tasks": {"haze": task}, "elapsed_s": 10.0, "source": f"runs/s{seed}"}

    merged = oracle.merge_results([part(0, 15.0), part(1, 16.0)], "merge")
    cell = merged["tasks"]["haze"]["cells"]["nr:off"]
    assert cell["psnr"] == {"mean": 15.5, "min": 15.0, "max": 16.0, "runs": [15.0, 16.0]}
    assert cell["sweep_psnr"][0] == 10.5 and merged["seeds"] == [0, 1]
    assert merged["tasks"]["haze"]["baseline"]["psnr"]["runs"] == [15.0, 16.0]
    oracle.finish(merged, tmp_path)
    assert "Merged from: `seed 1`" in (tmp_path / "oracle.md").read_text()

    other_teacher = part(1, 16.0)
    other_teacher["tasks"]["haze"]["teacher"]["psnr"] = 15.4
    with pytest.raises(ValueError, match="runs/s1.*stage-1"):
        oracle.merge_results([part(0, 15.0), other_teacher], "merge")
    with pytest.raises(ValueError, match="seed"):
        oracle.merge_results([part(0, 15.0), copy.deepcopy(part(0, 15.0))], "merge")


def test_ladder_probe_fast_counts_rungs_at_the_cap(tmp_path, capsys, weights_dir):
    from experiments import ladder_probe

    assert ladder_probe.main(["--tasks", "haze", "--out", str(tmp_path), "--fast"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| haze |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[1]) > 0 and all(c.endswith("%") for c in cells[2:5])
    slots, rungs = cells[5].rstrip(")").split(" (")
    assert 0 <= int(rungs) <= int(slots)


def test_bank_drift_fast_follows_every_labelling_round(tmp_path, capsys, weights_dir):
    from experiments import bank_drift

    assert bank_drift.main(["--task", "haze", "--out", str(tmp_path), "--fast"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [0, 1]  # fast: 6 steps, a round every 3
    first = [c.strip() for c in rows[0].strip("|").split("|")]
    assert int(first[2]) > 0 and int(first[5]) == int(first[2])  # round 0: every label is the stage-1 teacher's


def test_weight_path_fast_starts_at_the_teacher_and_ends_at_the_student(tmp_path, capsys, weights_dir):
    from experiments import weight_path

    assert weight_path.main(["--task", "haze", "--out", str(tmp_path), "--fast"]) == 0
    rows = {cells[0]: [float(c) for c in cells[1:]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2] != "m"
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    teacher, student = rows["stage-1 + 0 x (student - stage-1)"], rows["stage-1 + 1 x (student - stage-1)"]
    assert len(teacher) == 3 and teacher[0] == teacher[2]  # zero injection: every condition alike
    assert student != teacher
    assert len(rows) == len(weight_path.LAMBDAS) + 3
    # a mix takes the backbone from one share of the way and the injection from another
    start, end = {"w": torch.zeros(2), "inj": torch.zeros(2)}, {"w": torch.ones(2), "inj": 2 * torch.ones(2)}
    mixed = weight_path.mix(start, end, 1.0, {"inj"}, 0.0)
    assert mixed["w"].tolist() == [1.0, 1.0] and mixed["inj"].tolist() == [0.0, 0.0]
    assert weight_path.mix(start, end, 0.5, {"inj"})["inj"].tolist() == [1.0, 1.0]
