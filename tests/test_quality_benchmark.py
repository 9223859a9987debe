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
    from benchmarks import quality

    out = tmp_path / "report"
    # Calibrated scores, as in the real budget (the smoke config does not calibrate).
    results = quality.main(["--fast", "--tasks", "haze", "--out", str(out), "--set", "iqa.calibrate=true"])

    for name in ("report.md", "results.json", "controllability.png", "per_task.png", "grid_haze.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in ("controllability.png", "per_task.png", "grid_haze.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["fast"] is True and on_disk["tasks_run"] == ["haze"]
    for key in quality.RESULT_KEYS:
        assert key in on_disk, key
    task = on_disk["tasks"]["haze"]
    for key in quality.TASK_KEYS:
        assert key in task, key
    for method in quality.METHODS:
        for metric in ("psnr", "ssim", "ensemble"):
            assert math.isfinite(task["methods"][method][metric]), (method, metric)
    assert [s["score"] for s in task["sweep"]] == list(quality.FAST_SWEEP)
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
    from benchmarks import quality

    with pytest.raises(SystemExit):
        quality.parse_args(["--tasks", "fog"])
