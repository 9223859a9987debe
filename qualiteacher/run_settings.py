"""A run folder resumes only the run it holds.

The settings that decide what a run learns are recorded in the run folder at its first start
(`RunDir.settings`); a later start in the same folder with different ones is an error that
names each field, before anything is loaded. Why: a re-run resumes from the folder's latest
checkpoint, its calibration and its bank, so a changed method setting would silently apply
to a half-trained run, or to none (a finished `make demo` resumed at its last step and
printed the old run's numbers as the new config's).

What may change between starts is how much and where the run works: the fields in
`OPERATIONAL` (more steps, more scorers or workers, a GPU, other resources, logging).
"""

from __future__ import annotations

import json
from typing import Any

from qualiteacher.config import Config, ConfigError
from qualiteacher.fileio import atomic_write_json
from qualiteacher.run_dir import RunDir

# Sections that say where and how the services run, not what is learnt.
OPERATIONAL_SECTIONS = ("paths", "ray", "redis")
# Fields of the other sections that a resumed run may change.
OPERATIONAL = frozenset({
    "iqa.device", "iqa.max_batch_pixels", "iqa.weights_dir",
    "labelling.teachers", "labelling.teacher_resources", "labelling.scorers", "labelling.scorer_resources",
    "labelling.in_flight_per_scorer",
    "train.steps", "train.num_workers", "train.use_gpu", "train.worker_resources", "train.checkpoint_every",
    "train.bank_wait_s", "train.max_failures", "train.log_every", "train.probe_every_pushes",
    "train.probe_images", "train.probe_scores",
    "data.max_image_pixels",
})


def method_settings(cfg: Config) -> dict[str, Any]:
    """Dotted field -> JSON value of every setting that decides what the run learns."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif prefix not in OPERATIONAL and not any(prefix.startswith(p + ".") for p in OPERATIONAL):
            flat[prefix] = value

    dumped = cfg.model_dump(mode="json")
    for section in OPERATIONAL_SECTIONS:
        dumped.pop(section, None)
    walk("", dumped)
    return flat


def check_run_settings(cfg: Config, run_folder: RunDir) -> None:
    """Record `cfg`'s method settings at a run's first start; at a later start, raise
    ConfigError naming every field that differs from the recorded ones."""
    path = run_folder.settings
    current = method_settings(cfg)
    if not path.is_file():
        atomic_write_json(path, current)
        return
    # A field added after the run started is read as its default: new fields default to the
    # behaviour from before them, so a run of an older version resumes.
    recorded = method_settings(Config()) | json.loads(path.read_text())
    changed = sorted(k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k))
    if changed:
        lines = "\n".join(f"  {k}: the run has {json.dumps(recorded.get(k))}, this start {json.dumps(current.get(k))}"
                          for k in changed)
        raise ConfigError(
            f"{run_folder.root} holds a run with other settings than this start's:\n{lines}\n"
            f"A run resumes with the settings it started with: set them back, or start a new run "
            f"with another run folder (--run-dir).")
