"""Exponential moving average teacher: teacher = decay * teacher + (1 - decay) * student."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from qualiteacher.config import EMAConfig
from qualiteacher.models.injection import unwrap


class EMA:
    """Holds a frozen teacher copy of a (possibly DDP-wrapped) student.

    Floating-point parameters are averaged; buffers and non-float parameters are copied
    from the student, since averaging e.g. counters or running stats' step is meaningless.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.step = 0
        self.teacher = copy.deepcopy(unwrap(student)).eval()
        self.teacher.requires_grad_(False)

    @classmethod
    def from_config(cls, student: nn.Module, cfg: EMAConfig) -> EMA:
        return cls(student, cfg.decay)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        student = unwrap(student)
        s_params = dict(student.named_parameters())
        for name, t in self.teacher.named_parameters():
            s = s_params[name].detach().to(t.device)
            if t.is_floating_point():
                t.lerp_(s, 1.0 - self.decay)
            else:
                t.copy_(s)
        s_buffers = dict(student.named_buffers())
        for name, t in self.teacher.named_buffers():
            t.copy_(s_buffers[name].to(t.device))
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.state_dict(),
            "decay": self.decay,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.decay = float(state["decay"])
        self.step = int(state["step"])

    def cpu_state_dict(self) -> dict[str, Tensor]:
        """Detached CPU copies of the teacher's weights, for pushing to teacher actors."""
        return {
            k: v.detach().to("cpu", copy=True)
            for k, v in self.teacher.state_dict().items()
        }
