"""Bad configs fail at once with one clear error naming the field or file, before any work.

Three layers: ``load_config`` (unknown keys, wrong types, out-of-range values, bad YAML),
``qualiteacher.pipelines.train.preflight`` (missing weights, checkpoints and data folders), and the
commands users type: ``qualiteacher train`` and ``python -m qualiteacher.pipelines.train`` exit 2 with
the field name on stderr, no traceback, within seconds, and start neither Redis nor Ray
(the run folder is not even created).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qualiteacher.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"

# (YAML text, the field that must be named, a fragment of the reason)
BAD_YAML = {
    "unknown_key": ("iqa:\n  block_gird: 3\n", "iqa.block_gird", "Extra inputs are not permitted"),
    "unknown_section": ("trian:\n  steps: 3\n", "trian", "Extra inputs are not permitted"),
    "wrong_type": ("train:\n  steps: many\n", "train.steps", "valid integer"),
    "wrong_type_list": ("labelling:\n  augmentations: hflip\n", "labelling.augmentations", "valid list"),
    "wrong_type_section": ("iqa: [1, 2]\n", "iqa", "valid dictionary"),
    "wrong_choice": ("data:\n  task: fog\n", "data.task", "'snow', 'rain', 'haze', 'lowlight' or 'underwater'"),
    "out_of_range": ("ema:\n  decay: 1.5\n", "ema.decay", "less than 1"),
    "out_of_range_int": ("iqa:\n  block_grid: 0\n", "iqa.block_grid", "greater than or equal to 1"),
    "negative_weight": ("iqa:\n  metrics: {brisque: -1}\n", "iqa.metrics", "must be >= 0"),
    "unknown_metric": ("iqa:\n  metrics: {musiqq: 1}\n", "iqa.metrics", "unknown metric 'musiqq'"),
    "bad_prefix": ("redis:\n  prefix: 'a:b'\n", "redis.prefix", "should match pattern"),
    "bad_range": ("iqa:\n  ranges: {niqe: [9, 3]}\n", "iqa.ranges", "low < high"),
    "range_unknown_metric": ("iqa:\n  ranges: {nqie: [0, 1]}\n", "iqa.ranges", "unknown metric 'nqie'"),
    "bad_percentiles": ("iqa:\n  calibration_percentiles: [50, 10]\n", "iqa.calibration_percentiles", "low < high"),
    "bad_keep": ("drop:\n  calibrate_keep: 0\n", "drop.calibrate_keep", "greater than 0"),
    "reward_not_in_ensemble": ("iqa:\n  metrics: {brisque: 1}\n  reward_metrics: {niqe: 1}\n", "iqa",
                               "'niqe' is not in iqa.metrics"),
    "reward_no_gradients": ("iqa:\n  reward_metrics: {piqe: 1}\n", "iqa", "'piqe' has no gradients"),
    "reward_all_zero": ("iqa:\n  reward_metrics: {niqe: 0}\n", "iqa", "weight > 0"),
    "batch_pixels_zero": ("iqa:\n  max_batch_pixels: 0\n", "iqa.max_batch_pixels", "0 is not a number of pixels"),
    "batch_pixels_device": ("iqa:\n  max_batch_pixels: {tpu: 5}\n", "iqa.max_batch_pixels",
                            "unknown device type 'tpu'"),
    "batch_pixels_text": ("iqa:\n  max_batch_pixels: {cuda: many}\n", "iqa.max_batch_pixels",
                          "'many' for cuda is not"),
    "resource_builtin": ("labelling:\n  scorer_resources: {resources: {CPU: 2}}\n",
                         "labelling.scorer_resources.resources", "use num_cpus / num_gpus"),
    "resource_too_small": ("train:\n  worker_resources: {resources: {student: 0.00001}}\n",
                           "train.worker_resources.resources", "'student' must be a finite number >= 0.0001"),
    "resource_not_a_number": ("labelling:\n  teacher_resources: {resources: {teacher: lots}}\n",
                              "labelling.teacher_resources.resources.teacher", "valid number"),
    "inconsistent": ("model:\n  enc_blocks: [1, 1]\n  dec_blocks: [1]\n", "model", "same length"),
    "consistency_without_crop": ("iqa:\n  reward_metrics: {niqe: 1}\ndata:\n  crop_size: 96\n", "loss.consistency",
                                 "compare each image with itself"),
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- load_config
@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_load_config_names_the_field(tmp_path, case):
    text, field, reason = BAD_YAML[case]
    path = _write(tmp_path, case, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message  # the file
    assert f"  {field}:" in message or f"  {field}." in message, message  # the field, as a dotted path
    assert reason in message, message


def test_every_error_of_a_file_is_listed_at_once(tmp_path):
    path = _write(tmp_path, "many", "train:\n  steps: 0\n  lr: -1\nema:\n  decay: 2\nbogus: 1\n")
    message = str(pytest.raises(ConfigError, load_config, path).value)
    for field in ("train.steps", "train.lr", "ema.decay", "bogus"):
        assert f"  {field}:" in message, message


@pytest.mark.parametrize("text, fragment", [
    ("a: [\n", "is not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping at the top level"),
])
def test_unreadable_config_file(tmp_path, text, fragment):
    path = _write(tmp_path, "broken", text)
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert str(path) in message and fragment in message


def test_missing_config_file(tmp_path):
    message = str(pytest.raises(ConfigError, load_config, tmp_path / "nope.yaml").value)
    assert "not found" in message and "nope.yaml" in message


@pytest.mark.parametrize("override, fragment", [
    ("train.steps", "must look like section.field=value"),
    ("train.steps.x=1", "'steps' is not a section"),
    ("train.steps=-3", "train.steps"),
    ("iqa.metrics={niqe: x}", "iqa.metrics.niqe"),
])
def test_bad_overrides_name_the_field(override, fragment):
    message = str(pytest.raises(ConfigError, load_config, SMOKE, [override]).value)
    assert fragment in message, message


def test_config_objects_reject_bad_assignments():
    cfg = load_config(SMOKE)
    with pytest.raises(ValueError, match="block_grid"):
        cfg.iqa.block_grid = 0


# ---------------------------------------------------------------------------- baseline mode
# The fields the baseline sets (qualiteacher.config.BASELINE), for model_dump(exclude=...).
_BASELINE_FIELDS = {"train": {"mode"}, "labelling": {"augmentations", "ladder"}, "model": {"score_condition"},
                    "gating": {"top_k"}, "drop": {"enabled"},
                    "loss": {"preference": {"enabled"}, "consistency": {"enabled"}}}


def _is_baseline(cfg) -> bool:
    return (cfg.train.mode == "baseline" and cfg.labelling.augmentations == ["identity"]
            and cfg.labelling.ladder == [] and not cfg.model.score_condition and cfg.gating.top_k == 1
            and not cfg.drop.enabled and not cfg.loss.preference.enabled and not cfg.loss.consistency.enabled)


def test_baseline_mode_gives_the_fields_left_at_their_defaults_the_baselines_values():
    from qualiteacher.config import BASELINE, Config

    assert set(BASELINE) == {"labelling.augmentations", "labelling.ladder", "model.score_condition", "gating.top_k",
                             "drop.enabled", "loss.preference.enabled", "loss.consistency.enabled",
                             "train.backbone_lr_scale", "train.backbone_warmup_steps"}
    cfg = load_config(SMOKE, ["train.mode=baseline"])
    assert _is_baseline(cfg)
    # Explicit values that agree with the baseline are no conflict, nor is a baseline read back
    # from its dump (every field explicit), as Ray's actors and workers read it.
    assert _is_baseline(load_config(SMOKE, ["train.mode=baseline", "drop.enabled=false", "labelling.ladder=[]",
                                            "gating.top_k=1", "labelling.augmentations=[identity]"]))
    assert Config.model_validate(cfg.model_dump(mode="json")).model_dump() == cfg.model_dump()
    assert load_config(SMOKE).labelling.augmentations == ["hflip", "vflip", "rot90"]  # the method's own


@pytest.mark.parametrize("override, named, why", [
    ("labelling.ladder=[0.5]", "labelling.ladder=[0.5]", "the baseline uses no ladder"),
    ("labelling.augmentations=[hflip, vflip]", 'labelling.augmentations=["hflip", "vflip"]', "one teacher pass"),
    ("model.score_condition=true", "model.score_condition=true", "no score condition"),
    ("gating.top_k=3", "gating.top_k=3", "one bank entry per image"),
    ("drop.enabled=true", "drop.enabled=true", "no dual drop"),
    ("loss.preference.enabled=true", "loss.preference.enabled=true", "no preference loss"),
    ("loss.consistency={enabled: true}", "loss.consistency.enabled=true", "no consistency loss"),
])
def test_baseline_mode_refuses_an_explicit_method_field(override, named, why):
    message = str(pytest.raises(ConfigError, load_config, SMOKE, ["train.mode=baseline", override]).value)
    assert f"train.mode=baseline: {named} conflicts: the baseline" in message and why in message, message
    assert "remove it or use train.mode=qualiteacher" in message, message


def test_baseline_mode_names_every_method_field_of_a_yaml_file(tmp_path):
    quickstart = REPO / "configs" / "quickstart.yaml"  # sets the ladder and the dual drop
    message = str(pytest.raises(ConfigError, load_config, quickstart, ["train.mode=baseline"]).value)
    assert str(quickstart) in message and "remove them" in message, message
    assert "labelling.ladder=[0.0, 0.5] conflicts" in message and "drop.enabled=true conflicts" in message, message
    assert "loss.preference" not in message  # quickstart.yaml turns Eq. 8 off, as the baseline does
    path = _write(tmp_path, "mode", "train:\n  mode: baseline\ngating:\n  top_k: 2\n")
    assert "gating.top_k=2 conflicts" in str(pytest.raises(ConfigError, load_config, path).value)


def test_as_baseline_turns_a_method_config_into_its_baseline():
    """What the quality and oracle benchmarks do: the baseline of the config the method runs."""
    from qualiteacher.config import Config

    budget = REPO / "configs" / "quality_budget.yaml"
    method = load_config(budget, ["loss.preference.enabled=true", "loss.consistency.enabled=false"])
    calibrated = method.model_copy(update={"iqa": method.iqa.model_copy(update={"ranges": {"niqe": (2.5, 9.0)}})})
    baseline = calibrated.as_baseline()
    assert _is_baseline(baseline) and baseline.iqa.ranges == {"niqe": (2.5, 9.0)}
    assert baseline.model_dump(exclude=_BASELINE_FIELDS) == calibrated.model_dump(exclude=_BASELINE_FIELDS)
    assert calibrated.train.mode == "qualiteacher" and calibrated.labelling.ladder == [0.0, 0.5]  # untouched
    assert calibrated.drop.enabled and calibrated.loss.preference.enabled
    # What the Ray actors read back, and what the mode alone makes of the file without the
    # method fields it sets: the same config.
    assert Config.model_validate(baseline.model_dump(mode="json")).model_dump() == baseline.model_dump()
    import yaml

    data = yaml.safe_load(budget.read_text())
    del data["labelling"]["ladder"], data["drop"]["enabled"]
    data["train"]["mode"] = "baseline"
    assert Config.model_validate(data).model_dump() == method.as_baseline().model_dump()


# ---------------------------------------------------------------------------- preflight
def test_preflight_missing_metric_weights_names_the_file(tmp_path):
    from qualiteacher.pipelines.train import preflight

    cfg = load_config(SMOKE, ["iqa.metrics={musiq: 1}", f"paths.weights_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError) as info:
        preflight(cfg)
    message = str(info.value)
    assert "musiq" in message and str(tmp_path / "hub/pyiqa/musiq_koniq_ckpt-e95806b9.pth") in message
    assert "paths.weights_dir" in message  # and how to point at the right folder


def test_preflight_missing_offline_parameters_names_the_files(tmp_path):
    from qualiteacher.pipelines.train import preflight

    cfg = load_config(SMOKE, [f"paths.weights_dir={tmp_path}"])  # brisque + niqe + piqe, nothing prepared
    message = str(pytest.raises(FileNotFoundError, preflight, cfg).value)
    assert "brisque_svm_weights.pth" in message and "qualiteacher weights prepare" in message


def test_preflight_missing_perceptual_weights(tmp_path, weights_dir):
    from qualiteacher.pipelines.train import preflight

    empty = tmp_path / "w"
    cfg = load_config(SMOKE, ["iqa.metrics={piqe: 1}", f"paths.weights_dir={empty}", "loss.perceptual_weight=0.1"])
    message = str(pytest.raises(FileNotFoundError, preflight, cfg).value)
    assert "loss.perceptual_weight" in message and "vgg19-dcbb9e9d.pth" in message


def test_preflight_missing_pretrain_checkpoint(tmp_path, weights_dir):
    from qualiteacher.pipelines.train import preflight

    cfg = load_config(SMOKE, [f"pretrain.checkpoint={tmp_path / 'stage1.pt'}"])
    message = str(pytest.raises(FileNotFoundError, preflight, cfg).value)
    assert "pretrain.checkpoint" in message and "stage1.pt" in message


def test_preflight_missing_data_folder(tmp_path, weights_dir):
    from qualiteacher.pipelines.train import preflight

    for d in ("in", "tg"):
        (tmp_path / d).mkdir()
    cfg = load_config(SMOKE, [f"data.paired_input_dir={tmp_path / 'in'}", f"data.paired_target_dir={tmp_path / 'tg'}",
                              f"data.unpaired_dir={tmp_path / 'nope'}"])
    message = str(pytest.raises(FileNotFoundError, preflight, cfg).value)
    assert "data.unpaired_dir" in message and str(tmp_path / "nope") in message


def test_preflight_partial_data_folders(tmp_path, weights_dir):
    """Setting only some of the three folders would silently train on the bundled samples."""
    from qualiteacher.pipelines.train import preflight

    cfg = load_config(SMOKE, [f"data.unpaired_dir={tmp_path}"])
    message = str(pytest.raises(ConfigError, preflight, cfg).value)
    assert "data.paired_input_dir" in message and "data.paired_target_dir" in message


def test_preflight_passes_a_good_config(weights_dir):
    from qualiteacher.pipelines.train import preflight

    preflight(load_config(SMOKE))


# ---------------------------------------------------------------------------- the commands
def _run(args: list[str], run_dir: Path, env_extra: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    env.pop("REDIS_URL", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, *args, "--run-dir", str(run_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False, env=env)
    return proc, time.monotonic() - t0


def _assert_refused(proc: subprocess.CompletedProcess, elapsed: float, run_dir: Path, *fragments: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Ray" not in err and "redis-server" not in err, err  # nothing was started
    assert not run_dir.exists()  # the run folder is not even created
    assert elapsed < 60, elapsed  # seconds (imports), not a Ray start-up; generous for a loaded machine


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "out_of_range"])
def test_cli_train_bad_config_exits_2(tmp_path, case):
    text, field, reason = BAD_YAML[case]
    bad = _write(tmp_path, case, text)
    run_dir = tmp_path / "run"
    proc, elapsed = _run(["-m", "qualiteacher.pipelines.cli", "train", "--config", str(bad)], run_dir)
    _assert_refused(proc, elapsed, run_dir, field, reason, str(bad))
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1
    print(f"{case}: refused in {elapsed:.1f} s")


def test_cli_train_missing_weights_exits_2(tmp_path):
    run_dir, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    proc, elapsed = _run(["-m", "qualiteacher.pipelines.cli", "train", "--config", str(SMOKE), "--set", "iqa.metrics={musiq: 1}",
                          "--set", f"paths.weights_dir={empty}"], run_dir)
    _assert_refused(proc, elapsed, run_dir, "musiq_koniq_ckpt-e95806b9.pth", str(empty))


def test_cli_train_missing_data_folder_exits_2(tmp_path, weights_dir):
    run_dir = tmp_path / "run"
    (tmp_path / "in").mkdir()
    proc, elapsed = _run(["-m", "qualiteacher.pipelines.cli", "train", "--config", str(SMOKE),
                          "--set", f"data.paired_input_dir={tmp_path / 'in'}",
                          "--set", f"data.paired_target_dir={tmp_path / 'in'}",
                          "--set", f"data.unpaired_dir={tmp_path / 'nope'}"], run_dir)
    _assert_refused(proc, elapsed, run_dir, "data.unpaired_dir", str(tmp_path / "nope"))


def test_job_entrypoint_bad_config_exits_2(tmp_path):
    """`ray job submit -- python -m qualiteacher.pipelines.train --config bad.yaml`: the same clear error."""
    text, field, reason = BAD_YAML["out_of_range"]
    bad = _write(tmp_path, "bad", text)
    run_dir = tmp_path / "run"
    proc, elapsed = _run(["-m", "qualiteacher.pipelines.train", "--config", str(bad)], run_dir)
    _assert_refused(proc, elapsed, run_dir, field, reason)


def test_job_entrypoint_is_the_cli_train_command():
    """`python -m qualiteacher.pipelines.train` has no parser of its own: its help is `qualiteacher train`'s."""
    def help_text(*args: str) -> str:
        proc = subprocess.run([sys.executable, *args, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120, check=True)
        return proc.stdout

    job = help_text("-m", "qualiteacher.pipelines.train")
    assert job.startswith("usage: qualiteacher train") and job == help_text("-m", "qualiteacher.pipelines.cli", "train")
    assert all(option in job for option in ("--config", "--set", "--run-dir", "--weights-dir"))
