"""Run calibration: the ensemble's min-max ranges (Eq. 4) and the dual-drop thresholds,
fitted to the run's own data: its degraded inputs, the initial teacher's pseudo-labels of
them, and the clean paired targets.

Why: the registry's ranges (BRISQUE 0-150, NIQE 0-100, ...) hold any image, so on one
data set every normalised score crowds into a narrow band (on haze, hazy inputs and their
restorations all score 8-9 of 10 with the offline metrics) and the score condition, the
ensemble on 0-10 merged above 7, is the same for almost every pseudo-label. Ranges at
percentiles of the pseudo-labels' own raw scores spread their conditions over the scale,
as the paper's min-max normalisation over its data does. The degraded inputs and the clean
targets are in the pool so that the scale runs from "as degraded as the input" to "as clean
as a clean photo", with the teacher's labels in between and room above them for better
ones; a label better than the fitted range scores 10 (conditions above 7 merge anyway). The drop thresholds live on the scale
of the normalised scores, so they are refitted on the same labels ("keep the most
consistent fraction", `method.drop.calibrate_thresholds`).

Fitted once per run folder and saved there (`calibration.json`): a resumed run reads the
same file, so scores already in the bank stay comparable with new ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qualiteacher.fileio import atomic_write_json
from qualiteacher.method.augment import multi_aug_pseudo_labels
from qualiteacher.method.drop import calibrate_thresholds

FORMAT = "qualiteacher.calibration/1"


@dataclass
class Calibration:
    ranges: dict[str, tuple[float, float]]  # metric -> (low, high), raw units
    tau_multi: float | None = None  # None: thresholds not calibrated
    tau_aug: float | None = None
    images: int = 0

    def to_json(self) -> dict:
        return {"format": FORMAT, "images": self.images,
                "iqa_ranges": {k: [lo, hi] for k, (lo, hi) in self.ranges.items()},
                "drop": None if self.tau_multi is None else {"tau_multi": self.tau_multi, "tau_aug": self.tau_aug}}

    def applied_to(self, cfg):
        """`cfg` with this calibration: the fitted ranges when `iqa.calibrate` (ranges set by
        hand in `iqa.ranges` win) and the fitted drop thresholds when `drop.calibrate_keep`."""
        update = {}
        if cfg.iqa.calibrate:
            ranges = {name: self.ranges[name] for name in cfg.iqa.metrics if name in self.ranges} | cfg.iqa.ranges
            update["iqa"] = cfg.iqa.model_copy(update={"ranges": ranges})
        if cfg.drop.calibrate_keep is not None and self.tau_multi is not None:
            update["drop"] = cfg.drop.model_copy(update={"tau_multi": self.tau_multi, "tau_aug": self.tau_aug})
        return cfg.model_copy(update=update)

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Read a file written by `save`; a malformed one raises naming the file."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
            ranges = {str(k): (float(v[0]), float(v[1])) for k, v in doc["iqa_ranges"].items()}
            for name, (low, high) in ranges.items():
                if not (math.isfinite(low) and math.isfinite(high) and low < high):
                    raise ValueError(f"range of {name!r} is [{low}, {high}]")
            drop = doc.get("drop")
            taus = (float(drop["tau_multi"]), float(drop["tau_aug"])) if drop else (None, None)
            return cls(ranges, *taus, images=int(doc.get("images", 0)))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{path}: not a valid calibration file ({exc})") from None


def fit_ranges(raw_batches: Iterable[dict[str, torch.Tensor]],
               percentiles: tuple[float, float] = (2.0, 98.0),
               min_span: float = 1e-3) -> dict[str, tuple[float, float]]:
    """Per metric, the (low, high) percentiles of every finite raw score offered.

    Scores a metric cannot compute (NaN, inf) are left out; a metric with fewer than two
    finite scores, or whose scores all lie within `min_span`, raises, naming it.
    """
    pooled: dict[str, list[np.ndarray]] = {}
    for raw in raw_batches:
        for name, values in raw.items():
            pooled.setdefault(name, []).append(values.detach().double().cpu().numpy().reshape(-1))
    ranges = {}
    for name, chunks in pooled.items():
        values = np.concatenate(chunks)
        values = values[np.isfinite(values)]
        if values.size < 2:
            raise ValueError(f"cannot calibrate {name!r}: {values.size} finite score(s) among the "
                             "calibration images (need at least 2)")
        low, high = (float(v) for v in np.percentile(values, percentiles))
        if not high - low > min_span:
            raise ValueError(f"cannot calibrate {name!r}: its scores span only {high - low:.3g} "
                             f"between percentiles {list(percentiles)}; set iqa.ranges.{name} by hand")
        ranges[name] = (low, high)
    return ranges


@torch.no_grad()
def calibrate(ensemble, teacher, batches: Iterable[torch.Tensor], augmentations: tuple[str, ...],
              percentiles: tuple[float, float], keep_fraction: float | None,
              clean: Iterable[torch.Tensor] = (), fit_scale: bool = True) -> Calibration:
    """Fit ranges (and, with `keep_fraction`, drop thresholds) on the teacher's PL sets.

    `teacher` maps a batch [N, 3, H, W] in [0, 1] to its restoration; `batches` are degraded
    inputs; `clean` are clean images of the task (the paired targets). The ranges span the
    pooled raw scores of the degraded inputs, the teacher's labels and the clean images:
    fitted on the labels alone, the top of the scale would be the stage-1 teacher's best
    label, and nothing the student could do better would score above it. With
    `fit_scale=False` the ensemble's own ranges are kept (only the thresholds are fitted,
    on that scale). `ensemble` gives raw scores; its ranges matter only then.
    """
    raws, sets, images = [], [], 0
    for x in batches:
        x = x.to(ensemble.device)
        pls = multi_aug_pseudo_labels(teacher, x, augmentations).clamp(0, 1)
        n, k = pls.shape[:2]
        raw = ensemble.raw_scores(pls.flatten(0, 1))
        raws += [raw, ensemble.raw_scores(x)]
        sets.append({name: v.reshape(n, k) for name, v in raw.items()})
        images += n
    raws += [ensemble.raw_scores(y) for y in clean]
    ranges = fit_ranges(raws, percentiles) if fit_scale else ensemble.ranges
    result = Calibration(ranges, images=images)
    if keep_fraction is not None:
        names = list(ranges)
        fitted = ensemble.with_ranges(ranges)
        normalized = torch.cat([torch.stack([fitted.normalize({m: s[m]})[m] for m in names], dim=2)
                                for s in sets])  # (images, PLs, metrics)
        result.tau_multi, result.tau_aug = calibrate_thresholds(normalized, keep_fraction)
    return result
