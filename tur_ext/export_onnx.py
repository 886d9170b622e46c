"""Export a backbone to ONNX (``.onnx``) and run it with ONNX Runtime, for ONNX Runtime / TensorRT / ncnn users.

    from tur_ext.export_onnx import export_onnx, load_onnx
    export_onnx(model, "model.onnx", tasks="3task")    # head stripped, opset 18, dynamic B/H/W, parity-checked
    net = load_onnx("model.onnx")                      # callable: (B, 3, H, W) tensor -> (B, 3, H, W), CPU

The graph takes one input ``input`` (B, C, H, W) float32 and gives one output ``output``; batch, height and width are
dynamic axes. As for every tur_ext artifact, H and W must be multiples of ``size_multiple`` and at least ``min_size``
(ONNX cannot state "a multiple of"; :func:`load_onnx` checks it, and ``tur restore`` pads to it) and padding stays
outside the graph. The metadata JSON of :func:`tur_ext.export.build_metadata` (``artifact`` "onnx", with
``opset`` and ``onnx_exporter``) is the model's ``metadata_props`` entry ``tur_meta``; ``arch``, ``size_multiple``,
``min_size``, ``value_range``, ``output_range`` and ``tasks`` are also there as their own entries.

Exporters: ``"torchscript"`` (the default: torch's tracing ONNX exporter, seconds for a small network; torch marks it
deprecated) or ``"dynamo"`` (``torch.onnx.export(..., dynamo=True)`` of the same ``torch.export`` program the
AOTInductor export builds, H and W dynamic as multiples of the size multiple; minutes on 2 CPU cores). Before the
file is put in place, ONNX Runtime (CPU) runs it at two sizes, batch 2, against the eager model: max abs <= 1e-4.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .export import (PARITY_ATOL, ExportedModel, ExportResult, PathLike, _check_parity, _min_size, _out_path,
                     _parity_sizes, _StagedFile, build_metadata, export_program, prepare_for_export)

__all__ = ["DEFAULT_OPSET", "ONNX_EXPORTERS", "ONNX_METADATA_KEY", "export_onnx", "load_onnx", "read_onnx_metadata"]

#: The ``metadata_props`` key holding the tur_ext metadata JSON.
ONNX_METADATA_KEY = "tur_meta"
DEFAULT_OPSET = 18
ONNX_EXPORTERS = ("torchscript", "dynamo")
_INPUT, _OUTPUT = "input", "output"


def _require(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"format: ONNX export needs the {name} package (pip install onnx onnxscript onnxruntime; "
                          f"`make setup` installs them)") from None


def _export_graph(net: nn.Module, file: Path, example: Tensor, opset: int, exporter: str) -> None:
    if exporter == "torchscript":
        from .ops.deform_conv import register_onnx_symbolic

        register_onnx_symbolic()
        dynamic = {0: "batch", 2: "height", 3: "width"}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*TorchScript-based ONNX")
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The feature will be removed")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(net, (example,), str(file), dynamo=False, opset_version=opset, input_names=[_INPUT],
                              output_names=[_OUTPUT], dynamic_axes={_INPUT: dynamic, _OUTPUT: dynamic})
        return
    _require("onnxscript")
    program = export_program(net)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*treespec, LeafSpec")
        onx = torch.onnx.export(program, (), dynamo=True, opset_version=opset, optimize=True, verify=False,
                                input_names=[_INPUT], output_names=[_OUTPUT])
    onx.save(str(file))


def _write_metadata(file: Path, meta: Dict[str, Any]) -> None:
    onnx = _require("onnx")
    proto = onnx.load(str(file))
    entries = {
        ONNX_METADATA_KEY: json.dumps(meta),
        "arch": str(meta["arch"]),
        "size_multiple": str(meta["size_multiple"]),
        "min_size": str(meta["min_size"]),
        "value_range": json.dumps(meta["value_range"]),
        "output_range": json.dumps(meta["output_range"]),
        "tasks": json.dumps(meta["tasks"]),
    }
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "tur_ext"
    onnx.save(proto, str(file))


def export_onnx(model: nn.Module, path: PathLike, *, tasks: Union[None, str, Sequence[str]] = None,
                device: Union[str, torch.device] = "cpu", half: bool = False,
                parity_sizes: Optional[Sequence[Tuple[int, int]]] = None, opset: Optional[int] = None,
                exporter: str = "torchscript") -> ExportResult:
    """Write ``model`` (head stripped, eval, fp32) as ONNX at ``path`` (``.onnx``), parity-checked in ONNX Runtime.
    ``opset``: default the newer of :data:`DEFAULT_OPSET` and the model's ``onnx_min_opset`` (AirNet: 19).

    The graph is device-neutral; it is traced on the CPU (``device`` must be "cpu"; ``half`` is refused: convert
    the fp32 graph with the deployment tool's own fp16 pass).
    """
    _require("onnx"), _require("onnxruntime")
    out = _out_path(path, ".onnx", "ONNX")
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"exporter: expected one of {list(ONNX_EXPORTERS)}, got {exporter!r}")
    if half:
        raise ValueError("half: ONNX exports are fp32; convert the graph to fp16 with the runtime's tools")
    if torch.device(device).type != "cpu":
        raise ValueError(f"device: ONNX graphs are traced on the CPU, got {device!r}")
    net = prepare_for_export(model, device="cpu")
    lowest = max(DEFAULT_OPSET, net.onnx_min_opset)
    if opset is None:
        opset = lowest
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < lowest:
        why = f" ({net.arch} needs it)" if lowest > DEFAULT_OPSET else ""
        raise ValueError(f"opset: expected an int >= {lowest}{why}, got {opset!r}")
    if exporter == "dynamo" and net.onnx_min_opset > DEFAULT_OPSET:
        raise ValueError(f"exporter: {net.arch} exports to ONNX with the 'torchscript' exporter only (its custom op "
                         f"has an ONNX mapping there), got 'dynamo'")
    low = _min_size(net, "aoti" if exporter == "dynamo" else "onnx")
    sizes = _parity_sizes(parity_sizes, net.size_multiple, low)
    g = torch.Generator().manual_seed(20240607)  # random images, never zeros; batch 2 checks the dynamic batch
    inputs = [torch.rand(2, net.in_channels, h, w, generator=g) for h, w in sizes]
    meta = build_metadata(net, artifact="onnx", tasks=tasks)
    meta.update(min_size=low, opset=opset, onnx_exporter=exporter)
    with _StagedFile(out) as stage:
        _export_graph(net, stage.staged, inputs[0][:1], opset, exporter)
        _write_metadata(stage.staged, meta)
        reloaded = load_onnx(stage.staged)
        parity = _check_parity(net, reloaded, inputs, PARITY_ATOL[torch.float32], f"export {out}")
        del reloaded
        stage.commit()
    return ExportResult(out, meta, parity)


def read_onnx_metadata(path: PathLike) -> Dict[str, Any]:
    """The tur_ext metadata of an ONNX file written by :func:`export_onnx` (read without building a session)."""
    onnx = _require("onnx")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file {str(p)!r}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others for a file that is not ONNX
        raise ValueError(f"model: {str(p)!r} is not a readable ONNX file: {exc}") from None
    props = {e.key: e.value for e in proto.metadata_props}
    if ONNX_METADATA_KEY not in props:
        raise ValueError(f"model: {str(p)!r} is an ONNX file without tur_ext metadata ({ONNX_METADATA_KEY!r} in "
                         f"metadata_props); export it with `tur export --format onnx`")
    try:
        meta = json.loads(props[ONNX_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"model: {str(p)!r} has unreadable tur_ext metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("artifact") != "onnx":
        raise ValueError(f"model: {str(p)!r} has no tur_ext ONNX metadata (artifact='onnx')")
    return meta


class _OrtModule:
    """An ONNX Runtime session behind a tensor-in, tensor-out call."""

    def __init__(self, session: Any):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


def load_onnx(path: PathLike, *, threads: Optional[int] = None) -> ExportedModel:
    """An ONNX file of :func:`export_onnx` in an ONNX Runtime CPU session, behind the same call contract (shape
    checks included) as :func:`tur_ext.export.load_exported`. ``threads``: ONNX Runtime's intra-op threads."""
    ort = _require("onnxruntime")
    p = Path(path)
    meta = read_onnx_metadata(p)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(p), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"model: ONNX Runtime cannot load {str(p)!r}: {exc}") from None
    return ExportedModel(p, meta, _OrtModule(session), torch.device("cpu"), torch.float32)
