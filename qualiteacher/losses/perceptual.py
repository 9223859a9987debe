"""VGG19 perceptual loss, weights read only from a local file (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import vgg19

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
# Index of each conv (pre-activation output) in torchvision's vgg19().features.
VGG19_LAYERS = {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34}
# Real-ESRGAN's layer weights.
DEFAULT_LAYER_WEIGHTS = {
    "conv1_2": 0.1,
    "conv2_2": 0.1,
    "conv3_4": 1.0,
    "conv4_4": 1.0,
    "conv5_4": 1.0,
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_weights_path(weights_dir: str | Path) -> Path:
    """Where the torchvision VGG19 file is expected (torch hub's cache layout)."""
    return Path(weights_dir).expanduser() / "hub" / "checkpoints" / VGG19_FILE


def _load_features(path: Path, last_index: int) -> nn.Sequential:
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG19 weights not found at {path}. Download torchvision's file from {VGG19_URL} "
            f"and place it there (e.g. curl -L -o {path} {VGG19_URL}), or run `qualiteacher weights download "
            "--metrics vgg19`; it is never downloaded automatically."
        )
    with torch.device("meta"):  # build without allocating the 400 MB classifier
        features = vgg19(weights=None).features[: last_index + 1]
    features = features.to_empty(device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Only the convolutional part is used; classifier.* keys are ignored.
    wanted = {f"features.{k}" for k in features.state_dict()}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(
            f"{path} is not a torchvision VGG19 state dict: missing {missing[:5]}"
        )
    features.load_state_dict({k[len("features.") :]: state[k] for k in wanted})
    return features


class VGGPerceptualLoss(nn.Module):
    """sum_l w_l * L1(phi_l(pred), phi_l(target)) on ImageNet-normalised inputs in [0, 1].

    The network is frozen and always in eval mode; it moves to the inputs' device on use.
    """

    def __init__(
        self, weights_dir: str | Path, layer_weights: dict[str, float] | None = None
    ):
        super().__init__()
        self.layer_weights = dict(layer_weights or DEFAULT_LAYER_WEIGHTS)
        if not self.layer_weights:
            raise ValueError("layer_weights is empty")
        unknown = set(self.layer_weights) - set(VGG19_LAYERS)
        if unknown:
            raise ValueError(
                f"unknown VGG19 layers {sorted(unknown)}; known: {list(VGG19_LAYERS)}"
            )
        self._taps = {VGG19_LAYERS[name]: name for name in self.layer_weights}
        self.features = _load_features(vgg19_weights_path(weights_dir), max(self._taps))
        self.features.requires_grad_(False)
        self.register_buffer(
            "mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )
        self.eval()

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        return super().train(False)

    def _feats(self, x: Tensor) -> dict[str, Tensor]:
        h, out = (x - self.mean) / self.std, {}
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self._taps:
                out[self._taps[i]] = h
        return out

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.mean.device != pred.device:
            self.to(pred.device)
        f_pred = self._feats(pred)
        with torch.no_grad():
            f_target = self._feats(target)
        return sum(
            w * F.l1_loss(f_pred[k], f_target[k]) for k, w in self.layer_weights.items()
        )
