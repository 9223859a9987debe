"""Score injection (Eqs. 5-7): condition any restoration backbone on a quality score.

e = MLP(sinusoidal(s)) with C outputs is added to a layer's output feature map
(broadcast over H, W). The MLP's last layer is zero-initialised, so attaching
injection to a pretrained backbone leaves its outputs unchanged until training moves it.

How the score reaches the injection layers
------------------------------------------
`attach_score_injection(model, ["middle"], ...)` registers a `ScoreInjectionSet`
(an `nn.ModuleDict`) on the model as `model.score_injection` and puts a forward hook
on each named layer. The hook adds that layer's embedding to the layer's output, reading
the score from `model.score_injection.current_score`. That context is set by
`score_context(model, score)`; the built-in networks (`ConditionedRestorer.forward(x,
score)`) do this themselves, and any other backbone is called as::

    with score_context(model, score):
        y = model(x)

A hook firing with no score set raises instead of silently skipping the injection.
Hooks are callable objects (not closures) so that `copy.deepcopy` (e.g. the EMA teacher)
and pickling rebind them to the copy's own injection modules and context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INJECTION_ATTR = "score_injection"


def clamp_score(score: Tensor, cap: float = 7.0) -> Tensor:
    """Merge scores above `cap` into `cap` (high-score labels are scarce)."""
    return torch.clamp(score, max=cap)


def sinusoidal_embedding(
    score: Tensor, num_frequencies: int, max_score: float
) -> Tensor:
    """[N] scores -> [N, 2F] features (sin then cos), ordinal over [0, max_score].

    The score is normalised to t = s / max_score in [0, 1]; the F frequencies are geometric
    from pi/8 to pi. The cosine similarity of two embeddings is the mean of cos(f * dt)
    over the frequencies, and with every f <= pi that falls monotonically with |dt| over
    the whole range: nearby scores embed nearby and "higher" is one direction the MLP can
    learn and interpolate, as timestep embeddings are over their range. (Frequencies up to
    100*pi, as before, made every integer score its own class: cos <= 0.21 between any
    two, 7 as close to 0 as to 4.)
    """
    if score.dim() != 1:
        raise ValueError(f"score must have shape [N], got {tuple(score.shape)}")
    t = score.float() / max_score
    exponents = torch.linspace(0.0, 1.0, num_frequencies, device=score.device)
    if num_frequencies == 1:
        exponents = torch.ones(1, device=score.device)
    freqs = math.pi * torch.pow(8.0, exponents - 1.0)
    phase = t[:, None] * freqs[None, :]
    return torch.cat([torch.sin(phase), torch.cos(phase)], dim=1)


class ScoreInjection(nn.Module):
    """MLP(sinusoidal(s)) -> C channel offsets, last layer zero-initialised."""

    def __init__(
        self, channels: int, num_frequencies: int = 16, max_score: float = 10.0
    ):
        super().__init__()
        self.channels = channels
        self.num_frequencies = num_frequencies
        self.max_score = max_score
        hidden = max(2 * num_frequencies, channels)
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_frequencies, hidden),
            nn.SiLU(),
            nn.Linear(hidden, channels),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def embed(self, score: Tensor) -> Tensor:
        return self.mlp(
            sinusoidal_embedding(score, self.num_frequencies, self.max_score)
        )

    def forward(self, features: Tensor, score: Tensor) -> Tensor:
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ValueError(
                f"expected features [N, {self.channels}, H, W], got {tuple(features.shape)}"
            )
        emb = self.embed(score.to(features.device)).to(features.dtype)
        return features + emb[:, :, None, None]


class ScoreInjectionSet(nn.ModuleDict):
    """The injection modules of one model, keyed by layer name ('.' -> '__'), plus the
    score context that the hooks read."""

    def __init__(self) -> None:
        super().__init__()
        self.current_score: Tensor | None = None
        self.layer_names: dict[str, str] = {}  # key -> dotted layer name


class _InjectionHook:
    """Forward hook adding one layer's embedding; an object so deepcopy rebinds it."""

    def __init__(self, injections: ScoreInjectionSet, key: str):
        self.injections = injections
        self.key = key

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        layer = self.injections.layer_names[self.key]
        score = self.injections.current_score
        if score is None:
            raise RuntimeError(
                f"score injection layer {layer!r} ran without a score; call the model inside "
                "score_context(model, score) (the built-in networks do this in forward(x, score))"
            )
        if not isinstance(output, Tensor):
            raise TypeError(
                f"score injection layer {layer!r} must output a tensor, got {type(output).__name__}"
            )
        if output.shape[0] != score.shape[0]:
            raise ValueError(
                f"layer {layer!r}: batch {output.shape[0]} but {score.shape[0]} scores"
            )
        return self.injections[self.key](output, score)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _infer_channels(layer: nn.Module, name: str) -> int:
    for module in reversed(list(layer.modules())):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            return module.out_channels
    raise ValueError(
        f"cannot infer the output channels of layer {name!r}; pass channels="
    )


def attach_score_injection(
    model: nn.Module,
    layer_names: list[str],
    num_frequencies: int = 16,
    max_score: float = 10.0,
    channels: int | Mapping[str, int] | None = None,
) -> ScoreInjectionSet:
    """Add score injection after each named layer (dotted names, e.g. "middle", "enc.2").

    `channels` is the layer's output channel count (an int for all, a mapping per name);
    when omitted it is the out_channels of the layer's last conv. Raises KeyError naming
    any layer that does not exist. Returns the registered `model.score_injection`.
    """
    model = unwrap(model)
    if not layer_names:
        raise ValueError(
            "layer_names is empty: name at least one layer to inject the score into"
        )
    if getattr(model, INJECTION_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} already has score injection attached")
    modules = dict(model.named_modules())
    missing = [name for name in layer_names if not name or name not in modules]
    if missing:
        sample = ", ".join(n for n in list(modules)[:20] if n)
        raise KeyError(
            f"score injection layer(s) {missing} not found in {type(model).__name__}; some layers: {sample}"
        )
    injections = ScoreInjectionSet()
    for name in layer_names:
        if isinstance(channels, Mapping):
            ch = channels[name]
        else:
            ch = (
                channels
                if channels is not None
                else _infer_channels(modules[name], name)
            )
        key = name.replace(".", "__")
        injections[key] = ScoreInjection(ch, num_frequencies, max_score)
        injections.layer_names[key] = name
    model.add_module(INJECTION_ATTR, injections)
    for key, name in injections.layer_names.items():
        modules[name].register_forward_hook(_InjectionHook(injections, key))
    return injections


def get_injection_set(model: nn.Module) -> ScoreInjectionSet:
    injections = getattr(unwrap(model), INJECTION_ATTR, None)
    if injections is None:
        raise ValueError(
            f"{type(unwrap(model)).__name__} has no score injection attached"
        )
    if not isinstance(injections, ScoreInjectionSet):
        raise TypeError(
            f"{INJECTION_ATTR} is a {type(injections).__name__}, not a ScoreInjectionSet"
        )
    return injections


def as_score_tensor(
    score: Tensor | float | None, batch: int, device: torch.device, cap: float
) -> Tensor:
    """Scalar / [1] / [N] score (None = cap) -> float32 [N] on `device`, capped."""
    s = torch.as_tensor(
        cap if score is None else score, dtype=torch.float32, device=device
    )
    if s.numel() == 1:
        s = s.reshape(1).expand(batch)
    if s.shape != (batch,):
        raise ValueError(
            f"score must be a scalar or shape [{batch}], got {tuple(s.shape)}"
        )
    return clamp_score(s, cap)


@contextmanager
def score_context(model: nn.Module, score: Tensor) -> Iterator[None]:
    """Make `score` ([N]) the condition of every injection layer of `model` in this block."""
    injections = get_injection_set(model)
    previous = injections.current_score
    injections.current_score = score
    try:
        yield
    finally:
        injections.current_score = previous


def injection_parameters(model: nn.Module) -> dict[str, Tensor]:
    """All parameters (weights and biases) of the injection layers, by name: the W_k of L3.

    Raises if the model has none, so the identity regulariser can never be silently zero.
    """
    model = unwrap(model)
    params = {
        f"{mod_name}.{p_name}": p
        for mod_name, module in model.named_modules()
        if isinstance(module, ScoreInjection)
        for p_name, p in module.named_parameters()
    }
    if not params:
        raise ValueError(f"{type(model).__name__} has no score injection layers")
    return params


def injection_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the injection parameters: the W_k^0 of L3."""
    return {k: v.detach().clone() for k, v in injection_parameters(model).items()}


def restore_conditions(model: nn.Module, x: Tensor, scores: Tensor) -> Tensor:
    """x [N, C, H, W] restored under each of K conditions, scores [N, K] -> [N, K, C, H, W].

    Networks with a condition-free encoder (`ConditionedRestorer.forward_conditions`) run
    it once per input; any other backbone with injection attached gets one batched call on
    the inputs repeated K times, under `score_context`. Without score injection every
    condition gives the same output, computed once.
    """
    n, k = scores.shape
    core = unwrap(model)
    if getattr(core, INJECTION_ATTR, None) is None:
        return model(x).unsqueeze(1).expand(n, k, *x.shape[1:])
    if hasattr(core, "forward_conditions"):
        return core.forward_conditions(x, scores)
    flat = scores.reshape(n * k).to(device=x.device, dtype=torch.float32)
    with score_context(model, flat):  # any backbone with injection attached by name
        out = model(x.repeat_interleave(k, 0))
    return out.reshape(n, k, *out.shape[1:])


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad H and W at the bottom/right up to a multiple (crop back after)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class ConditionedRestorer(nn.Module):
    """Shared parts of the built-in U-shaped networks: pad, set the score, body, crop, residual.

    Subclasses build `intro`, `encoders`, `downs`, `middle`, `ups`, `decoders`, `ending`,
    define `merge` (how an upsampled feature meets its skip), and call
    `attach_bottleneck_injection` and `use_channels_last`. `forward(x, score)`: score None
    means `score_cap`; scores above the cap are capped. Without conditioning the score is
    accepted and ignored, so callers need not branch.
    """

    pad_multiple: int = 1
    score_cap: float = 7.0
    channels_last: bool = False

    def attach_bottleneck_injection(self, cfg) -> None:
        """Score injection at the bottleneck ("middle"), when the config asks for it."""
        if cfg.score_condition:
            bottleneck = cfg.width * 2 ** len(cfg.enc_blocks)
            attach_score_injection(self, ["middle"], cfg.score_frequencies, cfg.score_max, channels=bottleneck)

    def use_channels_last(self, enabled: bool) -> None:
        """Weights and activations channels-last from now on (`ModelConfig.channels_last`).

        Convolution kernels get the strides that autograd gives their gradients, size-1
        dimensions included: DDP warns about (and copies) every gradient whose strides
        differ from its parameter's. A module that computes a 1x1 convolution as a matrix
        product (its gradient then has default strides) says so with
        `channels_last_weight = False`."""
        self.channels_last = enabled
        if not enabled:
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d) and getattr(module, "channels_last_weight", True):
                weight = module.weight.data
                module.weight.data = torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def merge(self, up: nn.Module, h: Tensor, skip: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The condition-free part: everything before the bottleneck (and the skips)."""
        h = self.intro(self._layout(x))
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            h = encoder(h)
            skips.append(h)
            h = down(h)
        return h, skips

    def decode(self, h: Tensor, skips: list[Tensor]) -> Tensor:
        """The bottleneck (where the score is injected) and everything after it."""
        h = self.middle(h)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            h = decoder(self.merge(up, h, skip))
        return self.ending(h)

    def body(self, x: Tensor) -> Tensor:
        return self.decode(*self.encode(x))

    def forward_conditions(self, x: Tensor, scores: Tensor) -> Tensor:
        """Restore each of N inputs under K conditions: x [N, C, H, W], scores [N, K] ->
        [N, K, C, H, W], equal to `forward(x_i, scores[i, k])` for every pair.

        The score enters at the bottleneck, so the encoder runs once per input and only the
        bottleneck and decoder run K times: a training step that needs an image at its
        label's score, at 7 and at a low score (pixel loss + Eq. 8) pays for one encoder.
        """
        n, k = scores.shape
        if n != x.shape[0]:
            raise ValueError(f"scores must be [{x.shape[0]}, K], got {tuple(scores.shape)}")
        h_in, w_in = x.shape[-2:]
        h, skips = self.encode(pad_to_multiple(x, self.pad_multiple))
        # repeat_interleave returns NCHW whatever its input's layout
        h = self._layout(h.repeat_interleave(k, 0))
        skips = [self._layout(s.repeat_interleave(k, 0)) for s in skips]
        flat = scores.reshape(n * k)
        if getattr(self, INJECTION_ATTR, None) is None:
            out = self.decode(h, skips)
        else:
            with score_context(self, as_score_tensor(flat, n * k, x.device, self.score_cap)):
                out = self.decode(h, skips)
        out = x.repeat_interleave(k, 0) + out[..., :h_in, :w_in]
        return out.reshape(n, k, *out.shape[1:])

    def forward(self, x: Tensor, score: Tensor | float | None = None) -> Tensor:
        n, _, h, w = x.shape
        xp = pad_to_multiple(x, self.pad_multiple)
        if getattr(self, INJECTION_ATTR, None) is None:
            out = self.body(xp)
        else:
            with score_context(
                self, as_score_tensor(score, n, x.device, self.score_cap)
            ):
                out = self.body(xp)
        return x + out[..., :h, :w]  # in x's layout (the first operand's)
