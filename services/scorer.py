"""IQA scorer actor: batch scoring, block weight maps, dual drop, then the bank gate.

One call handles a teacher batch: all N*K pseudo-labels are scored in one call per metric,
all their blocks in one more, and each surviving image set goes through the Lua gate.
Scorers are stateless apart from their loaded metrics, so the pool can grow or shrink at
any time and a failed call can be retried on another scorer (gating is idempotent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from qualiteacher.config import Config
from qualiteacher.iqa.ensemble import IQAEnsemble
from qualiteacher.method.drop import dual_drop
from qualiteacher.method.ladder import ladder_rungs
from services.bank.inputs import InputStore
from services.bank.store import MemoryBank, build_entry
from services.redis_server import redis_client

log = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    images: int = 0
    admitted: int = 0
    evicted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"images": self.images, "admitted": self.admitted, "evicted": self.evicted,
                "dropped": dict(self.dropped)}


def best_index(best: list[int], rows: list[int]) -> torch.Tensor:
    """The best label's index for each of `rows`."""
    return torch.tensor([best[i] for i in rows])


def label_id(image_id: str, version: int, augmentation: str) -> str:
    """Deterministic: the same teacher version and augmentation give the same PL, so a
    replayed or retried candidate is recognised by the gate and ignored."""
    return f"{image_id}.v{version}.{augmentation}"


class ScorerWorker:
    def __init__(self, cfg: dict, redis_url: str):
        self.cfg = Config.model_validate(cfg)
        self.ensemble = IQAEnsemble.from_config(self.cfg)
        client = redis_client(redis_url)
        self.bank = MemoryBank(client, prefix=self.cfg.redis.prefix, top_k=self.cfg.gating.top_k)
        self.inputs = InputStore(client, self.cfg.redis.prefix)

    def process(self, image_ids: list[str], pls: np.ndarray, finite: np.ndarray, version: int) -> dict:
        """Score PL sets (N, K, H, W, 3) uint8 made by teacher `version`, gate the survivors."""
        report = ScoreReport(images=len(image_ids))
        n, k = pls.shape[:2]
        x = torch.from_numpy(np.array(pls, dtype=np.uint8)).reshape(n * k, *pls.shape[2:])
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        # One call per metric; a PL that a metric cannot score (a flat frame) gets NaN there
        # (IQAEnsemble._call) and its set is dropped as non_finite below.
        scores = self.ensemble.score(x)
        names = self.ensemble.names
        normalized = torch.stack([scores.normalized[m] for m in names], dim=-1).reshape(n, k, len(names))
        drop_cfg = self.cfg.drop
        decision = dual_drop(normalized, drop_cfg.tau_multi, drop_cfg.tau_aug, enabled=drop_cfg.enabled)
        keep = decision.keep & torch.tensor(np.asarray(finite, dtype=bool))
        reasons = ["non_finite" if not f else r for r, f in zip(decision.reasons, finite)]
        kept_idx = [i for i in range(n) if keep[i]]
        q_min = self._teacher_q_min(scores.raw, n, k)
        blocks = self._block_weights(x, kept_idx, k)
        best = scores.ensemble10.reshape(n, k).argmax(dim=1).tolist()
        ladders = self._ladders(image_ids, x.reshape(n, k, *x.shape[1:]), kept_idx, best)
        for reason in reasons:
            if reason != "kept":
                report.dropped[reason] = report.dropped.get(reason, 0) + 1
                self.bank.record_drop(reason)
        for i in kept_idx:
            entries = [
                build_entry(
                    image_ids[i], label_id(image_ids[i], version, aug),
                    ensemble=float(scores.ensemble10[i * k + j]),
                    image=pls[i, j], teacher_version=version, augmentation=aug,
                    raw_scores={m: float(scores.raw[m][i * k + j]) for m in names},
                    normalized_scores={m: float(scores.normalized[m][i * k + j]) for m in names},
                    level_cap=self.cfg.model.score_cap,
                    weights=blocks[(i, j)],
                    teacher_q_min=q_min[i],
                    ladder=ladders.get(i) if j == best[i] else None,
                )
                for j, aug in enumerate(self.cfg.labelling.augmentations)
            ]
            outcome = self.bank.gate(image_ids[i], entries)
            report.admitted += len(outcome.admitted)
            report.evicted += len(outcome.evicted)
        return report.to_dict()

    def _ladders(self, image_ids: list[str], pls: torch.Tensor, kept_idx: list[int],
                 best: list[int]) -> dict[int, dict[float, float]]:
        """Per kept image, blend weight -> level of the rungs of its best label
        (`qualiteacher.method.ladder`), all scored in one call; {} with no ladder. An image
        whose input is not in Redis, or a rung the metrics cannot score, gets no rung."""
        alphas = self.cfg.labelling.ladder
        if not alphas or not kept_idx:
            return {}
        inputs = self.inputs.get_many(image_ids[i] for i in kept_idx)
        rows = [i for i in kept_idx if image_ids[i] in inputs and inputs[image_ids[i]].shape[:2] == pls.shape[-2:]]
        if not rows:
            return {}
        x = torch.stack([torch.from_numpy(inputs[image_ids[i]]).permute(2, 0, 1).float() / 255.0 for i in rows])
        rungs = ladder_rungs(x, pls[rows, best_index(best, rows)], alphas)
        levels = self.ensemble.score(rungs.flatten(0, 1)).ensemble10.reshape(len(rows), len(alphas))
        return {i: {a: float(v) for a, v in zip(alphas, row.tolist()) if np.isfinite(v)}
                for i, row in zip(rows, levels)}

    def _teacher_q_min(self, raw: dict, n: int, k: int) -> list[float]:
        """Per image, the reward-scale quality of its poorest PL (anchor of the L2 term)."""
        try:
            q = self.ensemble.quality_from_raw(raw).reshape(n, k)
        except ValueError:  # no differentiable metric: the preference loss is not usable anyway
            return [0.0] * n
        return q.amin(dim=1).tolist()

    def _block_weights(self, x: torch.Tensor, kept_idx: list[int], k: int) -> dict:
        """Block weights (grid x grid) of the kept sets' PLs, in one batched call."""
        if not kept_idx:
            return {}
        rows = [i * k + j for i in kept_idx for j in range(k)]
        weights = self.ensemble.block_weights(x[rows], self.cfg.iqa.block_grid, self.cfg.iqa.min_block_weight)
        return {(i, j): weights[r].numpy() for r, (i, j) in enumerate((i, j) for i in kept_idx for j in range(k))}
