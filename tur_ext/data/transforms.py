"""Paired geometric transforms on HxWxC numpy images: the same crop / flip / rotation for lq and gt."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _check_same_size(imgs: Sequence[np.ndarray]) -> tuple[int, int]:
    if len(imgs) == 0:
        raise ValueError("imgs: expected at least one image")
    h, w = imgs[0].shape[:2]
    for im in imgs[1:]:
        if im.shape[:2] != (h, w):
            raise ValueError(f"imgs: paired images must have the same height and width, got {[i.shape for i in imgs]}")
    return h, w


def pad_to_size(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad the bottom/right of ``img`` so that both sides are at least ``size``."""
    h, w = img.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph == 0 and pw == 0:
        return img
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (img.ndim - 2)
    # "symmetric" works for any pad width; "reflect" fails when the pad exceeds the side.
    return np.pad(img, pad, mode="symmetric")


def paired_random_crop(imgs: Sequence[np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same random ``size`` x ``size`` window of every image (reflect-padded first if smaller)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    _check_same_size(imgs)
    imgs = [pad_to_size(im, size) for im in imgs]
    h, w = imgs[0].shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return [im[top:top + size, left:left + size] for im in imgs]


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` window (reflect-padded first if smaller)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size: expected a positive int, got {size!r}")
    img = pad_to_size(img, size)
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def crop_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Crop the bottom/right so that height and width are multiples of ``multiple`` (as PromptIR's test code)."""
    if not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple: expected a positive int, got {multiple!r}")
    h, w = img.shape[:2]
    nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
    if nh == 0 or nw == 0:
        raise ValueError(f"img: {h}x{w} is smaller than size_multiple={multiple}")
    return img[:nh, :nw]


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of the square: ``k % 4`` quarter turns, then a horizontal flip if ``k >= 4``."""
    if not 0 <= k < 8:
        raise ValueError(f"k: expected 0..7, got {k}")
    out = np.rot90(img, k % 4, axes=(0, 1))
    if k >= 4:
        out = out[:, ::-1]
    return out


def random_dihedral(imgs: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip/rotation (uniform over the 8) of every image."""
    k = int(rng.integers(0, 8))
    return [dihedral(im, k) for im in imgs]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWxC float image -> contiguous float32 CHW tensor (copies, so views of cached images are safe)."""
    if img.ndim != 3:
        raise ValueError(f"img: expected (H, W, C), got shape {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32).copy())
