"""The one checkpoint format of the project: model files and training-state folders.

Model file (``*.pt``, written by ``save_model_file``)::

    {"format": "qualiteacher-model/1",
     "model": state_dict (CPU tensors),
     "model_config": ModelConfig as JSON-compatible dict,
     **extra}                       # ints / floats / strs / bools only (e.g. steps, final_loss)

Training-state folder (written by ``save_training_state``; Ray Train checkpoint dirs hold it)::

    state.pt   {"format": "qualiteacher-state/1", "student": state_dict, "ema": EMA state
                (EMA.state_dict() or a bare state dict), "optimizer": optimizer state_dict,
                "step": int, "teacher_version": int, "model_config": dict}
    meta.json  {"format", "step", "teacher_version"}: for humans and tools only

Everything holds plain tensors, dicts, lists and numbers, so every load uses
``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused.
Writes go to a temp file in the same folder followed by ``os.replace``, so a crash leaves
the previous checkpoint intact, never a half-written one. ``state.pt`` is authoritative:
it carries its own step and teacher version, so a crash between writing it and
``meta.json`` cannot make a load inconsistent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from qualiteacher.config import ModelConfig
from qualiteacher.fileio import atomic_write
from qualiteacher.models.build import build_model, load_backbone_state
from qualiteacher.models.injection import unwrap
from qualiteacher.run_dir import RunDir, StateDir

MODEL_FORMAT = "qualiteacher-model/1"
STATE_FORMAT = "qualiteacher-state/1"
_RESERVED = frozenset({"format", "model", "model_config"})
# Model config fields that may differ between a file and the model it is loaded into:
# score injection is added on top of a backbone without changing the backbone's weights.
_SCORE_FIELDS = frozenset({"score_condition", "score_frequencies", "score_max", "score_cap"})


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or unsafe; the message names the path."""


# --------------------------------------------------------------------------- writing


def _to_cpu(obj: Any) -> Any:
    """Detached CPU copies of every tensor in nested dicts/lists/tuples (GPU-free files)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _check_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    clash = _RESERVED.intersection(extra)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} are reserved by the checkpoint format")
    bad = {k: type(v).__name__ for k, v in extra.items() if not isinstance(v, (int, float, str))}
    if bad:
        raise TypeError(f"extra values must be int, float or str; got {bad}")
    return dict(extra)


def save_model_file(
    path: str | os.PathLike[str],
    model: nn.Module,
    model_cfg: ModelConfig,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and config to ``path`` atomically (see module docstring)."""
    payload = {
        "format": MODEL_FORMAT,
        "model": _to_cpu(unwrap(model).state_dict()),
        "model_config": model_cfg.model_dump(mode="json"),
        **_check_extra(extra or {}),
    }
    return atomic_write(Path(path), lambda fh: torch.save(payload, fh))


def save_training_state(
    directory: str | os.PathLike[str],
    *,
    student_state: Mapping[str, Any],
    ema_state: Mapping[str, Any],
    optimizer_state: Mapping[str, Any],
    step: int,
    teacher_version: int,
    model_cfg: ModelConfig,
) -> Path:
    """Write ``directory/state.pt`` then ``directory/meta.json``, each atomically."""
    folder = StateDir(Path(directory))
    state = {
        "format": STATE_FORMAT,
        "student": _to_cpu(_strip_module_prefix(student_state)),
        "ema": _to_cpu(dict(ema_state)),
        "optimizer": _to_cpu(dict(optimizer_state)),
        "step": int(step),
        "teacher_version": int(teacher_version),
        "model_config": model_cfg.model_dump(mode="json"),
    }
    atomic_write(folder.state, lambda fh: torch.save(state, fh))
    meta = {"format": STATE_FORMAT, "step": int(step), "teacher_version": int(teacher_version)}
    atomic_write(folder.meta, lambda fh: fh.write(json.dumps(meta, indent=2).encode()))
    return folder.root


# --------------------------------------------------------------------------- reading


def _safe_load(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` on CPU, with errors that name the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(
            f"cannot load checkpoint {str(path)!r}: not a weights-only QualiTeacher file "
            f"(arbitrary pickled objects are refused): {_load_reason(exc)}"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") not in (MODEL_FORMAT, STATE_FORMAT):
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a QualiTeacher checkpoint (format {found!r}; "
            f"expected {MODEL_FORMAT!r} or {STATE_FORMAT!r})"
        )
    return obj


def _load_reason(exc: Exception) -> str:
    """The informative line of torch's error; its preamble advises weights_only=False,
    which is exactly what this module must never do."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(boilerplate)]
    return useful[0] if useful else type(exc).__name__


def _model_config(obj: Mapping[str, Any], path: Path) -> ModelConfig:
    try:
        return ModelConfig.model_validate(obj["model_config"])
    except Exception as exc:  # noqa: BLE001 - KeyError or pydantic's ValidationError
        raise CheckpointError(f"{str(path)!r}: invalid or missing model_config ({exc})") from None


def _strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Accept state dicts taken from a DDP-wrapped model ("module." on every key)."""
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def read_model_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw content of a model file (format-checked), including its extra values."""
    path = Path(path)
    obj = _safe_load(path)
    if obj["format"] != MODEL_FORMAT:
        raise CheckpointError(f"{str(path)!r} is a training state, not a model file")
    return obj


def load_training_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``directory/state.pt``: keys student, ema, optimizer, step, teacher_version,
    model_config (a validated ``ModelConfig``) and format."""
    path = StateDir(Path(directory)).state
    obj = _safe_load(path)
    if obj["format"] != STATE_FORMAT:
        raise CheckpointError(f"{str(path)!r} is a model file, not a training state")
    missing = {"student", "ema", "optimizer", "step", "teacher_version"} - set(obj)
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks {sorted(missing)}")
    return {**obj, "model_config": _model_config(obj, path)}


def _teacher_weights(ema: Mapping[str, Any]) -> Mapping[str, Tensor]:
    # EMA.state_dict() nests the weights under "teacher"; a bare state dict is accepted too.
    teacher = ema.get("teacher")
    return teacher if isinstance(teacher, Mapping) else ema


def _check_compatible(file_cfg: ModelConfig, model_cfg: ModelConfig, path: Path) -> None:
    a = file_cfg.model_dump(exclude=set(_SCORE_FIELDS))
    b = model_cfg.model_dump(exclude=set(_SCORE_FIELDS))
    diff = sorted(k for k in a if a[k] != b[k])
    if diff:
        details = ", ".join(f"{k}: file {a[k]!r} vs requested {b[k]!r}" for k in diff)
        raise CheckpointError(f"{str(path)!r} does not fit the requested model ({details})")


def _resolve(path: Path, depth: int = 0) -> tuple[Path, dict[str, Any]]:
    """Find the checkpoint behind ``path`` (file, state folder, or run folder) and load it."""
    if path.is_file():
        return path, _safe_load(path)
    state = StateDir(path)
    if state.complete():
        return state.state, _safe_load(state.state)
    if depth < 3 and path.is_dir():
        target = _summary_checkpoint(RunDir(path))
        if target is not None:
            return _resolve(target, depth + 1)
    raise CheckpointError(
        f"no checkpoint at {str(path)!r}: expected a model .pt file, a folder holding "
        f"{state.state.name}, or a run folder whose {RunDir(path).summary.name} names a checkpoint"
    )


def _summary_checkpoint(run: RunDir) -> Path | None:
    summary = run.summary
    if not summary.is_file():
        return None
    try:
        ref = json.loads(summary.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(ref, str) or not ref:
        return None
    return run.named(ref)


def load_restorer(
    path: str | os.PathLike[str],
    prefer: Literal["student", "teacher"] = "student",
    model_cfg: ModelConfig | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Load a restoration model (eval mode, CPU) and its config from any checkpoint kind.

    ``path``: a model file; a folder holding ``state.pt`` (``prefer`` picks the student or
    the EMA teacher weights); or a run folder, whose ``summary.json`` "checkpoint" names
    one (absolute, or relative to the run folder): the train job writes it at the end.
    ``model_cfg``: build this model instead of the file's, e.g. a score-conditioned one
    from an unconditioned backbone file; the backbone must match, and injection layers
    missing from the file keep their zero init (outputs equal the backbone's).
    """
    if prefer not in ("student", "teacher"):
        raise ValueError(f"prefer must be 'student' or 'teacher', got {prefer!r}")
    file, obj = _resolve(Path(path))
    file_cfg = _model_config(obj, file)
    if obj["format"] == MODEL_FORMAT:
        weights = obj.get("model")
    else:
        weights = obj.get("student") if prefer == "student" else _teacher_weights(obj.get("ema") or {})
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{str(file)!r} holds no {prefer} weights")
    cfg = file_cfg if model_cfg is None else model_cfg
    if model_cfg is not None:
        _check_compatible(file_cfg, model_cfg, file)
    model = build_model(cfg)
    try:
        load_backbone_state(model, _strip_module_prefix(weights))
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"weights in {str(file)!r} do not fit the model: {exc}") from None
    return model.eval(), cfg
