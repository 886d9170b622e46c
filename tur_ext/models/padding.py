"""Pad images to a model's size multiple and crop the result back.

Padding goes on the bottom and right only, so cropping back is ``x[..., :h, :w]`` and the top-left pixel grid of the
input is untouched. The default mode is reflection (the convention of the PromptIR/NAFNet evaluation scripts).

``torch.nn.functional.pad(mode="reflect")`` needs the pad to be smaller than the padded dimension. Here the padding
is done by index gathering instead, which gives exactly the same result where the pad is smaller than the size, and
beyond that keeps mirroring back and forth (the same as applying reflection repeatedly). A dimension of size 1 has
nothing to mirror, so it is repeated (replicate). Gathering also works for every dtype (uint8 images included) and any
number of leading dimensions.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["pad_to_multiple", "crop_to", "padded_size"]

_MODES = ("reflect", "replicate")


def _check_multiple(multiple: int) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, int):
        raise TypeError(f"multiple: expected a positive int, got {type(multiple).__name__}")
    if multiple < 1:
        raise ValueError(f"multiple: expected a positive int, got {multiple}")
    return multiple


def _check_min_size(min_size: int) -> int:
    if isinstance(min_size, bool) or not isinstance(min_size, int):
        raise TypeError(f"min_size: expected a positive int, got {type(min_size).__name__}")
    if min_size < 1:
        raise ValueError(f"min_size: expected a positive int, got {min_size}")
    return min_size


def padded_size(height: int, width: int, multiple: int, *, min_size: int = 1) -> Tuple[int, int]:
    """The smallest (H, W) at least (height, width) and ``min_size`` whose sides are multiples of ``multiple``."""
    m = _check_multiple(multiple)
    low = _check_min_size(min_size)
    return -(-max(height, low) // m) * m, -(-max(width, low) // m) * m


def source_index(size: int, padded: int, mode: str = "reflect", device: torch.device = torch.device("cpu")
                 ) -> Tensor:
    """Indices into a dimension of ``size`` that produce ``padded`` entries (the first ``size`` are the identity):
    :func:`pad_to_multiple` is ``index_select`` with them, so a tile of the padded image can be gathered from the
    unpadded one without building the padded image."""
    i = torch.arange(padded, device=device)
    if mode == "replicate" or size == 1:
        return i.clamp_(max=size - 1)
    period = 2 * size - 2  # mirror without repeating the edge: 0 1 .. n-1 n-2 .. 1 | 0 1 ..
    j = i % period
    return torch.where(j < size, j, period - j)


def pad_to_multiple(x: Tensor, multiple: int, *, mode: str = "reflect", min_size: int = 1
                    ) -> Tuple[Tensor, Tuple[int, int]]:
    """Pad the last two dims of ``x`` on the bottom/right up to multiples of ``multiple`` (and at least
    ``min_size``, for models with a smallest input size).

    Returns ``(padded, (h, w))`` where ``(h, w)`` is the original size: ``crop_to(y, (h, w))`` undoes the padding.
    ``x`` may be ``(H, W)``, ``(C, H, W)``, ``(B, C, H, W)`` or have more leading dims; any dtype. When no padding
    is needed ``x`` itself is returned. ``mode`` is ``"reflect"`` (see the module notes for pads larger than the
    image) or ``"replicate"``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x: expected at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h == 0 or w == 0:
        raise ValueError(f"x: expected a non-empty image, got shape {tuple(x.shape)}")
    ph, pw = padded_size(h, w, multiple, min_size=min_size)
    if (ph, pw) == (h, w):
        return x, (h, w)
    if ph != h:
        x = x.index_select(-2, source_index(h, ph, mode, x.device))
    if pw != w:
        x = x.index_select(-1, source_index(w, pw, mode, x.device))
    return x, (h, w)


def crop_to(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size = (h, w)`` of the last two dims."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) for s in size)):
        raise TypeError(f"size: expected a pair of ints (h, w), got {size!r}")
    h, w = size
    if x.dim() < 2:
        raise ValueError(f"x: expected at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    if not (0 < h <= x.shape[-2] and 0 < w <= x.shape[-1]):
        raise ValueError(f"size: expected 0 < (h, w) <= {tuple(x.shape[-2:])}, got {(h, w)}")
    return x[..., :h, :w]
