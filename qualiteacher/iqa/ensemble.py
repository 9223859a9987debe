"""The NR-IQA ensemble (Eq. 4): raw scores, normalisation, block weight maps, reward.

Every path takes a batch `x` (N, 3, H, W, float in [0, 1]) and makes one call per metric:
images are never scored one at a time, and block maps unfold all blocks of all images
into one batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qualiteacher.device import resolve_device
from qualiteacher.iqa import pyiqa_speedups
from qualiteacher.iqa.registry import MetricSpec, get_spec, reward_metric_weights
from qualiteacher.iqa.weights import configure_pyiqa, require_weights

log = logging.getLogger(__name__)


def normalize_score(spec: MetricSpec, raw: torch.Tensor) -> torch.Tensor:
    """Clip to the metric's range, min-max to [0, 1], invert lower-is-better metrics."""
    unit = (raw.clamp(spec.low, spec.high) - spec.low) / (spec.high - spec.low)
    return 1.0 - unit if spec.lower_better else unit


_TANH_1 = math.tanh(1.0)


def soft_unit(u: torch.Tensor) -> torch.Tensor:
    """A smooth, bounded stand-in for clip(u, 0, 1): 0 -> 0, 0.5 -> 0.5, 1 -> 1, slope 1.31
    at 0.5 and 0.55 at the range ends, limits -0.16 and 1.16 far outside.

    Why: a reward maximised by gradient ascent finds the inputs where a linear normalisation
    explodes (a metric far outside its range, e.g. NIQE on an adversarial texture) and
    then drowns every other loss; bounded, the most any metric can add is its range.
    """
    return 0.5 + 0.5 * torch.tanh(2.0 * (u - 0.5)) / _TANH_1


@contextlib.contextmanager
def metric_backend(exact: bool):
    """The convolution backend for one metric call; the caller's settings are restored after.
    The settings are process-wide: metric calls come from one thread per process (a scorer
    actor runs one call at a time, the student scores inside its step).

    Learned metrics: cuDNN, deterministic, no autotuning (what pyiqa's own forward sets).
    Hand-crafted metrics (``exact``): no cuDNN and no TF32. They compute local variances as
    E[x^2] - E[x]^2 on 0-255 images with convolutions, which cancel catastrophically when a
    convolution keeps only TF32's 10-bit mantissa, and pyiqa's forward turns cuDNN's TF32
    on for every call. Seen on an H100 (torch 2.11, CUDA 13): through pyiqa's forward, a
    batch of 9 blocks got BRISQUE and PIQE scores up to 25 and 56 away from the same blocks
    scored alone or in a batch of 108, while NIQE (float64, where TF32 does not apply) and
    the CPU agreed. Rounding every convolution operand to TF32 on the CPU moves the same
    blocks by up to 28 (BRISQUE) and 56 (PIQE), NIQE by 0 (tests/test_iqa.py). This fix has
    not yet run on a GPU; tests/test_gpu.py checks it when one is lent. The reward's
    backward pass runs after this block has closed: `_ExactBackward` covers it.
    """
    matmul = torch.backends.cuda.matmul.allow_tf32
    if exact:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=not exact, benchmark=False, deterministic=True,
                                        allow_tf32=not exact):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


class _ExactBackward(torch.autograd.Function):
    """``net(x)`` whose backward pass also runs with exact convolutions.

    Autograd runs a backward pass after the forward's `metric_backend` block has closed, so
    on a GPU the reward's gradients would go through TF32 cuDNN kernels. Here the backward
    recomputes the forward under `metric_backend(True)` and differentiates that (one more
    forward of a hand-crafted metric, which is cheap next to the student).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.net = net
        with torch.no_grad(), metric_backend(True):
            return net(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        with torch.enable_grad(), metric_backend(True):
            leaf = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.net(leaf), leaf, grad_out)
        return grad, None


def differentiable_score(net: torch.nn.Module, x: torch.Tensor, exact: bool, exact_backward: bool) -> torch.Tensor:
    """``net(x)`` with gradients; hand-crafted metrics (``exact``) without cuDNN or TF32, and
    with ``exact_backward`` their backward pass too (needed on a GPU only: the CPU has no TF32)."""
    if exact and exact_backward and x.requires_grad:
        return _ExactBackward.apply(x, net)
    with metric_backend(exact):
        return net(x)


def covering_windows(x: torch.Tensor, block: int | None) -> tuple[torch.Tensor, int]:
    """The whole-block windows of ``x`` that together cover it: (windows stacked along the
    batch, window count W); image i's w-th window is row ``w * N + i``.

    A metric that reads only whole ``block`` x ``block`` blocks from the top-left (NIQE)
    would see 56% of a 128 px image; the largest whole-block window placed at each of the
    four corners covers every pixel. An image of whole blocks (or no ``block``) is its own
    single window, so its score is the metric's own.
    """
    h, w = x.shape[-2:]
    if not block or (h % block == 0 and w % block == 0) or h < block or w < block:
        return x, 1
    wh, ww = h // block * block, w // block * block
    corners = {(top, left) for top in (0, h - wh) for left in (0, w - ww)}
    return torch.cat([x[..., t:t + wh, l:l + ww] for t, l in sorted(corners)]), len(corners)


def _window_mean(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Per image, the mean score over its `covering_windows` (a NaN window makes it NaN)."""
    return scores.reshape(count, -1).mean(dim=0)


def _with_ranges(specs: dict[str, MetricSpec],
                 ranges: Mapping[str, tuple[float, float]] | None) -> dict[str, MetricSpec]:
    return {name: replace(spec, low=float(ranges[name][0]), high=float(ranges[name][1]))
            if ranges and name in ranges else spec for name, spec in specs.items()}


def load_metric(spec: MetricSpec, weights_dir: Path, device: torch.device) -> torch.nn.Module:
    """Build a pyiqa metric from the weights folder; clear error when a file is missing."""
    import pyiqa

    require_weights(spec, weights_dir)
    configure_pyiqa(weights_dir)
    pyiqa_speedups.install()
    kwargs = dict(spec.create_kwargs)
    if spec.files and spec.name in ("brisque", "niqe"):
        kwargs["pretrained_model_path"] = str(weights_dir / spec.files[0].relpath)
    # pyiqa prints progress to stdout while loading; keep stdout clean for JSON output.
    with contextlib.redirect_stdout(sys.stderr):
        metric = pyiqa.create_metric(spec.pyiqa_name, device=device, **kwargs)
    metric.eval()
    for param in metric.parameters():
        param.requires_grad_(False)
    return metric


@dataclass
class EnsembleScores:
    raw: dict[str, torch.Tensor]  # metric -> (N,) raw scores
    normalized: dict[str, torch.Tensor]  # metric -> (N,) in [0, 1], higher is better
    ensemble: torch.Tensor  # (N,) in [0, 1]

    @property
    def ensemble10(self) -> torch.Tensor:
        """The ensemble on the 0-10 scale used for score conditions."""
        return self.ensemble * 10.0

    def rows(self) -> list[dict]:
        """One plain dict per image (JSON-ready)."""
        out = []
        for i in range(self.ensemble.shape[0]):
            out.append({
                "raw": {k: float(v[i]) for k, v in self.raw.items()},
                "normalized": {k: float(v[i]) for k, v in self.normalized.items()},
                "ensemble": float(self.ensemble10[i]),
            })
        return out


class IQAEnsemble:
    """A weighted ensemble of pyiqa NR metrics, loaded once and reused."""

    def __init__(self, metric_weights: dict[str, float], weights_dir: Path, device: str = "auto",
                 ranges: Mapping[str, tuple[float, float]] | None = None,
                 max_batch_pixels: int | None = None, reward_weights: Mapping[str, float] | None = None):
        """`ranges`: metric -> (low, high) raw range for normalisation, replacing the
        registry's range for the metrics listed (see `qualiteacher.calibration`).
        `max_batch_pixels`: split a metric call into chunks of at most this many pixels
        (None: one call for the whole batch).
        `reward_weights`: metric -> weight of the differentiable reward (a subset of the
        ensemble's metrics with gradients); None: all of them at their ensemble weights."""
        self.max_batch_pixels = max_batch_pixels
        total = sum(metric_weights.values())
        self.weights = {name: w / total for name, w in metric_weights.items()}
        self.specs = _with_ranges({name: get_spec(name) for name in metric_weights}, ranges)
        self.reward_weights = self._reward_weights(reward_weights)
        self.device = resolve_device(device)
        self.models = {name: load_metric(spec, weights_dir, self.device) for name, spec in self.specs.items()}

    def _reward_weights(self, chosen: Mapping[str, float] | None) -> dict[str, float]:
        for name in chosen or {}:
            if name not in self.specs or not self.specs[name].differentiable:
                raise ValueError(f"reward metric {name!r} is not a differentiable metric of the ensemble "
                                 f"{self.names}")
        return reward_metric_weights(self.weights, chosen)

    @classmethod
    def from_config(cls, cfg) -> IQAEnsemble:
        """Build from a `Config` (uses cfg.iqa and cfg.paths)."""
        device = resolve_device(cfg.iqa.device)
        return cls(cfg.iqa.metrics, cfg.paths.resolved_weights_dir(), str(device), cfg.iqa.ranges,
                   cfg.iqa.batch_pixels_for(device.type), cfg.iqa.reward_metrics)

    def with_ranges(self, ranges: Mapping[str, tuple[float, float]]) -> IQAEnsemble:
        """The same loaded metrics, normalised with other ranges."""
        other = copy.copy(self)
        other.specs = _with_ranges(self.specs, ranges)
        return other

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        """The (low, high) normalisation range of every metric in use."""
        return {name: (spec.low, spec.high) for name, spec in self.specs.items()}

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def reward_names(self) -> list[str]:
        """The metrics of the differentiable reward (Eqs. 8-9)."""
        return list(self.reward_weights)

    # ---- scoring (no gradients) ----
    @torch.no_grad()
    def raw_scores(self, x: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Metric -> (N,) raw scores of the whole images (see `covering_windows`)."""
        x = x.to(self.device, torch.float32).clamp(0, 1)
        return {n: self._raw_one(n, x) for n in (names or self.names)}

    def _raw_one(self, name: str, x: torch.Tensor) -> torch.Tensor:
        windows, count = covering_windows(x, self.specs[name].block_size)
        step = windows.shape[0]
        if self.max_batch_pixels:
            step = max(1, self.max_batch_pixels // (windows.shape[-2] * windows.shape[-1]))
        scores = torch.cat([self._call(name, windows[i:i + step]) for i in range(0, windows.shape[0], step)])
        return _window_mean(scores, count)

    def _call(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One metric on one chunk (N,). Where pyiqa raises on the chunk (NIQE's SVD on a flat
        image or block, BRISQUE's assertions), each image is scored alone and the ones that
        still fail get NaN: one degenerate image must not fail, and through retries stall,
        the whole batch. Callers treat NaN as "no score" (the scorer drops the set)."""
        try:
            # The arch network itself: pyiqa's InferenceModel.forward (range check, then
            # net) would override the backend chosen here (see `metric_backend`).
            with metric_backend(self.specs[name].exact_convolutions):
                return self.models[name].net(x).reshape(-1).float().cpu()
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, AssertionError) as exc:  # LinAlgError is a RuntimeError
            if x.shape[0] == 1:
                log.warning("%s has no score for an image of %dx%d px (%s: %s); NaN", name, x.shape[-1],
                            x.shape[-2], type(exc).__name__, str(exc).splitlines()[0][:120] if str(exc) else "")
                return torch.full((1,), float("nan"))
        return torch.cat([self._call(name, x[i:i + 1]) for i in range(x.shape[0])])

    def normalize(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: normalize_score(self.specs[n], v) for n, v in raw.items()}

    def combine(self, normalized: dict[str, torch.Tensor],
                weights: Mapping[str, float] | None = None) -> torch.Tensor:
        """Weighted mean over the metrics present (weights renormalised over them); the
        ensemble's weights (Eq. 4) unless others are given (the reward's)."""
        weights = self.weights if weights is None else weights
        total = sum(weights[n] for n in normalized)
        return sum(weights[n] * v for n, v in normalized.items()) / total

    def score(self, x: torch.Tensor) -> EnsembleScores:
        raw = self.raw_scores(x)
        normalized = self.normalize(raw)
        return EnsembleScores(raw, normalized, self.combine(normalized))

    # ---- block weight maps ----
    def block_metric_names(self, block_size: int) -> list[str]:
        """Metrics that can score a block of this size (NIQE needs 96 px, for example)."""
        return [n for n, s in self.specs.items() if s.min_size <= block_size and self.weights[n] > 0]

    def block_scores(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        """Ensemble score in [0, 1] of each block of a grid x grid split: (N, grid, grid).

        All blocks of all images are unfolded into one batch: one call per metric (or per
        `max_batch_pixels` chunk).
        Metrics that cannot score a block of that size are left out (weights renormalised);
        if none can, every block scores 1 (a uniform map).
        """
        n, c, h, w = x.shape
        bh, bw = h // grid, w // grid
        names = self.block_metric_names(min(bh, bw))
        if not names or bh == 0 or bw == 0:
            return torch.ones(n, grid, grid)
        cropped = x[:, :, : bh * grid, : bw * grid]
        blocks = F.unfold(cropped, kernel_size=(bh, bw), stride=(bh, bw))  # (N, C*bh*bw, grid*grid)
        blocks = blocks.transpose(1, 2).reshape(n * grid * grid, c, bh, bw)
        normalized = self.normalize(self.raw_scores(blocks, names))
        return self.combine(normalized).reshape(n, grid, grid)

    def block_weights(self, x: torch.Tensor, grid: int, floor: float = 0.1) -> torch.Tensor:
        """Pixel-loss weights per block (N, grid, grid): each block's ensemble score relative
        to the image's mean block, at least ``floor``. The one weight rule of the method: the
        scorer stores it with every label, the student upsamples it (`upsample_block_weights`).

        Dividing by the mean keeps the loss scale independent of the image's overall quality
        (that is carried by the score condition); the floor keeps poor blocks in play. A
        block no metric can score (a flat one: BRISQUE and NIQE are undefined there) gets
        the neutral weight 1 and is left out of the mean.
        """
        scores = self.block_scores(x, grid)
        mean = torch.nanmean(scores.flatten(1), dim=1).view(-1, 1, 1)
        rel = scores / mean.clamp_min(1e-6)
        return torch.nan_to_num(rel, nan=1.0).clamp_min(floor)

    # ---- differentiable reward for Eqs. 8-9 ----
    def reward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable quality in [0, 1] (N,) from the reward's metrics (`reward_weights`).

        Calls the metric networks directly so gradients flow back to `x`. Each metric's
        normalised score goes through `soft_unit`: about linear inside its range, bounded
        outside, so no gradient dies at the range edges and no single metric can run away.
        """
        size = min(x.shape[-2:])
        names = [n for n in self.reward_names if self.specs[n].min_size <= size]
        if not names:
            raise ValueError(
                f"no reward metric ({', '.join(self.reward_names) or 'none'}) can score {size} px images; "
                "the preference and consistency losses need one (brisque, niqe, musiq, clipiqa, topiq_nr)")
        # Scored as saved: a restoration is clamped to [0, 1] when written and labelled, so
        # the reward must not credit (or be gamed by) values outside it.
        x = x.to(self.device).clamp(0, 1)
        return self.quality_from_raw({n: self._differentiable_raw(n, x) for n in names})

    def _differentiable_raw(self, name: str, x: torch.Tensor) -> torch.Tensor:
        spec = self.specs[name]
        windows, count = covering_windows(x, spec.block_size)
        scores = differentiable_score(self.models[name].net, windows, spec.exact_convolutions,
                                      exact_backward=x.is_cuda).reshape(-1).float()
        return _window_mean(scores, count)

    def quality_from_raw(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward's formula applied to raw scores already computed (e.g. by the scorer).

        Only the reward's metrics count; each normalised score is bounded by `soft_unit`.
        """
        normalized = {}
        for n, value in raw.items():
            if n not in self.reward_weights:
                continue
            spec = self.specs[n]
            unit = (value - spec.low) / (spec.high - spec.low)
            normalized[n] = soft_unit(1.0 - unit if spec.lower_better else unit)
        if not normalized:
            raise ValueError(f"none of {sorted(raw)} is a reward metric ({', '.join(self.reward_names)})")
        return self.combine(normalized, self.reward_weights)
