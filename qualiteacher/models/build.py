"""Model construction and loading of unconditioned (pretrained) backbone weights."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from qualiteacher.config import ModelConfig
from qualiteacher.models.injection import INJECTION_ATTR, ScoreInjectionSet, unwrap
from qualiteacher.models.nafnet import NAFNet
from qualiteacher.models.unet import UNet

ARCHS: dict[str, type[nn.Module]] = {"nafnet": NAFNet, "unet": UNet}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The restoration network named by `cfg.arch`, sized and conditioned by `cfg`."""
    try:
        arch = ARCHS[cfg.arch]
    except KeyError:
        raise ValueError(
            f"unknown model.arch {cfg.arch!r}; known: {', '.join(ARCHS)}"
        ) from None
    return arch(cfg)


def _injection_prefixes(model: nn.Module) -> list[str]:
    return [
        f"{name}."
        for name, m in model.named_modules()
        if isinstance(m, ScoreInjectionSet)
    ]


def load_backbone_state(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a state dict of the same architecture, with or without score injection.

    Missing keys are allowed only under the model's injection modules (they keep their
    zero-init, so outputs equal the backbone's). Injection keys of a conditioned file are
    dropped when the model has no injection (e.g. the unconditioned baseline starting from
    a conditioned stage-1 model). Any other missing or unexpected key is an error listing
    them. Shape mismatches raise from `load_state_dict`.
    """
    model = unwrap(model)
    if not hasattr(model, INJECTION_ATTR):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{INJECTION_ATTR}.")}
    result = model.load_state_dict(state_dict, strict=False)
    prefixes = tuple(_injection_prefixes(model))
    bad_missing = [
        k for k in result.missing_keys if not (prefixes and k.startswith(prefixes))
    ]
    if bad_missing or result.unexpected_keys:
        raise ValueError(
            f"state dict does not match {type(model).__name__}: "
            f"missing (non-injection) keys {bad_missing}, unexpected keys {list(result.unexpected_keys)}"
        )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad or not trainable_only
    )
