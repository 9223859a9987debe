"""The labelling loop: unpaired images -> teacher actors -> scorer actors -> bank gate.

Runs as one threaded actor, named `labeller` in the job's namespace for outside tools (the job
hands the student its handle):
- `run()` streams batches pass after pass over the images, keeping each teacher and scorer
  busy while bounding the work in flight (back-pressure: no new teacher call while the
  scorers' queues are full). A batch is labelled again only once the teacher is newer than
  the version its last scored labels came from: an unchanged version would make the same
  label ids, which the gate ignores as duplicates after a teacher forward and a full IQA
  scoring. With nothing new the loop waits for the next push;
- `push_weights()` is the weight-sync hub: the student puts the EMA weights once with
  `ray.put` (as `FlatWeights`, one byte buffer) and hands the reference here; every teacher gets `(ref, version)`, a restarted
  teacher is re-seeded with the newest one before it labels again, and the loop wakes;
- `scale_scorers(n)` grows or shrinks the scorer pool while the job runs;
- `stats()` and `stop()` for the driver and the CLI.

PL arrays travel teacher -> scorer through the object store; the labeller only passes
references and reads the (tiny) version number to enforce staleness.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import ray
import redis
from qualiteacher.services.bank.inputs import InputStore
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.names import scorer_name, teacher_name
from qualiteacher.services.placement import actor_options
from qualiteacher.services.redis_server import redis_client
from qualiteacher.services.scorer import ScorerWorker
from qualiteacher.services.teacher import TeacherWorker
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from qualiteacher.config import Config

log = logging.getLogger(__name__)
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@dataclass
class _Batch:
    ids: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    scored_version: int = -1  # teacher version of its newest labels that were scored (then gated or dropped)
    in_flight: int = 0  # its label and scoring calls not finished yet (retries included)


@dataclass
class _Scorer:
    index: int
    handle: ray.actor.ActorHandle
    in_flight: int = 0
    retiring: bool = False


@dataclass
class _LabelCall:
    teacher: int
    batch: _Batch
    pls: ray.ObjectRef
    finite: ray.ObjectRef


@dataclass
class _ScoreCall:
    scorer: _Scorer
    batch: _Batch
    pls: ray.ObjectRef
    finite: ray.ObjectRef
    version: int
    attempts: int = 1
    not_before: float = 0.0  # monotonic time before which a retried batch waits (backoff)


@dataclass
class LabellerStats:
    rounds: int = 0
    labelled: int = 0
    scored: int = 0
    admitted: int = 0
    evicted: int = 0
    stale: int = 0
    retries: int = 0
    failed: int = 0
    # Faults, for summary.json: teacher calls lost to a teacher that died (Ray restarts it),
    # and scorers that died (their node lost, say) and were replaced by new ones.
    teacher_failures: int = 0
    scorers_replaced: int = 0
    dropped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "dropped"}
        out["dropped"] = dict(self.dropped)
        return out


def _batches(ids: list[str], images: list[np.ndarray], size: int) -> list[_Batch]:
    """Same-shape batches (the teacher batches its forward passes)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    out = []
    for idx in by_shape.values():
        for start in range(0, len(idx), size):
            chunk = idx[start:start + size]
            out.append(_Batch([ids[i] for i in chunk], np.stack([images[i] for i in chunk])))
    return out


class Labeller:
    MAX_ATTEMPTS = 6  # per scoring batch (with backoff, about a minute of Redis outage)
    IDLE_WAIT_S = 1.0  # longest idle wait for a push: the loop still reconciles the scorer pool

    def __init__(self, cfg: dict, redis_url: str, ids: list[str], images: list[np.ndarray],
                 teacher_state: list, teacher_version: int, num_gpus_available: float = 0.0):
        self.cfg = Config.model_validate(cfg)
        self.cfg_dict = cfg
        self.redis_url = redis_url
        self.lab = self.cfg.labelling
        self.bank = MemoryBank(redis_client(redis_url), self.cfg.redis.prefix, self.cfg.gating.top_k)
        InputStore(self.bank.client, self.cfg.redis.prefix).put_many(dict(zip(ids, images)))
        self.batches = _batches(ids, images, self.lab.batch_size)
        self.gpus = num_gpus_available
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.wake = threading.Event()  # set by a push, a scale request and stop(): the idle loop looks again
        self.relabel: deque[_Batch] = deque()  # batches whose teacher failed
        self.stats_ = LabellerStats()
        # `teacher_state` is [ref to FlatWeights]: wrapped in a list so Ray passes the
        # reference, not the value.
        self.weights_ref, self.version = teacher_state[0], int(teacher_version)
        self.teachers = [self._start_teacher(i) for i in range(self.lab.teachers)]
        self.scorers: list[_Scorer] = []
        self.next_scorer = itertools.count()
        self.desired_scorers = self.lab.scorers
        self.published_scorers: int | None = None  # the count last written to the bank
        self._reconcile_scorers()
        self.bank.status.set_teacher_version(self.version)

    # ---- actors ----
    def _resources(self, res) -> dict:
        return actor_options(res, gpus_available=self.gpus > 0)

    def _start_teacher(self, index: int):
        """A restartable teacher; weights come by set_weights, so a restarted one (which
        holds none) is re-seeded by the loop before it labels again."""
        opts = self._resources(self.lab.teacher_resources)
        actor = ray.remote(TeacherWorker).options(
            name=teacher_name(index), namespace=self.cfg.ray.namespace, max_restarts=-1, max_task_retries=0, **opts,
        ).remote(self.cfg.model.model_dump(mode="json"), None, -1, opts["num_gpus"] > 0,
                 tuple(self.lab.augmentations))
        actor.set_weights.remote(self.weights_ref, self.version)
        return actor

    def _reconcile_scorers(self) -> None:
        """Start or retire scorers until the active pool has the desired size."""
        active = [s for s in self.scorers if not s.retiring]
        for _ in range(self.desired_scorers - len(active)):
            index = next(self.next_scorer)
            handle = ray.remote(ScorerWorker).options(
                name=scorer_name(index), namespace=self.cfg.ray.namespace, max_restarts=0, **self._resources(self.lab.scorer_resources),
            ).remote(self.cfg_dict, self.redis_url)
            self.scorers.append(_Scorer(index, handle))
        for scorer in active[self.desired_scorers:]:
            scorer.retiring = True
        for scorer in [s for s in self.scorers if s.retiring and s.in_flight == 0]:
            ray.kill(scorer.handle)
            self.scorers.remove(scorer)
        # Written when it changes (this runs every loop turn), and retried on the next turn
        # while Redis is away: a monitor's number must not end the run.
        if self.published_scorers != self.desired_scorers and self._bookkeeping(
                "scorer count", self.bank.status.set_scorer_count, self.desired_scorers):
            self.published_scorers = self.desired_scorers

    @staticmethod
    def _bookkeeping(what: str, write, *args) -> bool:
        """A bookkeeping write to the bank; False (logged) while Redis is unreachable."""
        try:
            write(*args)
            return True
        except REDIS_DOWN as exc:
            log.warning("redis unavailable (%s): %s not written yet", type(exc).__name__, what)
            return False

    def _replace_scorer(self, dead: _Scorer) -> None:
        """Called once per failed call: count the scorer once, when it leaves the pool."""
        if dead in self.scorers:
            self.scorers.remove(dead)
            self.stats_.scorers_replaced += not dead.retiring
            # Merely unreachable (its node cut off) is gone too: it must not come back beside its replacement.
            ray.kill(dead.handle)
        self._reconcile_scorers()

    # ---- public API (called concurrently with run) ----
    def push_weights(self, state: list, version: int) -> int:
        """Newest EMA weights from the student: forward (ref, version) to every teacher."""
        with self.lock:
            if version <= self.version:
                return self.version
            self.weights_ref, self.version = state[0], int(version)
            refs = [t.set_weights.remote(self.weights_ref, self.version) for t in self.teachers]
        self.wake.set()  # every batch is due again
        try:
            self.bank.status.set_teacher_version(int(version))
        except (redis.ConnectionError, redis.TimeoutError):
            log.warning("teacher version %d not recorded in Redis (unreachable)", version)
        for index, ref in enumerate(refs):
            try:
                ray.get(ref)
            except (RayActorError, ObjectLostError) as exc:
                # A teacher that died (its node lost, say) gets the newest version when it is back
                # (_reseed_teacher); the student's push must not fail with it, or Ray Train
                # would restart the student.
                log.warning("teacher %d did not take version %d (%s); it is re-seeded when back",
                            index, version, type(exc).__name__)
        return int(version)

    def teacher_versions(self) -> list[int]:
        return ray.get([t.get_version.remote() for t in self.teachers])

    def scale_scorers(self, n: int) -> int:
        if n < 1:
            raise ValueError("the scorer pool needs at least one scorer while labelling")
        with self.lock:
            self.desired_scorers = int(n)
        self.wake.set()
        return self.desired_scorers

    def scorer_count(self) -> int:
        with self.lock:
            return len([s for s in self.scorers if not s.retiring])

    def stats(self) -> dict:
        with self.lock:
            out = self.stats_.to_dict()
            out.update(teacher_version=self.version, scorers=len([s for s in self.scorers if not s.retiring]))
            return out

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    # ---- the loop ----
    def run(self, max_rounds: int | None = None) -> dict:
        """Label until stop(); returns the final stats.

        With `max_rounds` the call is bounded: it returns after that many passes over the
        images, or as soon as nothing is due and nothing is in flight (it never waits for a
        push, which a caller that bounds the run would have to send from another thread).
        """
        labels: dict[ray.ObjectRef, _LabelCall] = {}
        scores: dict[ray.ObjectRef, _ScoreCall] = {}
        waiting: list[_ScoreCall] = []  # labelled, waiting for scorer capacity
        work = self._due_batches(max_rounds)
        busy_teachers: Counter = Counter()
        while not self.stopping.is_set():
            with self.lock:
                self._reconcile_scorers()
            waiting = self._dispatch_scores(waiting, scores)
            capacity = self._score_capacity() - len(waiting)
            idle = False
            while capacity > 0 and len(labels) < 2 * len(self.teachers):
                batch = self._next_batch(work)
                if batch is None:
                    idle = True
                    break
                teacher = min(range(len(self.teachers)), key=lambda i: busy_teachers[i])
                pls, finite, version = self.teachers[teacher].label.options(num_returns=3).remote(batch.images)
                labels[version] = _LabelCall(teacher, batch, pls, finite)
                busy_teachers[teacher] += 1
                capacity -= 1
            pending = list(labels) + list(scores)
            if idle and not pending and not waiting:
                if max_rounds is not None:
                    break
                self._wait_for_push()
                continue
            if not pending:
                time.sleep(0.05)
                continue
            ready, _ = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in labels:
                    call = labels.pop(ref)
                    busy_teachers[call.teacher] -= 1
                    waiting.extend(self._label_done(ref, call))
                else:
                    call = scores.pop(ref)
                    retry = self._score_done(ref, call)
                    if retry is not None:
                        waiting.append(retry)
        return self.stats()

    def _next_batch(self, work) -> _Batch | None:
        """A batch whose teacher failed (still counted in flight), else the next one due,
        now counted in flight; None when nothing is due."""
        if self.relabel:
            return self.relabel.popleft()
        batch = next(work)
        if batch is not None:
            batch.in_flight += 1
        return batch

    def _due_batches(self, max_rounds: int | None):
        """The batches to label, pass after pass over the images in a fixed order; None while
        none is due (and for good once `max_rounds` passes are done). A pass starts only when
        some batch is due, so an idle loop counts no empty passes."""
        passes = itertools.count() if max_rounds is None else range(max_rounds)
        for round_index in passes:
            while not any(self._due(b) for b in self.batches):
                yield None
            with self.lock:
                self.stats_.rounds = round_index + 1
            yield from (b for b in self.batches if self._due(b))  # checked when reached
        while True:
            yield None

    def _due(self, batch: _Batch) -> bool:
        """Labelling `batch` now can offer the gate new label ids: the teacher is newer than
        its last scored labels, and none of its calls is still in flight (their labels may
        yet be scored). `relabel_unchanged` restores the old loop: every batch, always."""
        if self.lab.relabel_unchanged:
            return True
        with self.lock:
            newest = self.version
        return batch.in_flight == 0 and batch.scored_version < newest

    def _wait_for_push(self) -> None:
        """Nothing is due: sleep until a push (or stop(), or a scale request) wakes the loop.
        Waiting, then clearing, loses no push: one that came since the last wait has set the
        event, so the wait returns at once and the loop looks again."""
        if self.wake.wait(self.IDLE_WAIT_S):
            self.wake.clear()

    def _score_capacity(self) -> int:
        active = [s for s in self.scorers if not s.retiring]
        return sum(self.lab.in_flight_per_scorer - s.in_flight for s in active)

    def _dispatch_scores(self, waiting: list[_ScoreCall], scores: dict) -> list[_ScoreCall]:
        left = []
        now = time.monotonic()
        for call in waiting:
            if call.not_before > now:  # backing off; the loop keeps serving other batches
                left.append(call)
                continue
            free = [s for s in self.scorers if not s.retiring and s.in_flight < self.lab.in_flight_per_scorer]
            if not free:
                left.append(call)
                continue
            scorer = min(free, key=lambda s: s.in_flight)
            call.scorer = scorer
            scorer.in_flight += 1
            ref = scorer.handle.process.remote(call.batch.ids, call.pls, call.finite, call.version)
            scores[ref] = call
        return left

    def _label_done(self, version_ref, call: _LabelCall) -> list[_ScoreCall]:
        try:
            version = ray.get(version_ref)
        except (RayActorError, RayTaskError) as exc:
            # A teacher that died comes back (max_restarts) without weights: re-seed it with
            # the newest version, then label the batch again.
            log.warning("teacher %d failed (%s); re-seeding it and re-queueing the batch",
                        call.teacher, str(exc).splitlines()[0][:200])
            self._reseed_teacher(call.teacher)
            with self.lock:
                self.stats_.retries += 1
                self.stats_.teacher_failures += isinstance(exc, RayActorError)
            self.relabel.append(call.batch)
            return []
        with self.lock:
            self.stats_.labelled += len(call.batch.ids)
            newest = self.version
        if version < newest - self.lab.max_staleness:
            with self.lock:
                self.stats_.stale += len(call.batch.ids)
            self._bookkeeping("stale drop count", self.bank.record_drop, "stale", len(call.batch.ids))
            call.batch.in_flight -= 1  # not scored: due again, with the newest teacher
            return []
        return [_ScoreCall(None, call.batch, call.pls, call.finite, version)]  # type: ignore[arg-type]

    def _reseed_teacher(self, index: int) -> None:
        with self.lock:
            ref, version = self.weights_ref, self.version
        try:
            try:
                ray.get(self.teachers[index].set_weights.remote(ref, version), timeout=120)
            except ObjectLostError:
                # The newest weights were lost with their owner, the student's worker (restarted,
                # or its node gone), before the next push.
                self._reseed_from_peer(index)
        except Exception as exc:  # still restarting: its next label call fails and re-seeds again
            log.warning("could not re-seed teacher %d yet: %s", index, type(exc).__name__)

    def _reseed_from_peer(self, index: int) -> None:
        """Seed teacher `index` with the weights of the living teacher that holds the newest
        version. That copy is the labeller's own (a task's return value belongs to its
        caller), so it stands for the lost weights in later re-seeds too."""
        held = []
        for peer, teacher in enumerate(self.teachers):
            if peer != index:
                try:
                    held.append((ray.get(teacher.get_version.remote(), timeout=30), peer))
                except (RayActorError, GetTimeoutError):
                    continue  # down as well
        version, donor = max(held, default=(-1, None))
        if donor is None or version < 0:
            log.warning("teacher %d: the newest weights are lost and no teacher holds any; "
                        "it waits for the next push", index)
            return
        ref, _ = self.teachers[donor].get_weights.options(num_returns=2).remote()
        ray.get(self.teachers[index].set_weights.remote(ref, version), timeout=120)
        with self.lock:
            if version == self.version:
                self.weights_ref = ref
        log.warning("teacher %d re-seeded with version %d from teacher %d (the newest weights were lost)",
                    index, version, donor)

    def _retry(self, call: _ScoreCall) -> _ScoreCall | None:
        with self.lock:
            self.stats_.retries += 1
        call.attempts += 1
        if call.attempts > self.MAX_ATTEMPTS:
            log.error("giving up on a batch of %s after %d attempts", call.batch.ids, call.attempts - 1)
            with self.lock:
                self.stats_.failed += len(call.batch.ids)
            call.batch.in_flight -= 1  # not scored: due again on the next pass
            return None
        return call

    def _score_done(self, ref, call: _ScoreCall) -> _ScoreCall | None:
        call.scorer.in_flight -= 1
        try:
            report = ray.get(ref)
        except ObjectLostError as exc:
            # The labels lived in the object store of a node that is gone (their teacher's):
            # nothing to retry, so the batch is due again and is labelled anew.
            log.warning("labels of %s lost with their node (%s); labelling them again",
                        call.batch.ids, type(exc).__name__)
            with self.lock:
                self.stats_.retries += 1
            call.batch.in_flight -= 1
            return None
        except RayActorError as exc:
            # The scorer died: its batch goes to another one (gating is idempotent, so a
            # batch that was half gated before the crash is not duplicated).
            log.warning("scorer %d died (%s); replacing it and retrying its batch", call.scorer.index, exc)
            with self.lock:
                self._replace_scorer(call.scorer)
            return self._retry(call)
        except RayTaskError as exc:
            # E.g. Redis unreachable for longer than the client's retries: wait, then retry.
            log.warning("scoring failed (%s); retrying the batch", str(exc).splitlines()[-1][:200])
            call.not_before = time.monotonic() + min(2.0 ** call.attempts, 30.0)
            return self._retry(call)
        with self.lock:
            self.stats_.scored += report["images"]
            self.stats_.admitted += report["admitted"]
            self.stats_.evicted += report["evicted"]
            self.stats_.dropped.update(report["dropped"])
        call.batch.in_flight -= 1
        call.batch.scored_version = max(call.batch.scored_version, call.version)
        return None
