"""A run folder resumes only the run it holds (qualiteacher/run_settings.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qualiteacher.config import ConfigError, load_config
from qualiteacher.run_dir import RunDir
from qualiteacher.run_settings import check_run_settings, method_settings

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return load_config(REPO / "configs/quickstart.yaml", list(overrides))


def test_the_first_start_records_the_settings_and_the_same_ones_resume(tmp_path: Path) -> None:
    folder = RunDir(tmp_path)
    check_run_settings(_cfg(), folder)
    recorded = json.loads(folder.settings.read_text())
    assert recorded["labelling.ladder_levels"] == "constructed" and recorded["data.task"] == "haze"
    assert recorded == method_settings(_cfg())
    check_run_settings(_cfg(), folder)  # the same settings: resumes


def test_how_much_and_where_a_run_works_may_change_on_resume(tmp_path: Path) -> None:
    folder = RunDir(tmp_path)
    check_run_settings(_cfg(), folder)
    check_run_settings(_cfg("train.steps=400", "labelling.scorers=3", "train.use_gpu=true", "iqa.device=cpu",
                            "redis.prefix=other", "labelling.scorer_resources.num_cpus=2"), folder)
    assert "train.steps" not in json.loads(folder.settings.read_text())


def test_a_changed_method_setting_is_an_error_naming_every_field(tmp_path: Path) -> None:
    folder = RunDir(tmp_path)
    check_run_settings(_cfg(), folder)
    with pytest.raises(ConfigError) as err:
        check_run_settings(_cfg("labelling.ladder_levels=scored", "ema.decay=0.99"), folder)
    message = str(err.value)
    assert str(tmp_path) in message and "--run-dir" in message
    assert 'labelling.ladder_levels: the run has "constructed", this start "scored"' in message
    assert "ema.decay: the run has 0.9999, this start 0.99" in message
    assert "train.steps" not in message


def test_a_field_added_after_the_run_started_reads_as_its_default(tmp_path: Path) -> None:
    """A run recorded by an older version (without train.backbone_warmup_steps) resumes at
    that field's default and refuses another value."""
    folder = RunDir(tmp_path)
    check_run_settings(_cfg(), folder)
    older = json.loads(folder.settings.read_text())
    del older["train.backbone_warmup_steps"]
    folder.settings.write_text(json.dumps(older))
    check_run_settings(_cfg(), folder)
    with pytest.raises(ConfigError, match="train.backbone_warmup_steps: the run has 0, this start 50"):
        check_run_settings(_cfg("train.backbone_warmup_steps=50"), folder)


def test_the_job_checks_the_settings_before_it_starts_anything(tmp_path: Path, weights_dir: Path) -> None:
    from qualiteacher.pipelines.train import run

    check_run_settings(_cfg(), RunDir(tmp_path))
    cfg = _cfg("loss.supervised_weight=0.5", f"paths.weights_dir={weights_dir}")
    with pytest.raises(ConfigError, match="loss.supervised_weight"):
        run(cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]  # no Redis, no data, no pretraining
