"""PSNR and SSIM in the two conventions restoration papers report.

``"basicsr"`` (BasicSR / the MATLAB code of the SR literature): images quantised to 8 bits (float input in [0, 1] is
clipped and rounded as BasicSR's ``tensor2img`` does; uint8 input is used as is), ``crop_border`` pixels removed on
every side, optionally only the BT.601 luma ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (R, G, B in [0, 1], not
rounded), data range 255; SSIM with an 11x11 Gaussian window (sigma 1.5) over the valid region, population
(co)variances, averaged over channels.

``"promptir"`` (PromptIR / AirNet evaluation code, scikit-image defaults): RGB float in [0, 1] (both images clipped),
data range 1; SSIM with a 7x7 uniform window, sample covariance (N/(N-1)), K1 = 0.01, K2 = 0.03, over the valid
region, averaged over channels - what ``skimage.metrics.structural_similarity(..., data_range=1, channel_axis=-1)``
computes.

Computed here in float64 numpy/OpenCV (no scikit-image inside, so tests can compare with ``skimage.metrics``).
Single images are (H, W, C) / (H, W) numpy arrays or (C, H, W) / (H, W) tensors; ``*_batch`` take (B, C, H, W) tensors.
"""
from __future__ import annotations

import math
from typing import Union

import cv2
import numpy as np
import torch

Image = Union[np.ndarray, torch.Tensor]
CONVENTIONS = ("basicsr", "promptir")


def _as_hwc(img: Image, name: str) -> np.ndarray:
    """(H, W, C) numpy view/copy of a single image; tensors are (C, H, W) or (H, W)."""
    if isinstance(img, torch.Tensor):
        t = img.detach().to("cpu")
        if t.dim() == 3:
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise ValueError(f"{name}: expected a (C, H, W) or (H, W) tensor, got shape {tuple(img.shape)}")
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        arr = t.numpy()
    elif isinstance(img, np.ndarray):
        arr = img
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(img).__name__}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected an (H, W, C) or (H, W) image, got shape {arr.shape}")
    return arr


def _pair(img: Image, ref: Image) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_hwc(img, "img"), _as_hwc(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"img, ref: expected the same shape, got {a.shape} and {b.shape}")
    return a, b


def _to_uint8_range(x: np.ndarray, name: str) -> np.ndarray:
    """8-bit values as float64: uint8 as is; float in [0, 1] clipped, scaled and rounded (BasicSR tensor2img)."""
    if x.dtype == np.uint8:
        return x.astype(np.float64)
    if np.issubdtype(x.dtype, np.floating):
        # In the input's own precision, as tensor2img rounds float32 values (matters only at .5 ties).
        return np.round(np.clip(x, 0.0, 1.0) * x.dtype.type(255.0)).astype(np.float64)
    raise TypeError(f"{name}: expected uint8 or float in [0, 1] pixels for the basicsr convention, got {x.dtype}")


def _unit_float(x: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name}: expected float pixels in [0, 1] for the promptir convention, got {x.dtype}")
    return np.clip(x.astype(np.float64), 0.0, 1.0)


def rgb_to_y(img255: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image with values in [0, 255], as BasicSR's ``to_y_channel``: [16, 235], unrounded."""
    if img255.shape[-1] != 3:
        raise ValueError(f"test_y_channel: expected a 3-channel RGB image, got {img255.shape[-1]} channel(s)")
    coef = np.array([65.481, 128.553, 24.966], np.float64) / 255.0
    return (img255 @ coef + 16.0)[:, :, None]


def _basicsr_prepare(img: Image, ref: Image, crop_border: int, test_y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise ValueError(f"crop_border: expected an int >= 0, got {crop_border!r}")
    a, b = _pair(img, ref)
    a, b = _to_uint8_range(a, "img"), _to_uint8_range(b, "ref")
    if crop_border:
        if min(a.shape[:2]) <= 2 * crop_border:
            raise ValueError(f"crop_border: {crop_border} leaves nothing of a {a.shape[0]}x{a.shape[1]} image")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def _psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range * data_range / mse)


def gaussian_window_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps (the 2-D window is their outer product, as OpenCV's getGaussianKernel)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable correlation of (H, W, C) ``x`` with ``outer(k, k)`` over the positions where the window fits.

    OpenCV's float64 separable filter does the arithmetic; the border it pads with never reaches the valid
    region, which is all that is kept."""
    r = len(k) // 2
    out = cv2.sepFilter2D(np.ascontiguousarray(x), cv2.CV_64F, k, k, borderType=cv2.BORDER_REFLECT_101)
    if out.ndim == 2:
        out = out[:, :, None]
    return out[r:x.shape[0] - r, r:x.shape[1] - r]


def _ssim(a: np.ndarray, b: np.ndarray, k: np.ndarray, data_range: float, cov_norm: float) -> float:
    n = len(k)
    if min(a.shape[:2]) < n:
        raise ValueError(f"img: SSIM needs at least {n}x{n} pixels, got {a.shape[0]}x{a.shape[1]}")
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    var_a = cov_norm * (_filter_valid(a * a, k) - mu_a * mu_a)
    var_b = cov_norm * (_filter_valid(b * b, k) - mu_b * mu_b)
    cov = cov_norm * (_filter_valid(a * b, k) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())  # channels have equal-sized maps: the mean equals the mean of per-channel means


def psnr_basicsr(img: Image, ref: Image, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """PSNR in dB, BasicSR convention (8-bit, data range 255); ``inf`` for identical images."""
    a, b = _basicsr_prepare(img, ref, crop_border, test_y_channel)
    return _psnr(a, b, 255.0)


def ssim_basicsr(img: Image, ref: Image, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """SSIM, BasicSR convention (8-bit, 11x11 Gaussian window sigma 1.5, mean over channels)."""
    a, b = _basicsr_prepare(img, ref, crop_border, test_y_channel)
    return _ssim(a, b, gaussian_window_1d(11, 1.5), 255.0, 1.0)


def psnr_promptir(img: Image, ref: Image) -> float:
    """PSNR in dB, PromptIR convention (RGB float clipped to [0, 1], data range 1); ``inf`` for identical images."""
    a, b = _pair(img, ref)
    return _psnr(_unit_float(a, "img"), _unit_float(b, "ref"), 1.0)


def ssim_promptir(img: Image, ref: Image) -> float:
    """SSIM, PromptIR convention (scikit-image defaults: 7x7 uniform window, sample covariance, data range 1)."""
    a, b = _pair(img, ref)
    win = 7
    return _ssim(_unit_float(a, "img"), _unit_float(b, "ref"), np.full(win, 1.0 / win), 1.0,
                 win * win / (win * win - 1.0))


def _check_convention(convention: str, crop_border: int, test_y_channel: bool) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    if convention == "promptir" and (crop_border or test_y_channel):
        raise ValueError("crop_border/test_y_channel: the promptir convention uses neither (RGB, whole image)")


def psnr(img: Image, ref: Image, convention: str = "promptir", *, crop_border: int = 0,
         test_y_channel: bool = False) -> float:
    """PSNR of one image in the given convention (``"promptir"`` or ``"basicsr"``)."""
    _check_convention(convention, crop_border, test_y_channel)
    if convention == "basicsr":
        return psnr_basicsr(img, ref, crop_border, test_y_channel)
    return psnr_promptir(img, ref)


def ssim(img: Image, ref: Image, convention: str = "promptir", *, crop_border: int = 0,
         test_y_channel: bool = False) -> float:
    """SSIM of one image in the given convention (``"promptir"`` or ``"basicsr"``)."""
    _check_convention(convention, crop_border, test_y_channel)
    if convention == "basicsr":
        return ssim_basicsr(img, ref, crop_border, test_y_channel)
    return ssim_promptir(img, ref)


def _batch(fn, pred: torch.Tensor, target: torch.Tensor, **kw) -> list[float]:
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("pred, target: expected torch tensors of shape (B, C, H, W)")
    if pred.dim() != 4 or pred.shape != target.shape:
        raise ValueError(f"pred, target: expected equal (B, C, H, W) shapes, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    p, t = pred.detach().to("cpu"), target.detach().to("cpu")
    return [fn(p[i], t[i], **kw) for i in range(p.shape[0])]


def psnr_batch(pred: torch.Tensor, target: torch.Tensor, convention: str = "promptir", *, crop_border: int = 0,
               test_y_channel: bool = False) -> list[float]:
    """Per-image PSNR of a (B, C, H, W) batch in [0, 1]."""
    return _batch(psnr, pred, target, convention=convention, crop_border=crop_border, test_y_channel=test_y_channel)


def ssim_batch(pred: torch.Tensor, target: torch.Tensor, convention: str = "promptir", *, crop_border: int = 0,
               test_y_channel: bool = False) -> list[float]:
    """Per-image SSIM of a (B, C, H, W) batch in [0, 1]."""
    return _batch(ssim, pred, target, convention=convention, crop_border=crop_border, test_y_channel=test_y_channel)
