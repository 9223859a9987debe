"""IQA scorer actor: moves a teacher batch's labels from bytes to bank entries.

It decodes the uint8 labels, asks the core for the verdict (`qualiteacher.method.judge`:
levels, dual drop, best label, block weights, q_min, and the condition ladder's levels of
the rungs it builds from the inputs it reads from Redis), builds the bank entries and sends
each kept set through the Lua gate. It decides nothing itself: the in-process reference
loop (`experiments/reference_loop.py`) judges with the same functions.

Scorers are stateless apart from their loaded metrics, so the pool can grow or shrink at
any time and a failed call can be retried on another scorer (gating is idempotent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from qualiteacher.services.bank.codec import build_entry
from qualiteacher.services.bank.inputs import InputStore
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.redis_server import redis_client

from qualiteacher.config import Config
from qualiteacher.iqa.ensemble import IQAEnsemble
from qualiteacher.method.judge import Verdict, best_label_ladders, judge, ladder_levels, scored_rungs

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
        labels = torch.from_numpy(np.array(pls, dtype=np.uint8)).permute(0, 1, 4, 2, 3).float().div_(255.0)
        verdict = judge(self.ensemble, labels, self.cfg, finite)
        ladders = self._ladders(image_ids, labels, verdict)
        report.dropped = verdict.drop_counts()
        for reason, count in report.dropped.items():
            self.bank.record_drop(reason, count)
        for i in verdict.kept:
            entries = [
                build_entry(
                    image_ids[i], label_id(image_ids[i], version, aug),
                    ensemble=float(verdict.levels[i, j]),
                    image=pls[i, j], teacher_version=version, augmentation=aug,
                    raw_scores=verdict.raw_scores(i, j),
                    normalized_scores=verdict.normalized_scores(i, j),
                    level_cap=self.cfg.model.score_cap,
                    weights=verdict.weights[i][j].numpy(),
                    teacher_q_min=float(verdict.q_min[i]),
                    ladder=ladders.get(i) if j == int(verdict.best[i]) else None,
                )
                for j, aug in enumerate(self.cfg.labelling.augmentations)
            ]
            outcome = self.bank.gate(image_ids[i], entries)
            report.admitted += len(outcome.admitted)
            report.evicted += len(outcome.evicted)
        return report.to_dict()

    def _ladders(self, image_ids: list[str], labels: torch.Tensor, verdict: Verdict) -> dict[int, dict[float, float]]:
        """Per kept image, blend weight -> level of its best label's rungs (by construction,
        or scored: `labelling.ladder_levels`); {} with no ladder. Scored, an image whose input
        is not in Redis (or not of its labels' size) gets none."""
        alphas = self.cfg.labelling.ladder
        if not alphas or not verdict.kept:
            return {}
        if self.cfg.labelling.ladder_levels == "constructed":
            return best_label_ladders(verdict, alphas, self.cfg.model.score_cap, verdict.kept)
        inputs = self.inputs.get_many(image_ids[i] for i in verdict.kept)
        rows = [i for i in verdict.kept
                if image_ids[i] in inputs and inputs[image_ids[i]].shape[:2] == labels.shape[-2:]]
        if not rows:
            return {}
        x = torch.stack([torch.from_numpy(inputs[image_ids[i]]).permute(2, 0, 1).float() / 255.0 for i in rows])
        levels = ladder_levels(self.ensemble, x, labels[rows, verdict.best[rows]], alphas)
        return {i: scored_rungs(alphas, row) for i, row in zip(rows, levels)}
