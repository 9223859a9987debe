"""QualiTeacher training job: the `ray job submit` entrypoint, also run locally by the CLI.

    ray job submit --working-dir . -- python -m qualiteacher.pipelines.train --config configs/quickstart.yaml

`python -m qualiteacher.pipelines.train ARGS` is `qualiteacher train ARGS` (`pipelines/cli.py` parses both).

Joins the Ray cluster it runs in (or starts a local one), uses Redis from `redis.url` /
$REDIS_URL (or starts an embedded one in the run folder), prepares data, takes the stage-1
model (pretraining it when none is given), starts the labeller (teachers + scorers) and the
Ray Train student, and writes `summary.json` in the run folder at the end. Re-running with
the same run folder resumes from the latest checkpoint and reuses the bank.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import ray
import torch
from qualiteacher.pipelines.progress import ProgressReporter
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.names import LABELLER
from qualiteacher.services.nodes import node_changes, node_table
from qualiteacher.services.redis_server import redact_url, redis_client, resolve_redis

from qualiteacher.checkpoint import load_training_state
from qualiteacher.config import Config, ConfigError
from qualiteacher.fileio import atomic_write_json
from qualiteacher.flat_weights import flatten
from qualiteacher.run_dir import TRAIN_RUN_NAME, RunDir
from qualiteacher.run_settings import check_run_settings

log = logging.getLogger("qualiteacher.train")


def init_ray(cfg: Config) -> None:
    """Join the cluster we were submitted to (or cfg.ray.address), else start a local one."""
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"namespace": cfg.ray.namespace, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Logical CPUs: actors ask for fractions; more logical than physical CPUs is fine here.
        # The dashboard (on 127.0.0.1) serves Ray's state API: without it Ray Train's placement
        # group cleaner cannot see its controller, warns every few seconds and cleans nothing.
        ray.init(num_cpus=cfg.ray.local_num_cpus or max(4, os.cpu_count() or 1),
                 include_dashboard=True, **kwargs)


def warn_unplaceable(cfg: Config) -> None:
    """Name the roles whose custom resources no node has now: their actors wait for such a
    node (a typo in a resource name would otherwise look like a hang)."""
    from qualiteacher.services.placement import unplaceable_roles

    for field, names in unplaceable_roles(cfg, ray.cluster_resources()).items():
        log.warning("%s asks for %s, which no node of the cluster has now: its actors wait until "
                    "a node with %s joins", field, ", ".join(names), "them" if len(names) > 1 else "it")


def prepare_data(cfg: Config, run_folder: RunDir) -> dict[str, Path]:
    """User folders from config, else the bundled samples with synthetic degradations.

    Absolute paths: they are handed to Ray actors and Ray Train workers, whose working
    directory need not be the driver's (a cluster started elsewhere; Ray Train used to move
    its workers into the run folder, where a relative `--run-dir` failed).
    """
    d = cfg.data
    if d.paired_input_dir and d.paired_target_dir and d.unpaired_dir:
        return {"paired_input": Path(d.paired_input_dir).resolve(),
                "paired_target": Path(d.paired_target_dir).resolve(), "unpaired": Path(d.unpaired_dir).resolve()}
    from qualiteacher.data.samples import SPLITS, make_task_sets

    sets = {split: run_folder.data_split(split) for split in SPLITS}
    if not all(p.is_dir() and any(p.iterdir()) for p in sets.values()):
        # Deterministic in (task, seed): a resumed run finds the same sets already there.
        sets = make_task_sets(d.task, run_folder.data, seed=cfg.seed, size=cfg.labelling.image_size or 128,
                              overwrite=True, test_split=d.bundled_test_split)
    return {"paired_input": sets["paired/input"], "paired_target": sets["paired/target"],
            "unpaired": sets["unpaired/input"], "test_input": sets["test/input"],
            "test_target": sets["test/target"]}


def initial_teacher(cfg: Config, run_folder: RunDir, data: dict[str, Path]) -> tuple[dict, dict, int]:
    """(student init state, teacher state, teacher version) for this run."""
    from qualiteacher.pipelines.pretrain import pretrain

    from qualiteacher.checkpoint import load_restorer

    stage1 = cfg.pretrain.checkpoint or run_folder.pretrain
    if not Path(stage1).exists():
        log.info("pretraining the stage-1 teacher (%d steps)", cfg.pretrain.steps)
        pretrain(cfg, data["paired_input"], data["paired_target"], Path(stage1), log=log.info)
    # Built from this run's model config: a stage-1 file with or without score injection fits.
    model, _ = load_restorer(Path(stage1), model_cfg=cfg.model)
    init_state = model.state_dict()
    resume = run_folder.latest_checkpoint()
    if resume is None:
        return init_state, init_state, 0
    state = load_training_state(resume)
    log.info("resuming: teacher version %d from %s", state["teacher_version"], resume)
    return init_state, state["ema"]["teacher"], int(state["teacher_version"])


def calibrate_run(cfg: Config, run_folder: RunDir, data: dict[str, Path], teacher_state: dict) -> Config:
    """The config with `iqa.ranges` fitted to the run's data (with `iqa.calibrate`) and the
    drop thresholds fitted on the run's scale (with `drop.calibrate_keep`); see
    `qualiteacher.calibration`.

    Fitted once per run folder and saved there: a resumed run reads the same file, so the
    scores already in the bank stay comparable with new ones. Ranges set by hand win.
    """
    from qualiteacher.calibration import Calibration

    if not cfg.iqa.calibrate and cfg.drop.calibrate_keep is None:
        return cfg
    path = run_folder.calibration
    if path.exists():
        fitted = Calibration.load(path)
    else:
        fitted = _fit_calibration(cfg, data, teacher_state)
        fitted.save(path)
    calibrated = fitted.applied_to(cfg)
    if cfg.iqa.calibrate:
        log.info("IQA ranges fitted on %d images (%s): %s", fitted.images, path,
                 ", ".join(f"{k} [{lo:.3g}, {hi:.3g}]" for k, (lo, hi) in calibrated.iqa.ranges.items()))
    if calibrated.drop != cfg.drop:
        log.info("drop thresholds fitted: tau_multi %.4g, tau_aug %.4g", fitted.tau_multi, fitted.tau_aug)
    return calibrated


def _image_batches(images: list[np.ndarray], size: int = 8) -> list[torch.Tensor]:
    """Float batches of at most `size` images, images of one shape together."""
    from qualiteacher.imageio import to_tensor

    by_shape: dict[tuple, list] = {}
    for img in images:
        by_shape.setdefault(img.shape, []).append(img)
    return [torch.cat([to_tensor(img) for img in group[i:i + size]])
            for group in by_shape.values() for i in range(0, len(group), size)]


def _spread_picks(images: list[np.ndarray], n: int) -> list[np.ndarray]:
    return [images[i] for i in np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)]


def _fit_calibration(cfg: Config, data: dict[str, Path], teacher_state: dict):
    from qualiteacher.calibration import calibrate
    from qualiteacher.data.paired import UnpairedImages
    from qualiteacher.iqa.ensemble import IQAEnsemble
    from qualiteacher.models.build import build_model

    size, max_pixels = cfg.labelling.image_size, cfg.data.max_image_pixels
    images = UnpairedImages(data["unpaired"], size=size, max_pixels=max_pixels)
    clean = UnpairedImages(data["paired_target"], size=size, max_pixels=max_pixels)
    n = cfg.iqa.calibration_images
    # The run's scale: the ranges of the config (registry ranges and any set by hand) unless fitted.
    ensemble = IQAEnsemble(cfg.iqa.metrics, cfg.paths.resolved_weights_dir(), cfg.iqa.device, cfg.iqa.ranges)
    model = build_model(cfg.model).eval()
    model.load_state_dict(teacher_state)
    model.to(ensemble.device)
    return calibrate(ensemble, model, _image_batches(_spread_picks(images.images, n)),
                     tuple(cfg.labelling.augmentations), cfg.iqa.calibration_percentiles, cfg.drop.calibrate_keep,
                     clean=_image_batches(_spread_picks(clean.images, n)), fit_scale=cfg.iqa.calibrate)


def start_labeller(cfg: Config, redis_url: str, unpaired_dir: Path, teacher_state: dict, version: int):
    """The labeller actor, on the driver's node. Its handle goes to the student through
    `run_student`; its name (`qualiteacher.services.names.LABELLER`) is for outside tools (`qualiteacher scale`)."""
    from qualiteacher.services.labeller import Labeller
    from qualiteacher.services.placement import on_driver_node

    from qualiteacher.data.paired import UnpairedImages

    try:
        unpaired = UnpairedImages(unpaired_dir, size=cfg.labelling.image_size,
                                  max_pixels=cfg.data.max_image_pixels)
    except ValueError as exc:  # nothing readable in the folder
        raise SystemExit(f"no usable images in the unpaired folder {unpaired_dir}: {exc}") from None
    for path, reason in unpaired.errors:
        log.warning("skipping %s: %s", path, reason)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    labeller = ray.remote(Labeller).options(
        name=LABELLER, namespace=cfg.ray.namespace, num_cpus=0, max_concurrency=8, lifetime=None,
        scheduling_strategy=on_driver_node(),  # shares the driver's fate, like Ray Train's controller
    ).remote(cfg.model_dump(mode="json"), redis_url, unpaired.ids, unpaired.images,
             [ray.put(flatten(teacher_state))], version, gpus)
    return labeller


def run_student(cfg: Config, run_folder: RunDir, redis_url: str, data: dict, init_state: dict, version: int,
                labeller: ray.actor.ActorHandle):
    """Ray Train's fit of the student. The workers get the labeller's handle in their config:
    the labeller is never restarted (no max_restarts), so the handle stays valid for every
    worker group Ray Train starts in this job, restarts included."""
    from qualiteacher.services.placement import train_worker_resources
    from qualiteacher.services.student import train_loop_per_worker
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    # Ray Train would move each worker into its run folder; staying in the job's working
    # directory, like every other actor, keeps relative paths (e.g. paths.weights_dir) valid.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    use_gpu = tc.use_gpu and ray.cluster_resources().get("GPU", 0) > 0
    resources = train_worker_resources(tc.worker_resources, use_gpu)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "redis_url": redis_url,
            "paired_input_dir": str(data["paired_input"]), "paired_target_dir": str(data["paired_target"]),
            "unpaired_dir": str(data["unpaired"]), "run_dir": str(run_folder.root),
            "init_state": [ray.put(init_state)], "init_version": version, "labeller": labeller,
        },
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=TRAIN_RUN_NAME, storage_path=str(run_folder.ray_train),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
    )
    return trainer.fit()


def _bank(cfg: Config, redis_url: str) -> MemoryBank:
    return MemoryBank(redis_client(redis_url), cfg.redis.prefix, cfg.gating.top_k)


def preflight(cfg: Config) -> None:
    """Fail before any work starts when a metric or loss file or a data folder is missing."""
    from qualiteacher.iqa.registry import get_spec
    from qualiteacher.iqa.weights import require_weights
    from qualiteacher.losses.perceptual import vgg19_weights_path

    weights_dir = cfg.paths.resolved_weights_dir()
    for name in cfg.iqa.metrics:
        require_weights(get_spec(name), weights_dir)
    vgg = vgg19_weights_path(weights_dir)
    if cfg.loss.perceptual_weight > 0 and not vgg.is_file():
        raise FileNotFoundError(
            f"loss.perceptual_weight > 0 needs VGG-19 weights at {vgg} "
            "(torchvision's vgg19-dcbb9e9d.pth); set the weight to 0, place the file there or run "
            "`qualiteacher weights download --metrics vgg19`")
    from qualiteacher.iqa.registry import METRICS

    size = cfg.labelling.image_size
    too_big = [f"{m} needs {METRICS[m].min_size} px" for m in cfg.iqa.metrics if size and METRICS[m].min_size > size]
    if too_big:
        raise ConfigError(f"labelling.image_size={size} is too small for the ensemble ({', '.join(too_big)})")
    reward_side = cfg.iqa.reward_min_size()
    uses_reward = cfg.train.mode == "qualiteacher" and (cfg.loss.preference.enabled or cfg.loss.consistency.enabled)
    if uses_reward and reward_side and cfg.data.crop_size < reward_side:
        raise ConfigError(f"data.crop_size={cfg.data.crop_size} is too small for the reward of the preference / "
                          f"consistency losses (iqa.reward_metrics: needs {reward_side} px)")
    if cfg.pretrain.checkpoint is not None and not cfg.pretrain.checkpoint.exists():
        raise FileNotFoundError(f"pretrain.checkpoint not found: {cfg.pretrain.checkpoint}")
    # The user's data folders are used only when all three are set (else the bundled samples):
    # a partial set would silently train on the samples.
    folders = {f"data.{k}": getattr(cfg.data, k) for k in ("paired_input_dir", "paired_target_dir", "unpaired_dir")}
    given = {k: v for k, v in folders.items() if v is not None}
    if given and len(given) < len(folders):
        missing = ", ".join(k for k in folders if k not in given)
        raise ConfigError(f"{missing} must be set as well: training uses your own data only when "
                          f"{', '.join(folders)} are all set")
    for field, folder in given.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"{field}: folder {folder} does not exist or is not a directory")


def bank_summary(bank: MemoryBank) -> dict:
    """The bank's part of summary.json. Totals come from the gate's counters, so the cost
    does not grow with the bank: two round trips, never one per image."""
    stats = bank.stats()
    return {"bank_images": stats["images"], "bank_entries": stats["entries"],
            "max_entries_per_image": bank.max_entries_per_image(), "dropped": stats["drops"],
            "bank_stats": stats}


def faults_summary(label_stats: dict, nodes_before: dict, nodes_after: dict, student_starts: int) -> dict:
    """What went wrong in this run and was recovered from: nodes lost and joined, teacher
    calls lost to dead teachers, scorers replaced, Ray Train restarts of the student."""
    return {**node_changes(nodes_before, nodes_after),
            "teacher_failures": label_stats.get("teacher_failures", 0),
            "scorers_replaced": label_stats.get("scorers_replaced", 0),
            "student_restarts": max(student_starts - 1, 0)}


def run(cfg: Config, run_dir: Path) -> dict:
    """The whole job; returns the summary written to run_dir/summary.json."""
    started = time.monotonic()
    preflight(cfg)
    run_folder = RunDir(run_dir)
    run_folder.root.mkdir(parents=True, exist_ok=True)
    check_run_settings(cfg, run_folder)  # a run folder resumes only the run it holds
    torch.manual_seed(cfg.seed)
    with ExitStack() as stack:
        redis_url, embedded = resolve_redis(cfg.redis.url, run_folder.redis)
        if embedded is not None:
            stack.enter_context(embedded)
        log.info("redis: %s", redact_url(redis_url))
        init_ray(cfg)
        warn_unplaceable(cfg)
        data = prepare_data(cfg, run_folder)
        init_state, teacher_state, version = initial_teacher(cfg, run_folder, data)
        cfg = calibrate_run(cfg, run_folder, data, teacher_state)
        nodes, starts = node_table(), _bank(cfg, redis_url).status.read().student_starts
        labeller = start_labeller(cfg, redis_url, data["unpaired"], teacher_state, version)
        labelling = labeller.run.remote()
        progress = ProgressReporter(_bank(cfg, redis_url))
        progress.start()
        try:
            result = run_student(cfg, run_folder, redis_url, data, init_state, version, labeller)
        finally:
            progress.stop()
            labeller.stop.remote()
        label_stats = ray.get(labelling)
        teacher_versions = ray.get(labeller.teacher_versions.remote())
        ray.kill(labeller)
        summary = _summary(cfg, run_folder, redis_url, result, label_stats, teacher_versions, started)
        summary["faults"] = faults_summary(label_stats, nodes, node_table(),
                                           _bank(cfg, redis_url).status.read().student_starts - starts)
    atomic_write_json(run_folder.summary, summary)
    return summary


def _summary(cfg, run_folder: RunDir, redis_url, result, label_stats, teacher_versions, started) -> dict:
    checkpoint = run_folder.latest_checkpoint()
    state = load_training_state(checkpoint) if checkpoint else {"step": 0, "teacher_version": 0}
    summary = {
        "steps": int(state["step"]),
        "teacher_version": int(state["teacher_version"]),
        "teacher_versions": teacher_versions,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "elapsed_s": round(time.monotonic() - started, 2),
        "labelling": label_stats,
        "final_losses": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "mode": cfg.train.mode,
        "iqa_ranges": {k: list(v) for k, v in cfg.iqa.ranges.items()},
        "drop_thresholds": {"tau_multi": cfg.drop.tau_multi, "tau_aug": cfg.drop.tau_aug},
    }
    bank = _bank(cfg, redis_url)
    summary.update(bank_summary(bank))
    summary["student_resumes"] = bank.status.read().student_resumes
    return summary


# What a finished run prints: `qualiteacher train` and `python -m qualiteacher.pipelines.train` as JSON,
# the demo and the quality benchmark as one line.
HEADLINE_KEYS = ("steps", "teacher_version", "bank_images", "bank_entries", "max_entries_per_image",
                 "dropped", "checkpoint", "elapsed_s")


def headline_json(summary: dict) -> str:
    return json.dumps({k: summary[k] for k in HEADLINE_KEYS}, indent=2)


def headline_line(summary: dict) -> str:
    return (f"{summary['steps']} steps, teacher version {summary['teacher_version']}, "
            f"bank {summary['bank_images']} images / {summary['bank_entries']} entries, "
            f"dropped {summary['dropped']}, {summary['elapsed_s']:.0f} s")


if __name__ == "__main__":  # the `ray job submit` entry point: `qualiteacher train`, by another name
    from qualiteacher.pipelines.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
