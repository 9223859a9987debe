"""Progress of a running job, read from the bank's Redis: a bar when interactive, else log lines."""

from __future__ import annotations

import logging
import sys
import threading

from qualiteacher.services.bank.store import MemoryBank

log = logging.getLogger("qualiteacher.progress")


def progress_line(bank: MemoryBank) -> tuple[int, int, str]:
    """(step, total steps, one-line description) from what rank 0 and the gate recorded."""
    status, stats = bank.status.read(), bank.stats()
    step, total = status.student_step, status.student_steps
    drops = stats.get("drops", {})
    counters = stats.get("counters", {})
    sets = int(counters.get("gate_calls", 0)) + sum(drops.values())
    drop_rate = sum(drops.values()) / sets if sets else 0.0
    loss = "-" if status.student_loss is None else f"{status.student_loss:.5f}"
    text = (f"version {status.teacher_version or 0}  bank {stats.get('images', 0)} img / "
            f"{stats.get('entries', 0)} PLs  drop {drop_rate:.0%}  loss {loss}")
    return step, total, text


class ProgressReporter(threading.Thread):
    """Polls Redis every `interval` seconds until stopped; never raises into the job."""

    def __init__(self, bank: MemoryBank, interval: float = 2.0, interactive: bool | None = None):
        super().__init__(daemon=True, name="progress")
        self.bank, self.interval = bank, interval
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.done = threading.Event()

    def run(self) -> None:
        bar, polls = None, 0
        while not self.done.wait(self.interval):
            polls += 1
            try:
                step, total, text = progress_line(self.bank)
            except Exception as exc:  # Redis restarting: keep the job going, say so
                log.warning("progress unavailable: %s", type(exc).__name__)
                continue
            if self.interactive:
                from tqdm import tqdm

                bar = bar or tqdm(total=total or None, desc="student steps", unit="step")
                bar.n = step
                bar.set_postfix_str(text)
            elif polls % 5 == 0:  # a log line every 5 polls keeps job logs readable
                log.info("step %d/%d  %s", step, total, text)
        if bar is not None:
            bar.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)
