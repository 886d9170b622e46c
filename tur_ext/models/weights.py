"""Load weights saved in the layouts people actually have into a :mod:`tur_ext.models` network.

Recognised layouts (detected from the file's top-level keys):

* ``basicsr:params_ema`` / ``basicsr:params``: BasicSR-style ``{"params_ema": sd, "params": sd, ...}`` (NAFNet
  releases, and this package's trainer); ``params_ema`` is preferred when present.
* ``lightning``: a PyTorch Lightning checkpoint, ``{"state_dict": {"net.<key>": ...}, ...}`` (the PromptIR
  release); only the ``net.`` entries are the network.
* ``state_dict``: a plain ``{key: tensor}`` mapping, in a torch file or a ``.safetensors`` file (recognised from
  its contents; ``tur export --format safetensors`` writes those).

An architecture whose releases use another key layout than its module maps them in
:meth:`~tur_ext.models.Backbone.adapt_state_dict`, which runs before keys and shapes are compared. Which
architecture and configuration a file holds, when it does not say: :func:`tur_ext.models.detect_file`.

Key prefixes added by ``DataParallel``/``DistributedDataParallel`` (``module.``) and ``torch.compile``
(``_orig_mod.``) are removed. Files are never unpickled with code: torch files are read with
``torch.load(..., weights_only=True)``, and where that refuses an object beside the weights (Lightning's
``hyper_parameters`` as an ``argparse.Namespace``, say) with an unpickler that resolves only tensor rebuilders and
plain types and turns every other class into inert data (:class:`OpaqueObject`); safetensors files are read with
``safetensors.torch.load_file``.
"""
from __future__ import annotations

import builtins
import os
import pickle
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .head import HEAD_NAME, Backbone, _unwrap

__all__ = ["load_weights", "read_state_dict", "read_checkpoint_file", "is_safetensors", "LoadReport",
           "WeightsMismatchError"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LIGHTNING_PREFIX = "net."
_HEAD_PREFIX = HEAD_NAME + "."
_SHOW = 5  # keys listed per category in error messages


class WeightsMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model."""


class LoadReport(NamedTuple):
    """What :func:`load_weights` found and did."""

    source: str                           #: the file name (or "<state dict>")
    format: str                           #: "state_dict", "lightning", "basicsr:params_ema" or "basicsr:params"
    prefixes_stripped: Tuple[str, ...]    #: key prefixes removed, outermost first
    num_loaded: int                       #: tensors copied into the model
    missing_head_keys: Tuple[str, ...]    #: head keys the checkpoint lacked (the head keeps its fresh init)
    dropped_head_keys: Tuple[str, ...]    #: head keys in the checkpoint that the model has no head for


def _all_tensors(d: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())


def _strip(sd: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items()}


def read_state_dict(payload: Mapping[str, Any], source: str = "<state dict>"
                    ) -> Tuple[Dict[str, Tensor], str, Tuple[str, ...]]:
    """Find the network's state dict in a loaded checkpoint: ``(state_dict, format, prefixes_stripped)``."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"{source}: expected a state dict or a checkpoint dict, got {type(payload).__name__}")
    stripped: List[str] = []
    if isinstance(payload.get("params_ema"), Mapping) or isinstance(payload.get("params"), Mapping):
        fmt = "basicsr:params_ema" if isinstance(payload.get("params_ema"), Mapping) else "basicsr:params"
        sd = dict(payload[fmt.split(":")[1]])
    elif isinstance(payload.get("state_dict"), Mapping):
        fmt = "lightning"
        sd = dict(payload["state_dict"])
    elif payload and _all_tensors(payload):
        fmt = "state_dict"
        sd = dict(payload)
    else:
        keys = ", ".join(repr(k) for k in list(payload)[:8])
        raise ValueError(
            f"{source}: not a recognised checkpoint: expected a {{key: tensor}} state dict, a BasicSR checkpoint "
            f"('params_ema'/'params') or a Lightning checkpoint ('state_dict'); top-level keys: {keys or 'none'}")
    if not sd or not _all_tensors(sd):
        raise ValueError(f"{source}: the {fmt} entry is empty or holds values that are not tensors")

    changed = True
    while changed:  # wrappers nest (DDP around torch.compile): peel them in any order
        changed = False
        for prefix in _WRAPPER_PREFIXES + ((_LIGHTNING_PREFIX,) if fmt == "lightning" else ()):
            if prefix == _LIGHTNING_PREFIX:
                # The LightningModule may own other modules (a loss with parameters); only `net.` is the network.
                if any(k.startswith(prefix) for k in sd):
                    sd = _strip({k: v for k, v in sd.items() if k.startswith(prefix)}, prefix)
                    stripped.append(prefix)
                    changed = True
            elif all(k.startswith(prefix) for k in sd):
                sd = _strip(sd, prefix)
                stripped.append(prefix)
                changed = True
    return sd, fmt, tuple(stripped)


def is_safetensors(path: Union[str, os.PathLike]) -> bool:
    """Whether the file at ``path`` is a safetensors file (from its contents: an 8-byte little-endian header length,
    then the JSON header), whatever its name."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


class OpaqueObject(dict):
    """What an object of a class the reader does not allow becomes: its constructor arguments (``args``), state
    (``state``) and items, kept as data. No code of the class is imported or run."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.args = args
        self.items_list: List[Any] = []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items_list.append(item)

    def extend(self, items: Any) -> None:
        self.items_list.extend(items)

    def __repr__(self) -> str:
        return f"<opaque {self.qualified_name}>"


_TORCH_REBUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
_BUILTINS = ("set", "frozenset", "complex", "slice", "bytearray")
_OPAQUE: Dict[Tuple[str, str], type] = {}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Resolves only tensor rebuilders, dtypes, ``torch.Size``/``torch.device``, ``OrderedDict`` and a few builtin
    containers; every other global becomes an :class:`OpaqueObject` subclass, so nothing outside that list runs."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in _TORCH_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch" and (name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(builtins, name)
        key = (module, name)
        if key not in _OPAQUE:
            _OPAQUE[key] = type(name, (OpaqueObject,), {"qualified_name": f"{module}.{name}"})
        return _OPAQUE[key]


class _DataOnlyPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler is :class:`_DataOnlyUnpickler`."""

    Unpickler = _DataOnlyUnpickler
    UnpicklingError = pickle.UnpicklingError
    load = staticmethod(lambda f, **kw: _DataOnlyUnpickler(f, **kw).load())


def _reason(exc: BaseException) -> str:
    """The gist of a torch.load error on one line (weights_only errors wrap it in paragraphs of advice)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split())


def _looks_like_torch_file(path: str) -> bool:
    """A zip archive (torch.save since 1.6), a pickle of protocol 2 or more (the legacy format) or a tar (older)."""
    with open(path, "rb") as f:
        head = f.read(262)
    return head.startswith((b"PK\x03\x04", b"\x80")) or head[257:262] == b"ustar"


def read_checkpoint_file(path: Union[str, os.PathLike], *, inert_objects: bool = False) -> Dict[str, Any]:
    """The contents of a weights file without running code from it: safetensors (its tensors) or a torch file read
    with ``weights_only=True``. Errors name the file and what was expected.

    A torch file holding other objects beside its tensors is refused, unless ``inert_objects``: then it is read with
    the data-only unpickler, every such object becoming an :class:`OpaqueObject` (what ``tur restore/export
    --weights`` do with downloaded checkpoints)."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"path: no such checkpoint file: {source}")
    if is_safetensors(source):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{source}: is a safetensors file; reading it needs the safetensors package "
                              f"(pip install safetensors)") from None
        try:
            return dict(load_file(source, device="cpu"))
        except Exception as exc:  # noqa: BLE001 - SafetensorError for any malformed file
            raise ValueError(f"{source}: not a readable safetensors file: {exc}") from exc
    if not _looks_like_torch_file(source):
        with open(source, "rb") as f:
            head = f.read(16)
        raise ValueError(f"{source}: cannot be read with torch.load: not a torch checkpoint or safetensors file "
                         f"(it begins with {head!r})")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not inert_objects:
            raise ValueError(f"{source}: cannot be read with torch.load(weights_only=True) (only tensors and plain "
                             f"containers are allowed; inert_objects=True reads other objects as inert data): "
                             f"{_reason(exc)}") from exc
        first = exc
    except Exception as exc:  # noqa: BLE001 - a corrupt file makes torch's unpickler raise IndexError, KeyError,
        # UnicodeDecodeError, RuntimeError, EOFError, ... (about 1 random file in 10 is not an UnpicklingError)
        raise ValueError(f"{source}: not a readable torch checkpoint or safetensors file: {_reason(exc)}") from exc
    # A downloaded checkpoint often carries objects beside its weights (Lightning's hyper_parameters as a Namespace
    # or AttributeDict, a trainer's config classes). They are kept as inert data rather than refused or imported.
    try:
        payload = torch.load(source, map_location="cpu", weights_only=False, pickle_module=_DataOnlyPickle)
    except Exception as exc:  # noqa: BLE001 - report the reason weights_only gave, which names the global
        raise ValueError(f"{source}: cannot be read with torch.load(weights_only=True) (only tensors and plain "
                         f"containers are allowed): {_reason(first)}") from exc
    if not isinstance(payload, Mapping) or isinstance(payload, OpaqueObject):
        raise ValueError(f"{source}: expected a checkpoint dict, got {type(payload).__name__} "
                         f"({getattr(payload, 'qualified_name', '')})")
    return dict(payload)


def _listing(title: str, keys: List[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{title} ({len(keys)}): {shown}{more}"


def load_weights(model: nn.Module, path: Union[str, os.PathLike, Mapping[str, Any]], *,
                 strict_head: bool = True, inert_objects: bool = False, source: Optional[str] = None) -> LoadReport:
    """Load a checkpoint into ``model`` (in place) and say what was loaded.

    ``path`` is a file (any layout of this module's docstring) or an already-loaded checkpoint dict. Every key must
    match the model, with the same shapes; otherwise a :class:`WeightsMismatchError` (a ``ValueError``) lists the
    first missing, unexpected and mismatched keys and names the file. With ``strict_head=False`` the uncertainty head
    is exempt: a head-less checkpoint loads into a model with a head (a warning says the head starts untrained), and
    a checkpoint's head is dropped when the model has none (to export a TUR-trained backbone). ``inert_objects``:
    see :func:`read_checkpoint_file`. ``source``: the name errors give a checkpoint dict (the file it was read from,
    say; default ``"<state dict>"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(strict_head, bool):
        raise TypeError(f"strict_head: expected a bool, got {type(strict_head).__name__}")
    if source is not None and not isinstance(source, str):
        raise TypeError(f"source: expected a str, got {type(source).__name__}")
    if isinstance(path, Mapping):
        source, payload = source or "<state dict>", path
    elif isinstance(path, (str, os.PathLike)):
        source = source or os.fspath(path)
        payload = read_checkpoint_file(path, inert_objects=inert_objects)
    else:
        raise TypeError(f"path: expected a file path or a checkpoint dict, got {type(path).__name__}")

    sd, fmt, stripped = read_state_dict(payload, source)
    net = _unwrap(model)
    if isinstance(net, Backbone):
        sd = net.adapt_state_dict(sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    missing_head: List[str] = []
    dropped_head: List[str] = []
    if not strict_head:
        own_head = [k for k in own if k.startswith(_HEAD_PREFIX)]
        # Exempt a head only when it is absent as a whole: half a head is a corrupt checkpoint, not a choice.
        if own_head and all(k in missing for k in own_head):
            missing_head = own_head
            missing = [k for k in missing if not k.startswith(_HEAD_PREFIX)]
        ckpt_head = [k for k in sd if k.startswith(_HEAD_PREFIX)]
        if ckpt_head and all(k in unexpected for k in ckpt_head):
            dropped_head = ckpt_head
            unexpected = [k for k in unexpected if not k.startswith(_HEAD_PREFIX)]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{source}: checkpoint ({fmt}) does not match {type(model).__name__}"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
        if strict_head and (all(k.startswith(_HEAD_PREFIX) for k in missing + unexpected) and not mismatched):
            parts.append("only the uncertainty head differs: pass strict_head=False to load the rest")
        raise WeightsMismatchError("; ".join(parts))

    sd = {k: v for k, v in sd.items() if k not in dropped_head}
    model.load_state_dict(sd, strict=not missing_head)
    if missing_head:
        warnings.warn(f"{source}: the checkpoint has no uncertainty head; the head ({len(missing_head)} tensors) "
                      f"starts untrained", stacklevel=2)
    return LoadReport(source, fmt, stripped, len(sd), tuple(missing_head), tuple(dropped_head))
