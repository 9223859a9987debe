"""The quality benchmark's fast variant runs end to end and writes its report.

Only that it works is checked, never the quality it measures: `--fast` trains a smoke-sized
model for a few steps and its numbers mean nothing. The session's Ray cluster is reused.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import parse_result


def test_quality_fast_writes_report(capsys, ray_cluster, weights_dir, tmp_path):
    from experiments.quality.args import FAST_SWEEP
    from experiments.quality.run import RESULT_KEYS, TASK_KEYS, main
    from experiments.quality.targets import METHODS

    out = tmp_path / "report"
    # Calibrated scores, as in the real budget (the smoke config does not calibrate).
    results = main(["--fast", "--tasks", "haze", "--out", str(out), "--set", "iqa.calibrate=true"])

    for name in ("report.md", "results.json", "controllability.png", "per_task.png", "grid_haze.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in ("controllability.png", "per_task.png", "grid_haze.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["fast"] is True and on_disk["tasks_run"] == ["haze"]
    for key in RESULT_KEYS:
        assert key in on_disk, key
    task = on_disk["tasks"]["haze"]
    for key in TASK_KEYS:
        assert key in task, key
    for method in METHODS:
        for metric in ("psnr", "ssim", "ensemble"):
            assert math.isfinite(task["methods"][method][metric]), (method, metric)
    assert [s["score"] for s in task["sweep"]] == list(FAST_SWEEP)
    assert set(task["comparisons"]) == {"psnr_vs_teacher", "psnr_vs_baseline", "ensemble_vs_teacher",
                                        "ensemble_vs_baseline"}
    assert {"rho", "p_value", "met"} <= set(task["spearman"])
    # The run calibrated its score scale; the sweep is also read on that scale.
    calibrated = task["spearman"]["calibrated"]
    assert calibrated is not None and set(calibrated["ranges"]) == {"brisque", "niqe", "piqe"}
    assert all(math.isfinite(s["ensemble_calibrated"]) for s in task["sweep"])
    assert "run's calibrated ranges" in (out / "report.md").read_text()
    for mode in ("qualiteacher", "baseline"):
        assert task["runs"][mode]["steps"] == 4 and task["runs"][mode]["checkpoint"]
    assert isinstance(on_disk["tasks_won"], int) and on_disk["tasks_won"] == results["tasks_won"]

    report = (out / "report.md").read_text()
    assert "FAST MODE" in report and "grid_haze.png" in report and "controllability.png" in report

    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    result = parse_result(lines[-1])
    assert (result.name, result.unit, result.target) == ("quality_tasks_won", "tasks", 4.0)
    assert result.value == on_disk["tasks_won"]


def test_quality_rejects_unknown_task():
    from experiments.quality.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--tasks", "fog"])


def test_ablation_fast_writes_report(capsys, ray_cluster, weights_dir, tmp_path):
    """Rows (a) and (b): the unconditioned and the conditioned start, the sweep, the margins."""
    from experiments import ablation

    out = tmp_path / "ablation"
    results = ablation.main(["--fast", "--tasks", "haze", "--rows", "b,a", "--out", str(out)])

    for name in ("ablation.md", "ablation.json", "ablation.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    task = json.loads((out / "ablation.json").read_text())["tasks"]["haze"]
    assert list(task["rows"]) == ["a", "b"]  # table order, whatever the order asked
    a, b = task["rows"]["a"], task["rows"]["b"]
    assert "model.score_condition=false" in a["overrides"] and "spearman" not in a
    assert [p["score"] for p in b["sweep"]] == list(ablation.FAST_SWEEP)
    for row in (a, b):
        assert len(row["runs"]) == 1 and row["runs"][0]["run"]["steps"] == 4
        assert all(math.isfinite(row["at_cap"][m]) for m in ("psnr", "ssim", "ensemble"))
    assert "vs_previous" not in a and isinstance(b["helps"], bool)
    assert b["vs_previous"]["psnr"] == pytest.approx(b["at_cap"]["psnr"] - a["at_cap"]["psnr"])
    assert results["parts_compared"] == 1 and results["parts_helping"] == int(b["helps"])
    assert "FAST MODE" in (out / "ablation.md").read_text()

    result = parse_result([line for line in capsys.readouterr().out.splitlines() if line.strip()][-1])
    assert (result.name, result.value, result.target) == ("ablation_parts_helping", results["parts_helping"], 1.0)


def _at_cap(psnr: float, nr: list[float]) -> dict:
    per_image = [{"file": f"{i}.png", "psnr": psnr, "ensemble": v} for i, v in enumerate(nr)]
    finite = [v for v in nr if math.isfinite(v)]
    return {"psnr": psnr, "ensemble": sum(finite) / len(finite), "per_image": per_image}


def test_ablation_marks_a_part_helping_only_next_to_the_row_it_adds_to():
    from experiments.ablation import mark_helping

    teacher = _at_cap(17.0, [8.0, 8.0])
    rows = {"a": {"at_cap": _at_cap(17.5, [8.0, 8.0])},
            "b": {"at_cap": _at_cap(17.6, [8.2, float("nan")])},  # NR over the image both sides scored
            "c": {"at_cap": _at_cap(17.7, [7.9, 8.5])},
            "e": {"at_cap": _at_cap(18.0, [9.0, 9.0])}}  # (d) not run: (e) has no row before it
    mark_helping(rows, teacher)
    assert rows["b"]["helps"] and rows["b"]["vs_previous"]["nr_images"] == 1
    assert rows["b"]["vs_previous"]["ensemble"] == pytest.approx(0.2)
    assert not rows["c"]["helps"]  # PSNR up, NR down
    assert "helps" not in rows["a"] and "helps" not in rows["e"]
    assert rows["e"]["vs_teacher"]["psnr"] == pytest.approx(1.0)


def test_ablation_rejects_unknown_row():
    from experiments import ablation

    with pytest.raises(SystemExit):
        ablation.parse_args(["--rows", "a,f"])


def test_ablation_row_is_the_mean_of_its_runs():
    from experiments.ablation import mean_of_runs

    def run(psnr: float, nr: list[float], rho: float) -> dict:
        at_cap = _at_cap(psnr, nr) | {"ssim": 0.5, "nr_failed": 0, "count": len(nr)}
        sweep = [{"score": s, "psnr": psnr, "ssim": 0.5, "ensemble": nr[0] + s} for s in (0.0, 7.0)]
        return {"at_cap": at_cap, "run": {"elapsed_s": 10.0}, "sweep": sweep, "spearman": {"rho": rho}}

    row = mean_of_runs([run(17.0, [8.0, 6.0], 1.0), run(18.0, [9.0, float("nan")], -1.0)])
    assert row["at_cap"]["psnr"] == pytest.approx(17.5) and row["range"]["psnr"] == [17.0, 18.0]
    assert row["at_cap"]["per_image"][0]["ensemble"] == pytest.approx(8.5)
    assert math.isnan(row["at_cap"]["per_image"][1]["ensemble"])  # unscored in one run: out of NR margins
    assert [p["ensemble"] for p in row["sweep"]] == pytest.approx([8.5, 15.5])
    assert row["spearman"]["rho"] == pytest.approx(1.0) and row["spearman"]["per_run"] == [1.0, -1.0]
