"""Seeded synthetic degradations, one per task name of :data:`tur_ext.tasks.SYNTHETIC_TASKS`.

Every registry entry is ``fn(clean, rng) -> degraded``: ``clean`` a float32 (H, W, 3) RGB image in [0, 1], ``rng``
a :class:`numpy.random.Generator` (the only source of randomness, so the same generator state gives the same
output); the result is float32 (H, W, 3), clipped to [0, 1]. Each entry draws its parameters uniformly from
:data:`RANGES` with :func:`sample_params` and applies the fixed-parameter building block below.

Ranges: the 7-task names follow MiOIR (blur: isotropic Gaussian, odd kernel 7-21, sigma 1-3; noise sigma 15-50;
JPEG quality 30-70; rain density 50-100, length 20-40, angle -45..45, width 3-11; haze airlight 0.8-1, beta
0.5-2.5; dark gamma 1-3; sr x4 bicubic down and up). The 3/5-task ``derain``/``dehaze`` use the same rain/haze
model and ranges; ``denoise_<s>`` is Gaussian noise of exactly sigma ``s``. Our own choices where the issue is
silent: rain streak opacity 0.6-0.9, ``deblur`` a linear motion kernel of length 7-21 px at any angle,
``lowlight`` ``scale * clean ** gamma`` with gamma 1.5-3 and scale 0.2-0.5.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import cv2
import numpy as np

from ..tasks import KNOWN_TASKS, SYNTHETIC_TASKS

Degradation = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_RAIN = {"density": (50.0, 100.0), "length": (20, 40), "angle": (-45.0, 45.0), "width": (3, 11), "opacity": (0.6, 0.9)}
_HAZE = {"airlight": (0.8, 1.0), "beta": (0.5, 2.5)}

#: Parameter ranges (inclusive) each task draws from. Integer bounds draw integers; ``ksize`` and ``width`` are odd.
RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "denoise_15": {"sigma": (15.0, 15.0)},
    "denoise_25": {"sigma": (25.0, 25.0)},
    "denoise_50": {"sigma": (50.0, 50.0)},
    "derain": dict(_RAIN),
    "dehaze": dict(_HAZE),
    "deblur": {"length": (7, 21), "angle": (0.0, 180.0)},
    "lowlight": {"gamma": (1.5, 3.0), "scale": (0.2, 0.5)},
    "blur": {"ksize": (7, 21), "sigma": (1.0, 3.0)},
    "noise": {"sigma": (15.0, 50.0)},
    "jpeg": {"quality": (30, 70)},
    "rain": dict(_RAIN),
    "haze": dict(_HAZE),
    "dark": {"gamma": (1.0, 3.0)},
    "sr": {"scale": (4, 4)},
}

_ODD = {"ksize", "width"}


def _check_image(img: np.ndarray, name: str = "clean") -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) RGB image, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"{name}: expected float pixels in [0, 1], got {img.dtype}")
    return np.ascontiguousarray(img, dtype=np.float32)


# ----------------------------------------------------------------------------- building blocks (fixed parameters)

def gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian noise of standard deviation ``sigma`` (in 0..255 units), clip to [0, 1]."""
    img = _check_image(img, "img")
    if sigma < 0:
        raise ValueError(f"sigma: expected >= 0, got {sigma}")
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(img + noise, 0.0, 1.0)


def _line_kernel(length: float, angle_deg: float, size: int) -> np.ndarray:
    """An anti-aliased centred line segment in a ``size`` x ``size`` kernel; angle 0 = vertical, positive = clockwise
    tilt of the top end to the right. Built by bilinear splatting of dense samples along the segment."""
    k = np.zeros((size, size), np.float64)
    c = (size - 1) / 2.0
    th = math.radians(angle_deg)
    dx, dy = math.sin(th), -math.cos(th)
    t = np.linspace(-(length - 1) / 2.0, (length - 1) / 2.0, max(2, int(4 * length)))
    x, y = c + t * dx, c + t * dy
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    for ox, oy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + ox, y0 + oy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        np.add.at(k, (yi[ok], xi[ok]), wgt[ok])
    return k


def motion_blur(img: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Linear motion blur: a normalised line kernel of ``length`` px at ``angle`` degrees (reflected borders)."""
    img = _check_image(img, "img")
    if length < 1:
        raise ValueError(f"length: expected >= 1, got {length}")
    size = int(math.ceil(length)) | 1
    k = _line_kernel(length, angle, size)
    k = (k / k.sum()).astype(np.float32)
    # The kernel is point-symmetric, so OpenCV's correlation equals the convolution.
    return np.clip(cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT_101), 0.0, 1.0)


def gaussian_blur(img: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur with an odd ``ksize`` x ``ksize`` kernel of standard deviation ``sigma``."""
    img = _check_image(img, "img")
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"ksize: expected a positive odd int, got {ksize}")
    if sigma <= 0:
        raise ValueError(f"sigma: expected > 0, got {sigma}")
    out = cv2.GaussianBlur(img, (int(ksize), int(ksize)), sigmaX=float(sigma), sigmaY=float(sigma),
                           borderType=cv2.BORDER_REFLECT_101)
    return np.clip(out, 0.0, 1.0)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through an OpenCV JPEG encode/decode at ``quality`` (1..100) on 8-bit pixels."""
    img = _check_image(img, "img")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality: expected 1..100, got {quality}")
    u8 = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)[:, :, ::-1]  # RGB -> BGR for the codec
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("jpeg: OpenCV failed to encode the image")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(dec[:, :, ::-1], dtype=np.float32) / np.float32(255.0)


def rain_streaks(img: np.ndarray, rng: np.random.Generator, density: float, length: float, angle: float,
                 width: int, opacity: float = 0.8) -> np.ndarray:
    """Add rain streaks: random drops on a fraction ``density / 25600`` of the pixels (0.2-0.4 % for density
    50-100), each smeared into a line of ``length`` px at ``angle`` degrees from vertical and thickened by an odd
    ``width`` Gaussian; the streak map R (a lone streak peaks at 1) is screened over the image:
    ``clean + opacity * R * (1 - clean)``."""
    img = _check_image(img, "img")
    if width < 1 or width % 2 == 0:
        raise ValueError(f"width: expected a positive odd int, got {width}")
    if density < 0 or length < 1:
        raise ValueError(f"density/length: expected density >= 0 and length >= 1, got {density}, {length}")
    h, w = img.shape[:2]
    ksize = (int(math.ceil(length)) + int(width)) | 1
    kern = _line_kernel(length, angle, ksize)
    kern = cv2.GaussianBlur(kern, (int(width), int(width)), 0)
    kern = (kern / kern.max()).astype(np.float32)  # a lone drop's streak peaks at 1
    # Drops on a canvas padded by the kernel size so streaks enter from outside the frame as often as they leave.
    ph, pw = h + 2 * ksize, w + 2 * ksize
    p = density / 100.0 / 256.0
    drops = (rng.random((ph, pw)) < p).astype(np.float32) * rng.uniform(0.5, 1.0, (ph, pw)).astype(np.float32)
    streaks = cv2.filter2D(drops, -1, kern, borderType=cv2.BORDER_CONSTANT)[ksize:ksize + h, ksize:ksize + w]
    streaks = np.clip(streaks, 0.0, 1.0)[:, :, None] * np.float32(opacity)
    return np.clip(img + streaks * (1.0 - img), 0.0, 1.0)


def haze_depth_proxy(img: np.ndarray) -> np.ndarray:
    """A relative scene depth in [0.2, 1] without a depth map: farther toward the top of the frame and in bright,
    smooth regions (sky), as in outdoor photographs. Shape (H, W, 1)."""
    h, w = img.shape[:2]
    rows = 1.0 - np.arange(h, dtype=np.float32) / max(1, h - 1)
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    s = max(h, w) / 16.0
    lum = cv2.GaussianBlur(lum, (0, 0), sigmaX=s, sigmaY=s, borderType=cv2.BORDER_REFLECT_101)
    d = 0.2 + 0.5 * rows[:, None] + 0.3 * np.clip(lum, 0.0, 1.0)
    return d[:, :, None].astype(np.float32)


def haze(img: np.ndarray, airlight: float, beta: float) -> np.ndarray:
    """Atmospheric scattering ``I * t + A * (1 - t)`` with ``t = exp(-beta * depth)`` (:func:`haze_depth_proxy`)."""
    img = _check_image(img, "img")
    if beta < 0:
        raise ValueError(f"beta: expected >= 0, got {beta}")
    t = np.exp(-np.float32(beta) * haze_depth_proxy(img))
    return np.clip(img * t + np.float32(airlight) * (1.0 - t), 0.0, 1.0)


def low_light(img: np.ndarray, gamma: float, scale: float = 1.0) -> np.ndarray:
    """Darken: ``scale * img ** gamma``."""
    img = _check_image(img, "img")
    if gamma <= 0 or scale < 0:
        raise ValueError(f"gamma/scale: expected gamma > 0 and scale >= 0, got {gamma}, {scale}")
    return np.clip(np.float32(scale) * np.power(np.clip(img, 0.0, 1.0), np.float32(gamma)), 0.0, 1.0)


def bicubic_sr(img: np.ndarray, scale: int = 4) -> np.ndarray:
    """Bicubic downsampling by ``scale`` then bicubic upsampling back to the input size (OpenCV INTER_CUBIC)."""
    img = _check_image(img, "img")
    if int(scale) < 1:
        raise ValueError(f"scale: expected a positive int, got {scale}")
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, round(w / scale)), max(1, round(h / scale))), interpolation=cv2.INTER_CUBIC)
    up = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(up, 0.0, 1.0)


# ----------------------------------------------------------------------------- the registry

def sample_params(name: str, rng: np.random.Generator) -> dict[str, float]:
    """Draw the parameters of task ``name`` uniformly from :data:`RANGES` (odd values for ``ksize``/``width``)."""
    if name not in RANGES:
        raise ValueError(f"name: unknown degradation {name!r}; known: {sorted(RANGES)}")
    out: dict[str, float] = {}
    for key, (lo, hi) in RANGES[name].items():
        if isinstance(lo, int) and isinstance(hi, int):
            if key in _ODD:
                out[key] = lo + 2 * int(rng.integers(0, (hi - lo) // 2 + 1))
            else:
                out[key] = int(rng.integers(lo, hi + 1))
        else:
            out[key] = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    return out


def _apply(name: str, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    clean = _check_image(clean)
    p = sample_params(name, rng)
    if name.startswith("denoise_") or name == "noise":
        return gaussian_noise(clean, p["sigma"], rng)
    if name in ("derain", "rain"):
        return rain_streaks(clean, rng, p["density"], p["length"], p["angle"], p["width"], p["opacity"])
    if name in ("dehaze", "haze"):
        return haze(clean, p["airlight"], p["beta"])
    if name == "deblur":
        return motion_blur(clean, p["length"], p["angle"])
    if name == "lowlight":
        return low_light(clean, p["gamma"], p["scale"])
    if name == "dark":
        return low_light(clean, p["gamma"], 1.0)
    if name == "blur":
        return gaussian_blur(clean, p["ksize"], p["sigma"])
    if name == "jpeg":
        return jpeg(clean, p["quality"])
    if name == "sr":
        return bicubic_sr(clean, p["scale"])
    raise ValueError(f"name: no degradation registered for {name!r}")  # unreachable while RANGES is complete


def _entry(name: str) -> Degradation:
    fn = functools.partial(_apply, name)
    functools.update_wrapper(fn, _apply)
    fn.__name__ = name  # type: ignore[attr-defined]
    fn.__doc__ = f"Degrade for task {name!r}: {KNOWN_TASKS[name]}; parameters from RANGES[{name!r}]."
    return fn


#: name -> ``fn(clean, rng)`` for every name in ``SYNTHETIC_TASKS`` (the weather tasks exist only as real pairs).
DEGRADATIONS: dict[str, Degradation] = {name: _entry(name) for name in SYNTHETIC_TASKS}

# Several tasks smear pixels spatially; dataset code crops this margin around a patch before degrading so patch
# borders see real neighbours instead of reflected ones.
SPATIAL_MARGIN: dict[str, int] = {name: 0 for name in SYNTHETIC_TASKS}
SPATIAL_MARGIN.update({"derain": 24, "rain": 24, "deblur": 16, "blur": 16, "sr": 16, "jpeg": 0})


def degrade(name: str, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply the registered degradation of task ``name`` to ``clean`` with generator ``rng``."""
    try:
        fn = DEGRADATIONS[name]
    except KeyError:
        raise ValueError(f"name: unknown degradation {name!r}; known: {sorted(DEGRADATIONS)}") from None
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected numpy.random.Generator, got {type(rng).__name__}")
    return fn(clean, rng)


if set(RANGES) != set(SYNTHETIC_TASKS):  # keep the registry complete when a task name is added
    raise ImportError(f"degradations: RANGES and SYNTHETIC_TASKS differ: {sorted(set(RANGES) ^ set(SYNTHETIC_TASKS))}")
