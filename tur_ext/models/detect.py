"""Which registered architecture (and configuration) a downloaded checkpoint holds, from its keys and shapes.

    from tur_ext.models import build, detect_file, load_weights
    found = detect_file("net_g_latest.pth")      # Detection(arch="nafnet", config={...}, has_head=False)
    model = build(found.arch, **found.config)
    load_weights(model, "net_g_latest.pth", strict_head=False, inert_objects=True)

Every architecture detects itself (``detect_config``, a classmethod next to the model, which reads the state dict
after :func:`~tur_ext.models.read_state_dict` has unwrapped it) and says which keys it looks for (``detect_keys``).
:func:`detect_architecture` asks them in the explicit order of :data:`DETECTION_ORDER`; the first that recognises the
keys wins. The helpers below are what the detectors share to read sizes from shapes; they only look at shapes, so
state dicts of meta tensors are detected too.
"""
from __future__ import annotations

import inspect
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from torch import Tensor

from .head import HEAD_NAME
from .weights import read_checkpoint_file, read_state_dict

__all__ = ["Detection", "DETECTION_ORDER", "detect_architecture", "detect_file"]

#: Registry names tried by :func:`detect_architecture`, in this order. Their key signatures do not overlap, so the
#: order only decides which one a (malformed) file matching several would be reported as.
DETECTION_ORDER: Tuple[str, ...] = ("nafnet", "promptir", "transweather", "airnet", "uformer")


class Detection(NamedTuple):
    """What :func:`detect_architecture` found: ``build(arch, **config)`` has the checkpoint's shapes (without the
    uncertainty head); ``has_head``: the checkpoint also holds one (callers drop it or attach one)."""

    arch: str
    config: Dict[str, Any]
    has_head: bool

    def describe(self) -> str:
        """``"airnet (features=64, groups=5, blocks=5, queue_size=1280)"``."""
        return f"{self.arch} ({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


# --- shape helpers shared by the detectors ----------------------------------------------------------------------

def has_keys(state_dict: Mapping[str, Any], patterns: Iterable[str]) -> bool:
    """Whether every pattern is present: a key itself, or with a trailing ``*`` a prefix of some key."""
    keys = state_dict.keys()
    for pattern in patterns:
        if pattern.endswith("*"):
            if not any(k.startswith(pattern[:-1]) for k in keys):
                return False
        elif pattern not in state_dict:
            return False
    return True


def shape(state_dict: Mapping[str, Any], key: str, ndim: Optional[int] = None) -> Optional[Tuple[int, ...]]:
    """The shape of ``state_dict[key]`` (None when absent, not a tensor, or not ``ndim``-dimensional)."""
    value = state_dict.get(key)
    if not isinstance(value, Tensor) or (ndim is not None and value.dim() != ndim):
        return None
    return tuple(int(s) for s in value.shape)


def count(state_dict: Mapping[str, Any], prefix: str) -> int:
    """How many numbered children ``prefix<i>.`` the keys have (the largest index + 1; 0 for none): the length of
    a ``Sequential`` or ``ModuleList`` at ``prefix``."""
    found = -1
    for key in state_dict:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found = max(found, int(head))
    return found + 1


def expansion_ratio(pairs: Sequence[Tuple[int, int]], default: float) -> Optional[float]:
    """A ratio ``r`` with ``int(dim * r) == hidden`` for every ``(dim, hidden)`` pair (how the models size their
    hidden layers), preferring ``default`` and then the shortest decimal; None without pairs.

    The ratio itself is not stored, and a range of them gives the same shapes (2.66 and 2.65625 both give 127 hidden
    channels of 48): the default keeps release configs as they are written, a short decimal keeps others readable.
    """
    if not pairs:
        return None
    fits = lambda r: r > 0 and all(int(d * r) == h for d, h in pairs)  # noqa: E731
    # Each pair allows [hidden / dim, (hidden + 1) / dim); the shortest decimal at or above the lower end of their
    # intersection is tried first.
    low = max(h / d for d, h in pairs)
    candidates = [float(default)] + [math.ceil(low * 10 ** k - 1e-9) / 10 ** k for k in range(1, 7)] + [low]
    return next((r for r in candidates if fits(r)), low)  # none fits: load_weights reports the layers that differ


def unless_default(cls: type, **options: Any) -> Dict[str, Any]:
    """The ``options`` whose value differs from ``cls.__init__``'s default (lists and tuples compare alike): the
    secondary options a detector reports only where a file departs from the usual."""
    params = inspect.signature(cls.__init__).parameters
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return {k: v for k, v in options.items() if k not in params or plain(params[k].default) != plain(v)}


def window_from_table(rows: int) -> Optional[int]:
    """The window side ``w`` of a relative-position bias table of ``(2w - 1) ** 2`` rows (None if not a square of
    an odd number)."""
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        return None
    return (side + 1) // 2


# --- detection --------------------------------------------------------------------------------------------------

def _has_head(state_dict: Mapping[str, Any]) -> bool:
    # TUR releases keep the head at the top (`var_conv.*`) or inside AirNet's restorer (`R.var_conv.*`).
    return any(HEAD_NAME in key.split(".")[:2] for key in state_dict)


def _classes() -> List[Tuple[str, Any]]:
    from .registry import spec  # at call time: the model files import the helpers above

    return [(name, spec(name).cls) for name in DETECTION_ORDER]


def detect_architecture(state_dict: Mapping[str, Any], source: str = "state dict") -> Detection:
    """The architecture and ``build()`` configuration of ``state_dict``.

    ``state_dict`` is a state dict or a loaded checkpoint in any layout :func:`~tur_ext.models.load_weights` reads
    (BasicSR ``params_ema``/``params``, Lightning ``state_dict`` with ``net.``, ``module.`` prefixes); ``source``
    names it in errors (a file name, say). Raises a one-line ``ValueError`` listing what was looked for when no
    architecture matches.
    """
    sd, _, _ = read_state_dict(state_dict, source)
    for name, cls in _classes():
        try:
            config = cls.detect_config(sd)
        except (ArithmeticError, IndexError, KeyError, TypeError, ValueError):
            # The keys matched but the shapes are malformed: not a checkpoint of this architecture after all.
            config = None
        if config is not None:
            return Detection(name, dict(config), _has_head(sd))
    looked = ", ".join(f"{name} ({', '.join(cls.detect_keys)})" for name, cls in _classes())
    first = ", ".join(list(sd)[:3])
    raise ValueError(f"{source} matches no known architecture (its {len(sd)} tensors begin with {first}): "
                     f"looked for {looked}")


def detect_file(path: Union[str, os.PathLike]) -> Detection:
    """:func:`detect_architecture` of the weights file at ``path`` (a torch file, read without running code from
    it, or a safetensors file)."""
    source = os.fspath(path)
    return detect_architecture(read_checkpoint_file(source, inert_objects=True), source)
