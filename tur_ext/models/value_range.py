"""The value ranges a backbone's forward takes and returns, and the one conversion from and to RGB in [0, 1].

Images enter and leave tur_ext as float RGB in [0, 1] (the data loaders, the metrics, image files). A backbone
declares ``input_range`` (the range its forward expects) and ``output_range`` (the range its output is in), both
``(low, high)`` and [0, 1] by default (:class:`~tur_ext.models.Backbone`); :func:`to_model_range` maps [0, 1] onto
the first before the forward, :func:`from_model_range` maps the output back. Evaluation, the trainer, ``tur restore``
and the C++ runner (which reads the ranges from an artifact's metadata: ``value_range`` is the input range and
``output_range`` the output range, the same as ``value_range`` when absent) all go through this linear map, so a
model whose release was trained on other ranges (TransWeather's authors feed [-1, 1]) gets the inputs it expects.
"""
from __future__ import annotations

from typing import Any, Tuple

from torch import Tensor

__all__ = ["UNIT_RANGE", "check_value_range", "from_model_range", "model_ranges", "to_model_range"]

ValueRange = Tuple[float, float]
UNIT_RANGE: ValueRange = (0.0, 1.0)


def check_value_range(value: Any, name: str = "value_range") -> ValueRange:
    """``value`` as a ``(low, high)`` pair of floats with ``low < high``, or a ValueError naming ``name``."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if not ok or not float(value[0]) < float(value[1]):
        raise ValueError(f"{name}: expected an increasing pair [low, high] of numbers, got {value!r}")
    return float(value[0]), float(value[1])


def model_ranges(model: Any) -> Tuple[ValueRange, ValueRange]:
    """``(input_range, output_range)`` of a model (a Backbone or a wrapper of one; [0, 1] where not declared)."""
    from .head import _unwrap

    net = _unwrap(model)
    return (check_value_range(getattr(net, "input_range", UNIT_RANGE), "input_range"),
            check_value_range(getattr(net, "output_range", UNIT_RANGE), "output_range"))


def to_model_range(x: Tensor, value_range: ValueRange) -> Tensor:
    """Map ``x`` from [0, 1] onto ``value_range`` (``x`` itself when that is [0, 1])."""
    lo, hi = value_range
    if (lo, hi) == UNIT_RANGE:
        return x
    return x * (hi - lo) + lo


def from_model_range(y: Tensor, value_range: ValueRange) -> Tensor:
    """Map ``y`` from ``value_range`` back onto [0, 1] (``y`` itself when that is [0, 1]); no clamping."""
    lo, hi = value_range
    if (lo, hi) == UNIT_RANGE:
        return y
    return (y - lo) / (hi - lo)
