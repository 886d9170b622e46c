"""Export a backbone's weights as ``.safetensors`` in its authors' key layout, for spandrel, chaiNNer, ComfyUI and
the authors' own code.

    from tur_ext.export_safetensors import export_safetensors, model_from_safetensors
    export_safetensors(model, "nafnet.safetensors", tasks="3task")   # head stripped, release keys, parity-checked
    model, tasks = model_from_safetensors("nafnet.safetensors")      # rebuilt from the header, no --arch needed

The tensors are :meth:`Backbone.release_state_dict <tur_ext.models.Backbone.release_state_dict>` of the plain
backbone (the uncertainty head is never written), in fp32. The header's ``__metadata__`` (string values, as the
format requires) holds:

* ``tur_meta``: the JSON object every tur_ext artifact carries (:func:`tur_ext.export.build_metadata`, with
  ``artifact`` "safetensors" and ``release_layout``);
* the same facts flat, for tools that read headers without knowing tur_ext: ``arch``, ``config`` (JSON),
  ``value_range`` and ``output_range`` (JSON ``[low, high]``), ``tasks`` (JSON list), ``size_multiple``,
  ``min_size``, ``release_layout``, ``format`` ("tur_ext.export").

Before the file is put in place, it is read back, loaded into a fresh model of the same configuration through
:func:`tur_ext.models.load_weights` (the path any downloaded release takes) and compared with the eager model at two
sizes: the difference must be 0 (it is the same fp32 arithmetic on the same weights).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .export import (ExportResult, PathLike, _check_parity, _min_size, _out_path, _parity_inputs, _parity_sizes,
                     _StagedFile, build_metadata, prepare_for_export)

__all__ = ["SAFETENSORS_METADATA_KEY", "export_safetensors", "header_metadata", "model_from_safetensors",
           "read_safetensors_metadata"]

#: The ``__metadata__`` entry holding the tur_ext metadata JSON.
SAFETENSORS_METADATA_KEY = "tur_meta"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError("format: safetensors export needs the safetensors package (pip install safetensors; "
                          "`make setup` installs it)") from None
    return st


def header_metadata(meta: Dict[str, Any]) -> Dict[str, str]:
    """The ``__metadata__`` strings of a safetensors export with tur_ext metadata ``meta``."""
    return {
        SAFETENSORS_METADATA_KEY: json.dumps(meta),
        "format": str(meta["format"]),
        "arch": str(meta["arch"]),
        "config": json.dumps(meta["config"]),
        "value_range": json.dumps(meta["value_range"]),
        "output_range": json.dumps(meta["output_range"]),
        "tasks": json.dumps(meta["tasks"]),
        "size_multiple": str(meta["size_multiple"]),
        "min_size": str(meta["min_size"]),
        "release_layout": str(meta["release_layout"]),
    }


def _rebuild(meta: Dict[str, Any]) -> nn.Module:
    from .models import build

    config = {k: v for k, v in meta["config"].items() if k not in ("uncertainty", "uncertainty_channels",
                                                                   "uncertainty_input")}
    return build(meta["arch"], **config)


def export_safetensors(model: nn.Module, path: PathLike, *, tasks: Union[None, str, Sequence[str]] = None,
                       device: Union[str, torch.device] = "cpu", half: bool = False,
                       parity_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> ExportResult:
    """Write ``model``'s backbone (head stripped) to ``path`` (``.safetensors``) in its release key layout.

    The weights are always written in fp32 on the CPU; ``device`` and ``half`` are accepted for the common exporter
    signature, and ``half=True`` is refused (fp16 weights would lose what fp32 training learnt; cast after loading).
    """
    st = _safetensors()
    out = _out_path(path, ".safetensors", "safetensors")
    if half:
        raise ValueError("half: safetensors exports hold fp32 weights; cast the loaded model to fp16 instead")
    net = prepare_for_export(model, device="cpu")
    del device  # the weights file does not depend on the device it will run on
    sizes = _parity_sizes(parity_sizes, net.size_multiple, _min_size(net, "eager"))
    inputs = _parity_inputs(net, sizes)
    meta = build_metadata(net, artifact="safetensors", tasks=tasks)
    meta["release_layout"] = net.release_layout or f"tur_ext {net.arch}"
    tensors = net.release_state_dict()
    with _StagedFile(out) as stage:
        st.save_file(tensors, str(stage.staged), metadata=header_metadata(meta))
        reloaded, _ = model_from_safetensors(stage.staged)
        parity = _check_parity(net, reloaded, inputs, 0.0, f"export {out}")
        stage.commit()
    return ExportResult(out, meta, parity)


def read_safetensors_metadata(path: PathLike) -> Dict[str, Any]:
    """The tur_ext metadata of a safetensors file written by :func:`export_safetensors` (header only)."""
    st = _safetensors()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file {str(p)!r}")
    try:
        with st.safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for any malformed file
        raise ValueError(f"model: {str(p)!r} is not a readable safetensors file: {exc}") from None
    if SAFETENSORS_METADATA_KEY not in header:
        raise ValueError(f"model: {str(p)!r} has no tur_ext metadata ({SAFETENSORS_METADATA_KEY!r} in its header); "
                         f"give the architecture with --arch NAME --weights {p}")
    try:
        meta = json.loads(header[SAFETENSORS_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"model: {str(p)!r} has unreadable tur_ext metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("artifact") != "safetensors" or "arch" not in meta:
        raise ValueError(f"model: {str(p)!r} has no tur_ext safetensors metadata (artifact='safetensors', arch)")
    return meta


def model_from_safetensors(path: PathLike) -> Tuple[nn.Module, List[str]]:
    """The backbone an :func:`export_safetensors` file holds (rebuilt from its header, eval mode) and its tasks."""
    from .models import load_weights

    meta = read_safetensors_metadata(path)
    model = _rebuild(meta)
    load_weights(model, path)
    return model.eval(), [str(t) for t in meta.get("tasks", [])]

