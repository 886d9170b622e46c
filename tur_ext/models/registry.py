"""The explicit model registry: names -> (architecture class, default configuration).

To add a backbone, subclass :class:`~tur_ext.models.head.Backbone` and add a :class:`ModelSpec` to ``_REGISTRY``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Tuple, Type

from .airnet import AirNet
from .head import HEAD_INPUTS, Backbone, attach_uncertainty_head
from .nafnet import NAFNet
from .promptir import PromptIR
from .transweather import TransWeather
from .uformer import Uformer

__all__ = ["ModelSpec", "build", "available", "spec"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its class, default configuration and what inference needs to know about it."""

    name: str
    cls: Type[Backbone]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def size_multiple(self) -> int:
        """Input H and W must be multiples of this (for the default configuration)."""
        return self.cls.size_multiple_for(self.defaults)

    @property
    def min_size(self) -> int:
        """Input H and W must be at least this."""
        return self.cls.min_size

    @property
    def supports_fp16(self) -> bool:
        """Whether fp16 inference (``model.half()``) is supported."""
        return self.cls.supports_fp16

    def config_keys(self) -> Tuple[str, ...]:
        """The configuration keys the class accepts."""
        return tuple(p for p in inspect.signature(self.cls.__init__).parameters if p != "self")


_NAFNET_W32 = dict(width=32, enc_blocks=(2, 2, 4, 8), middle_blocks=12, dec_blocks=(2, 2, 2, 2))

_REGISTRY: Dict[str, ModelSpec] = {
    entry.name: entry
    for entry in (
        ModelSpec("airnet", AirNet, {}, "AirNet as released (8.93M parameters with its MoCo key encoder); any H, W"),
        ModelSpec("promptir", PromptIR, {},
                  "PromptIR with decoder prompts; defaults are the released all-in-one model (35.6M parameters)"),
        ModelSpec("nafnet", NAFNet, _NAFNET_W32,
                  "NAFNet, width and block counts configurable; defaults are the published width-32 layout"),
        ModelSpec("nafnet-w32", NAFNet, _NAFNET_W32,
                  "NAFNet-width32 as published (29.1M parameters), for GPU work"),
        ModelSpec("nafnet-tiny", NAFNet,
                  dict(width=16, enc_blocks=(1, 1, 1), middle_blocks=2, dec_blocks=(1, 1, 1)),
                  "a 3-level NAFNet of width 16 (0.41M parameters) for the quickstart and tests on CPU"),
        ModelSpec("transweather", TransWeather, {},
                  "TransWeather as released (37.8M parameters); H, W multiples of 16, at least 48"),
        ModelSpec("uformer", Uformer, {},
                  "MiOIR's Uformer as in Uformer_TUR_7task (50.9M parameters); H, W multiples of 128"),
    )
}


def available() -> Tuple[str, ...]:
    """The registered model names, sorted."""
    return tuple(sorted(_REGISTRY))


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model name (str), got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"name: unknown model {name!r}; available: {', '.join(available())}") from None


def _plain(value: Any) -> Any:
    # Configs go into checkpoints and YAML: tuples become lists so that a saved config compares equal when reloaded.
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build(name: str, *, uncertainty: bool = False, uncertainty_channels: Optional[int] = None,
          uncertainty_input: str = "features", **config: Any) -> Backbone:
    """Build the registered model ``name`` with ``config`` overriding its defaults.

    With ``uncertainty=True`` the model carries an :class:`~tur_ext.models.UncertaintyHead` with
    ``uncertainty_channels`` maps (default: the image channels) and its forward returns ``(image, uncertainty)``;
    ``uncertainty_input`` is what the head reads (a study knob, see :data:`~tur_ext.models.head.HEAD_INPUTS`).
    The result has ``arch``, ``config`` (``build(model.arch, **model.config)`` rebuilds it), ``size_multiple`` and
    ``supports_fp16``.
    """
    s = spec(name)
    if not isinstance(uncertainty, bool):
        raise TypeError(f"uncertainty: expected a bool, got {type(uncertainty).__name__}")
    if uncertainty_channels is not None:
        if not uncertainty:
            raise ValueError("uncertainty_channels: only meaningful with uncertainty=True")
        if isinstance(uncertainty_channels, bool) or not isinstance(uncertainty_channels, int) \
                or uncertainty_channels < 1:
            raise ValueError(f"uncertainty_channels: expected a positive int, got {uncertainty_channels!r}")
    if uncertainty_input not in HEAD_INPUTS:
        raise ValueError(f"uncertainty_input: expected one of {list(HEAD_INPUTS)}, got {uncertainty_input!r}")
    if uncertainty_input != "features" and not uncertainty:
        raise ValueError("uncertainty_input: only meaningful with uncertainty=True")
    keys = s.config_keys()
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ValueError(f"config: unknown option(s) {unknown} for {name!r}; accepted: {', '.join(keys)}")
    merged = {**s.defaults, **config}
    model = s.cls(**merged)
    params = inspect.signature(s.cls.__init__).parameters
    model.arch = name
    model.config = {k: _plain(merged.get(k, params[k].default)) for k in keys}
    model.config["uncertainty"] = False
    if uncertainty:
        attach_uncertainty_head(model, uncertainty_channels, uncertainty_input)
    return model
