"""The speed benchmarks' fast variants run and end with a parseable RESULT line.

Only that they work is checked, never how fast anything is: `--fast` sizes are tiny and
their numbers mean nothing. The session's Redis server and Ray cluster are reused.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.common import format_number, parse_result, result_line


def _last_result(capsys, name: str, unit: str):
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines, "the benchmark printed nothing"
    result = parse_result(lines[-1])
    assert result.name == name and result.unit == unit
    assert math.isfinite(result.value) and math.isfinite(result.target)
    return result


def test_result_line_round_trips():
    line = result_line("iqa_speedup", 3.41234, "x", 3)
    assert line == "RESULT iqa_speedup 3.412 x target 3"
    r = parse_result(line)
    assert (r.name, r.value, r.unit, r.target) == ("iqa_speedup", 3.412, "x", 3.0)
    assert format_number(1234.5678) == "1235" and format_number(0.012345) == "0.01235"
    with pytest.raises(ValueError):
        parse_result("RESULT missing target")


def test_iqa_throughput_fast(capsys, weights_dir):
    from benchmarks import iqa_throughput

    iqa_throughput.main(["--fast"])
    _last_result(capsys, "iqa_speedup", "x")


def test_student_throughput_fast(capsys):
    from benchmarks import student_throughput

    student_throughput.main(["--fast"])
    _last_result(capsys, "student_speedup", "x")


def test_bank_gating_fast(capsys, redis_url):
    from benchmarks import bank_gating

    bank_gating.main(["--fast"], redis_url=redis_url)
    r = _last_result(capsys, "gate_vs_set", "ratio")
    assert r.value > 0


def test_bank_memory_fast(capsys, redis_url):
    from benchmarks import bank_memory

    bank_memory.main(["--fast"], redis_url=redis_url)
    r = _last_result(capsys, "bank_bytes_per_entry", "MiB")
    assert r.value > 0


def test_weight_push_fast(capsys, ray_cluster):
    from benchmarks import weight_push

    weight_push.main(["--fast"])
    _last_result(capsys, "push_latency_25m_4", "ms")


def test_scorer_scaling_fast(capsys, ray_cluster, redis_url, weights_dir):
    from benchmarks import scorer_scaling

    scorer_scaling.main(["--fast"], redis_url=redis_url)
    _last_result(capsys, "scorer_scaling", "x")


def test_labelling_efficiency_fast(capsys, ray_cluster, redis_url, weights_dir):
    from benchmarks import labelling_efficiency

    labelling_efficiency.main(["--fast"], redis_url=redis_url)
    r = _last_result(capsys, "duplicate_share", "%")
    assert 0 <= r.value <= 100
