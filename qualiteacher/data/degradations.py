"""Seeded synthetic degradations for the five restoration tasks.

Each task draws its parameters from a range table (``PARAMS[task][domain]``):

* ``paired`` ranges make the synthetic training set (input/target pairs);
* ``unpaired`` ranges stand in for the "real" set and are deliberately shifted: denser and
  tinted haze, darker and noisier low light with a white-balance cast, greener and more
  turbid water, heavier rain with a veil and defocus, larger wind-blown snow with fog.

All image-space sizes (streak length, flake radius) are given for a 256 px short side and
scaled to the actual image, and seed densities (per pixel) are divided by that scale
squared; rain and snow masks of images under 256 px are drawn at 256 px and downsampled.
So a 128 px crop and a 1024 px photo show the same scene-level rain or snow.
Everything is vectorised numpy/scipy; randomness comes only from the ``rng`` passed in.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage, signal
from skimage.draw import line_aa
from skimage.transform import resize

from qualiteacher.imageio import ImageReadError, list_images, read_image, write_png
from qualiteacher.progress import each

TASKS: tuple[str, ...] = ("snow", "rain", "haze", "lowlight", "underwater")
DOMAINS: tuple[str, ...] = ("paired", "unpaired")
_REF_SIDE = 256.0  # image sizes in the tables are for this short side


@dataclass(frozen=True)
class Span:
    """A closed range sampled uniformly."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not self.lo <= self.hi:
            raise ValueError(f"empty range [{self.lo}, {self.hi}]")

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.lo, self.hi))


RGBSpan = tuple[Span, Span, Span]


def _rgb(r: tuple[float, float], g: tuple[float, float], b: tuple[float, float]) -> RGBSpan:
    return Span(*r), Span(*g), Span(*b)


def _sample_rgb(spans: RGBSpan, rng: np.random.Generator) -> np.ndarray:
    return np.array([s.sample(rng) for s in spans], dtype=np.float32)


@dataclass(frozen=True)
class HazeParams:
    beta: Span  # scattering coefficient: t = exp(-beta * depth), depth in [0.1, 1]
    airlight: Span  # brightness of the atmospheric light A
    tint: RGBSpan  # per-channel factor on A (colour of the haze)
    roughness: Span  # share of the random smooth field in the depth proxy (rest: vertical ramp)


@dataclass(frozen=True)
class LowLightParams:
    gamma: Span  # darkening curve x**gamma
    exposure: Span  # linear gain after the curve
    photons: Span  # photon count at full white: fewer photons, more shot noise
    read_sigma: Span  # Gaussian read noise (std, [0,1] units)
    cast: RGBSpan  # per-channel gain: white-balance error of a real sensor


@dataclass(frozen=True)
class UnderwaterParams:
    beta: RGBSpan  # attenuation per channel; red's range lies above green's and blue's
    depth: Span  # distance scale of the scene
    backscatter: RGBSpan  # veiling light B (the water colour)
    turbidity: Span  # forward-scatter blur sigma (px at 256 px)


@dataclass(frozen=True)
class RainParams:
    density: Span  # fraction of pixels seeding a streak
    length: Span  # streak length (px at 256 px)
    angle: Span  # degrees from vertical
    width: Span  # streak thickness (Gaussian sigma, px at 256 px)
    intensity: Span  # screen-blend strength of the streaks
    veil: Span  # mix towards bright grey (rain accumulation)
    defocus: Span  # background blur sigma (px at 256 px)


@dataclass(frozen=True)
class SnowParams:
    density: Span  # fraction of pixels seeding a flake (per layer)
    size: Span  # flake radius (Gaussian sigma, px at 256 px) of the near layer
    wind: Span  # motion-streak length of flakes (px at 256 px)
    brightness: Span  # flake whiteness
    veil: Span  # mix towards a cold white fog


PARAMS: dict[str, dict[str, object]] = {
    "haze": {
        "paired": HazeParams(
            beta=Span(0.6, 1.4),
            airlight=Span(0.8, 0.98),
            tint=_rgb((0.98, 1.0), (0.98, 1.0), (0.98, 1.0)),
            roughness=Span(0.1, 0.4),
        ),
        "unpaired": HazeParams(
            beta=Span(1.6, 2.8),
            airlight=Span(0.7, 0.9),
            tint=_rgb((0.95, 1.05), (0.9, 1.0), (0.75, 0.9)),
            roughness=Span(0.3, 0.7),
        ),
    },
    "lowlight": {
        "paired": LowLightParams(
            gamma=Span(1.3, 2.0),
            exposure=Span(0.25, 0.45),
            photons=Span(300.0, 1000.0),
            read_sigma=Span(0.002, 0.008),
            cast=_rgb((1.0, 1.0), (1.0, 1.0), (1.0, 1.0)),
        ),
        "unpaired": LowLightParams(
            gamma=Span(1.6, 2.4),
            exposure=Span(0.1, 0.22),
            photons=Span(40.0, 150.0),
            read_sigma=Span(0.01, 0.03),
            cast=_rgb((0.85, 1.1), (0.9, 1.05), (0.95, 1.25)),
        ),
    },
    "underwater": {
        "paired": UnderwaterParams(
            beta=_rgb((1.2, 2.0), (0.25, 0.5), (0.15, 0.4)),
            depth=Span(0.5, 1.0),
            backscatter=_rgb((0.05, 0.12), (0.35, 0.5), (0.45, 0.6)),
            turbidity=Span(0.0, 0.3),
        ),
        "unpaired": UnderwaterParams(
            beta=_rgb((2.2, 3.2), (0.35, 0.6), (0.6, 1.0)),
            depth=Span(0.8, 1.4),
            backscatter=_rgb((0.03, 0.08), (0.45, 0.6), (0.3, 0.45)),
            turbidity=Span(0.6, 1.5),
        ),
    },
    "rain": {
        "paired": RainParams(
            density=Span(0.002, 0.004),
            length=Span(10.0, 20.0),
            angle=Span(-15.0, 15.0),
            width=Span(0.4, 0.6),
            intensity=Span(0.45, 0.7),
            veil=Span(0.0, 0.05),
            defocus=Span(0.0, 0.0),
        ),
        "unpaired": RainParams(
            density=Span(0.003, 0.006),
            length=Span(20.0, 36.0),
            angle=Span(-30.0, 30.0),
            width=Span(0.5, 0.9),
            intensity=Span(0.5, 0.8),
            veil=Span(0.1, 0.2),
            defocus=Span(0.5, 1.2),
        ),
    },
    "snow": {
        "paired": SnowParams(
            density=Span(0.001, 0.003),
            size=Span(1.0, 1.8),
            wind=Span(0.0, 0.0),
            brightness=Span(0.85, 1.0),
            veil=Span(0.0, 0.05),
        ),
        "unpaired": SnowParams(
            density=Span(0.002, 0.004),
            size=Span(1.4, 2.2),
            wind=Span(4.0, 10.0),
            brightness=Span(0.8, 0.95),
            veil=Span(0.1, 0.25),
        ),
    },
}


# --------------------------------------------------------------------------- public API


def degrade(img: np.ndarray, task: str, rng: np.random.Generator, domain: str = "paired") -> np.ndarray:
    """Apply one random degradation of ``task`` to a ``uint8`` HxWx3 image (same shape/dtype)."""
    params = task_params(task, domain)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 RGB array, got {img.dtype} {img.shape}")
    x = img.astype(np.float32) / 255.0
    out = _APPLY[task](x, rng, params)
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def task_params(task: str, domain: str = "paired") -> object:
    """The parameter ranges of ``task`` in ``domain``; clear errors for unknown names."""
    if task not in PARAMS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {', '.join(DOMAINS)}")
    return PARAMS[task][domain]


def file_seed(seed: int, name: str, task: str = "", domain: str = "") -> int:
    """A stable per-file seed: independent of folder order, Python's hash salt and platform."""
    digest = hashlib.sha256(f"{seed}\0{task}\0{domain}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def degrade_folder(
    task: str,
    seed: int,
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    domain: str = "paired",
    progress: bool = False,
) -> list[tuple[Path, str | None]]:
    """Write a degraded PNG ``out_dir/<stem>.png`` for every image in ``in_dir``
    (``progress``: a bar on stderr, `qualiteacher.progress`).

    Returns one ``(input path, error)`` per input, ``error`` None on success. A file that
    cannot be read or written, or whose stem collides with an earlier file's, is reported
    and skipped; the others are still processed. The rng of each file is seeded from
    (seed, task, domain, file name), so results do not depend on which other files exist.
    """
    task_params(task, domain)  # fail fast on bad names, before touching any file
    out_dir = Path(out_dir)
    results: list[tuple[Path, str | None]] = []
    claimed: dict[str, Path] = {}
    paths = list_images(in_dir)
    for path in each(paths, "degrading", progress):
        if path.stem in claimed:
            results.append((path, f"{path}: output {path.stem}.png already written for {claimed[path.stem].name}"))
            continue
        try:
            rng = np.random.default_rng(file_seed(seed, path.name, task, domain))
            write_png(out_dir / f"{path.stem}.png", degrade(read_image(path), task, rng, domain))
        except (ImageReadError, OSError) as exc:
            results.append((path, str(exc)))
        else:
            claimed[path.stem] = path  # only a written output claims its name (a.jpg unreadable: a.png still goes)
            results.append((path, None))
    return results


# --------------------------------------------------------------------------- helpers


def _scale(x: np.ndarray) -> float:
    return min(x.shape[:2]) / _REF_SIDE


def _smooth_field(h: int, w: int, rng: np.random.Generator, cells: int = 5) -> np.ndarray:
    """Low-frequency random field in [0, 1]: bicubic upsampling of a coarse noise grid."""
    coarse = rng.random((cells, cells))
    field = resize(coarse, (h, w), order=3, mode="reflect", anti_aliasing=False)
    field -= field.min()
    return (field / max(float(field.max()), 1e-6)).astype(np.float32)


def _depth_proxy(h: int, w: int, rng: np.random.Generator, roughness: float) -> np.ndarray:
    """Depth in [0, 1] without a depth sensor: far at the top (sky, horizon), near at the
    bottom (ground), perturbed by a smooth random field so haze is not a pure gradient."""
    ramp = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
    return (1.0 - roughness) * ramp + roughness * _smooth_field(h, w, rng)


def _line_kernel(length: float, angle_deg: float, sigma: float) -> np.ndarray:
    """Anti-aliased line of ``length`` px at ``angle_deg`` from vertical, thickened by a
    Gaussian; peak normalised to 1 so one seed gives one full-strength streak."""
    half = max(1, math.ceil(length / 2))
    pad = math.ceil(3 * sigma) + 1
    size = 2 * (half + pad) + 1
    c = size // 2
    dy = half * math.cos(math.radians(angle_deg))
    dx = half * math.sin(math.radians(angle_deg))
    kernel = np.zeros((size, size), np.float32)
    rr, cc, val = line_aa(round(c - dy), round(c - dx), round(c + dy), round(c + dx))
    kernel[rr, cc] = np.maximum(kernel[rr, cc], val)
    if sigma > 0:
        kernel = ndimage.gaussian_filter(kernel, sigma)
    return kernel / kernel.max()


def _seeds(h: int, w: int, rng: np.random.Generator, density: float, scale: float) -> np.ndarray:
    """Sparse random impulses with random strength in [0.5, 1]. ``density`` is per pixel at
    256 px; at ``scale`` (marks ``scale`` times larger) it is divided by scale**2, keeping
    the number of marks per scene."""
    mask = rng.random((h, w)) < min(density / max(scale, 1e-3) ** 2, 0.2)
    return np.where(mask, rng.uniform(0.5, 1.0, (h, w)), 0.0).astype(np.float32)


def _render_mask(h: int, w: int, render: Callable[[int, int, float], np.ndarray]) -> np.ndarray:
    """Draw a streak/flake mask at >= 256 px short side, then area-downsample to (h, w).

    Drawn natively, a small image would get streaks at least one pixel wide, i.e. far
    heavier rain than the same scene at 256 px; downsampling keeps it the same scene.
    ``render(rh, rw, scale)`` gets the drawing size and its scale relative to 256 px.
    """
    factor = max(1.0, _REF_SIDE / min(h, w))
    rh, rw = max(1, round(h * factor)), max(1, round(w * factor))
    mask = render(rh, rw, min(rh, rw) / _REF_SIDE)
    if (rh, rw) != (h, w):
        mask = resize(mask, (h, w), order=1, anti_aliasing=True, preserve_range=True)
    return mask.astype(np.float32)


def _blur_rgb(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return x
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0))


# --------------------------------------------------------------------------- the five tasks


def _haze(x: np.ndarray, rng: np.random.Generator, p: HazeParams) -> np.ndarray:
    # Atmospheric scattering model: I = J * t + A * (1 - t), t = exp(-beta * d).
    h, w = x.shape[:2]
    depth = 0.1 + 0.9 * _depth_proxy(h, w, rng, p.roughness.sample(rng))
    t = np.exp(-p.beta.sample(rng) * depth)[..., None]
    airlight = p.airlight.sample(rng) * _sample_rgb(p.tint, rng)
    return x * t + airlight * (1.0 - t)


def _lowlight(x: np.ndarray, rng: np.random.Generator, p: LowLightParams) -> np.ndarray:
    # Under-exposure, then Poisson (shot) + Gaussian (read) noise on the dark signal.
    dark = p.exposure.sample(rng) * np.power(x, p.gamma.sample(rng)) * _sample_rgb(p.cast, rng)
    photons = p.photons.sample(rng)
    shot = rng.poisson(np.clip(dark, 0.0, None) * photons).astype(np.float32) / photons
    return shot + rng.normal(0.0, p.read_sigma.sample(rng), x.shape).astype(np.float32)


def _underwater(x: np.ndarray, rng: np.random.Generator, p: UnderwaterParams) -> np.ndarray:
    # Jaffe-McGlamery style: I_c = J_c * t_c + B_c * (1 - t_c), t_c = exp(-beta_c * d);
    # red has the largest beta, so it fades first, giving the blue-green cast.
    h, w = x.shape[:2]
    depth = p.depth.sample(rng) * (0.3 + 0.7 * _depth_proxy(h, w, rng, 0.5))
    t = np.exp(-_sample_rgb(p.beta, rng) * depth[..., None])
    hazy = x * t + _sample_rgb(p.backscatter, rng) * (1.0 - t)
    return _blur_rgb(hazy, p.turbidity.sample(rng) * _scale(x))


def _rain(x: np.ndarray, rng: np.random.Generator, p: RainParams) -> np.ndarray:
    # Two layers (far: thin/short/dim, near: full size) of motion-blurred drops, screen-blended.
    h, w = x.shape[:2]
    angle, density = p.angle.sample(rng), p.density.sample(rng)
    length, width, intensity = p.length.sample(rng), p.width.sample(rng), p.intensity.sample(rng)

    def render(rh: int, rw: int, s: float) -> np.ndarray:
        streaks = np.zeros((rh, rw), np.float32)
        for depth_factor in (0.5, 1.0):
            kernel = _line_kernel(length * s * depth_factor, angle + rng.uniform(-3, 3), width * s * depth_factor)
            layer = signal.fftconvolve(_seeds(rh, rw, rng, density, s), kernel, mode="same")
            streaks += depth_factor * np.clip(layer, 0.0, 1.0).astype(np.float32)
        return np.clip(streaks * intensity, 0.0, 1.0)

    streaks = _render_mask(h, w, render)[..., None]
    base = _blur_rgb(x, p.defocus.sample(rng) * _scale(x))
    veil = p.veil.sample(rng)
    base = base * (1.0 - veil) + 0.8 * veil
    return 1.0 - (1.0 - base) * (1.0 - streaks)


def _snow(x: np.ndarray, rng: np.random.Generator, p: SnowParams) -> np.ndarray:
    # Two layers of Gaussian flakes (far small, near large), optionally wind-streaked,
    # composited as opaque white over a light cold fog.
    h, w = x.shape[:2]
    veil = p.veil.sample(rng)
    out = x * (1.0 - veil) + np.array([0.85, 0.88, 0.92], np.float32) * veil
    wind, angle = p.wind.sample(rng), rng.uniform(-40.0, 40.0)
    for size_factor in (0.5, 1.0):
        size, density = p.size.sample(rng) * size_factor, p.density.sample(rng)
        render = partial(_flakes, rng=rng, size=size, density=density, wind=wind * size_factor, angle=angle)
        mask = _render_mask(h, w, render)[..., None]
        out = out * (1.0 - mask) + p.brightness.sample(rng) * mask
    return out


def _flakes(
    rh: int, rw: int, s: float, *, rng: np.random.Generator, size: float, density: float, wind: float, angle: float
) -> np.ndarray:
    """One layer of snow flakes (Gaussian blobs, wind-streaked when ``wind`` >= 1 px)."""
    sigma = max(size * s, 0.3)
    field = ndimage.gaussian_filter(_seeds(rh, rw, rng, density, s), sigma)
    field *= 2.0 * math.pi * sigma**2  # a lone flake peaks at its seed strength
    if wind * s >= 1.0:
        kernel = _line_kernel(wind * s, angle, 0.0)
        field = signal.fftconvolve(field, kernel / kernel.sum(), mode="same") * 2.0
    return np.clip(1.5 * field, 0.0, 1.0)


_APPLY: dict[str, Callable[[np.ndarray, np.random.Generator, object], np.ndarray]] = {
    "haze": _haze,
    "lowlight": _lowlight,
    "underwater": _underwater,
    "rain": _rain,
    "snow": _snow,
}
assert set(_APPLY) == set(TASKS) == set(PARAMS)
