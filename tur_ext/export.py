"""Export a restoration backbone for deployment: TorchScript (``.pt``) and AOTInductor (``.pt2``) artifacts.

    from tur_ext.export import export_torchscript, export_aoti, load_exported
    export_torchscript(model, "model.pt", tasks="3task")      # head stripped, eval mode, parity-checked
    export_aoti(model, "model.pt2", tasks="3task")            # torch.export + AOTInductor
    net = load_exported("model.pt2")                          # callable: (B, 3, H, W) -> (B, 3, H, W)

What an artifact computes: the plain backbone (the uncertainty head is stripped) on ``(B, C, H, W)`` tensors whose H
and W are multiples of ``size_multiple`` and at least ``min_size``, values in ``value_range`` (the model's input
range, [0, 1] for most backbones), channels in ``channel_order`` (``RGB``); the output is in ``output_range``.
Padding to the size rule is the caller's job (:mod:`tur_ext.inference` and the C++ runner reflect-pad and crop back,
and map [0, 1] to and from the two ranges); it is never inside the exported graph. AOTInductor packages have a
dynamic batch and dynamic H and W (multiples of ``size_multiple`` from the model's ``export_min_size`` up, which
the package's ``min_size`` records); they compute whatever a wrongly sized input gives them without complaint, so
:class:`ExportedModel` and the runner check the shape first.

Metadata travels with the artifact as one JSON object (see :func:`build_metadata`): the TorchScript extra file
``tur_meta.json``, and the AOTInductor package metadata entry ``tur_meta``. An AOTInductor package only loads with the
torch release that compiled it: :func:`load_exported` (and the runner) refuse any other with a clear message, before
the package's shared library is loaded.

Before an artifact is written, the saved file is loaded back and compared with the eager model at two sizes (default
``((k+3)m, (k+5)m)`` and ``((k+6)m, (k+2)m)`` for ``m = size_multiple`` and ``k`` the artifact's ``min_size`` in
multiples of ``m``, at least 1): max abs difference <= 1e-4 in fp32 (1e-2 in fp16), or
:class:`ExportParityError`. The file is written to a temporary folder next to ``path`` and renamed into place, so a
failed export never leaves a half-written or unchecked artifact behind.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "AOTI_METADATA_KEY",
    "ExportParityError",
    "ExportResult",
    "ExportedModel",
    "TORCHSCRIPT_METADATA_FILE",
    "TorchVersionMismatchError",
    "artifact_kind",
    "build_metadata",
    "check_torch_version",
    "export_aoti",
    "export_torchscript",
    "load_exported",
    "model_from_checkpoint",
    "model_from_weights",
    "prepare_for_export",
    "read_metadata",
]

PathLike = Union[str, os.PathLike]

FORMAT = "tur_ext.export"
FORMAT_VERSION = 1
#: The TorchScript extra file holding the metadata JSON.
TORCHSCRIPT_METADATA_FILE = "tur_meta.json"
#: The AOTInductor package metadata key holding the metadata JSON.
AOTI_METADATA_KEY = "tur_meta"
CHANNEL_ORDER = "RGB"
#: Parity tolerance (max abs, eager vs exported) per dtype.
PARITY_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2}
#: Largest height/width an AOTInductor package accepts (its dynamic dims need an upper bound).
MAX_SIDE = 32768
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}
_ARTIFACTS = ("torchscript", "aoti")
# --- formats of other modules (deploy): safetensors weights (tur_ext.export_safetensors), ONNX (tur_ext.export_onnx)
_OTHER_ARTIFACTS = ("safetensors", "onnx")
# --- end of deploy block
_METADATA_ARTIFACTS = _ARTIFACTS + ("eager",) + _OTHER_ARTIFACTS  # "eager": a checkpoint run in Python, never written


class ExportParityError(ValueError):
    """The exported artifact does not reproduce the eager model within tolerance."""


class TorchVersionMismatchError(ValueError):
    """An AOTInductor package compiled by another torch release."""


class ExportResult(NamedTuple):
    """What an export wrote: the artifact path, its metadata, and the measured parity per size ``"HxW"``."""

    path: Path
    metadata: Dict[str, Any]
    parity: Dict[str, float]


@contextmanager
def _torchscript_quietly():
    # torch 2.13 marks torch.jit deprecated on every call; shipping TorchScript is a choice made here on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        yield


# --- preparing the model ------------------------------------------------------------------------------------------

def _device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available in this torch build / machine")
    return dev


def prepare_for_export(model: nn.Module, *, device: Union[str, torch.device] = "cpu", half: bool = False
                       ) -> nn.Module:
    """An independent eval-mode copy of ``model`` without its uncertainty head, on ``device`` (fp16 if ``half``)."""
    from .models import Backbone, strip_uncertainty

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a tur_ext.models network, got {type(model).__name__}")
    net = strip_uncertainty(model)  # also looks through DDP / torch.compile wrappers; raises for non-backbones
    assert isinstance(net, Backbone)
    dev = _device(device)
    if not isinstance(half, bool):
        raise TypeError(f"half: expected a bool, got {type(half).__name__}")
    if half:
        if not net.supports_fp16:
            raise ValueError(f"half: {net.arch} declares that it does not support fp16 inference")
        if dev.type != "cuda":
            raise ValueError("half: fp16 export needs device='cuda'")
    # A deep copy: moving the shared parameters of a stripped view would move the caller's model too.
    net = copy.deepcopy(net).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device=dev, dtype=torch.float16 if half else torch.float32)


def _task_names(tasks: Union[None, str, Sequence[str]]) -> List[str]:
    from .tasks import TaskSet

    if tasks is None:
        return []
    if isinstance(tasks, (list, tuple)) and not tasks:
        return []
    return list(TaskSet(tasks))


def build_metadata(model: nn.Module, *, artifact: str, tasks: Union[None, str, Sequence[str]] = None,
                   torchscript_mode: Optional[str] = None) -> Dict[str, Any]:
    """The metadata JSON object of an artifact of the (prepared) ``model``.

    Keys: ``format``/``format_version``, ``artifact`` ("torchscript" or "aoti"), ``arch`` and ``config`` (rebuild
    with ``tur_ext.models.build(arch, **config)``), ``size_multiple``, ``in_channels``/``out_channels``,
    ``layout`` ("NCHW"), ``value_range`` and ``output_range`` (the model's input and output ranges, [low, high]),
    ``min_size`` (the smallest H and W; for AOTInductor the model's ``export_min_size``), ``channel_order`` ("RGB"),
    ``dtype``, ``device`` (the device type
    it was exported on: AOTInductor packages only run there), ``supports_fp16``, ``torch_version``,
    ``tur_ext_version``, ``tasks`` (the task names it was trained on, in id order; empty when unknown), for
    TorchScript ``torchscript_mode`` ("script" or "trace": only scripted modules may be cast to another dtype), and
    for AOTInductor ``max_side`` (the largest height or width the package accepts; larger images need tiling).
    """
    from . import __version__
    from .models import model_ranges

    if artifact not in _METADATA_ARTIFACTS:
        raise ValueError(f"artifact: expected one of {_METADATA_ARTIFACTS}, got {artifact!r}")
    param = next(model.parameters())
    input_range, output_range = model_ranges(model)
    meta: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact": artifact,
        "arch": str(model.arch),
        "config": dict(model.config),
        "size_multiple": int(model.size_multiple),
        "min_size": _min_size(model, artifact),
        "in_channels": int(model.in_channels),
        "out_channels": int(model.out_channels),
        "layout": "NCHW",
        "value_range": list(input_range),
        "output_range": list(output_range),
        "channel_order": CHANNEL_ORDER,
        "dtype": _DTYPE_NAMES[param.dtype],
        "device": param.device.type,
        "supports_fp16": bool(model.supports_fp16),
        "torch_version": torch.__version__,
        "tur_ext_version": __version__,
        "tasks": _task_names(tasks),
    }
    if artifact == "torchscript":
        meta["torchscript_mode"] = torchscript_mode or "script"
    if artifact == "aoti":
        meta["max_side"] = MAX_SIDE
    json.dumps(meta)  # fail here, not halfway through writing, if the config holds something JSON cannot encode
    return meta


def _min_size(model: nn.Module, artifact: str) -> int:
    """The smallest H and W an artifact of ``model`` runs at: ``min_size``, and for AOTInductor (whose dynamic shapes
    may need more) ``export_min_size``; always a multiple of ``size_multiple``."""
    m = int(model.size_multiple)
    low = int(getattr(model, "min_size", 1))
    if artifact == "aoti" and getattr(model, "export_min_size", None) is not None:
        low = max(low, int(model.export_min_size))
    return -(-low // m) * m


# --- parity and atomic writing ------------------------------------------------------------------------------------

def _parity_sizes(sizes: Optional[Sequence[Tuple[int, int]]], m: int, low: int) -> List[Tuple[int, int]]:
    if sizes is None:
        k = max(1, low // m)
        return [((k + 3) * m, (k + 5) * m), ((k + 6) * m, (k + 2) * m)]
    out = []
    for s in sizes:
        if (not isinstance(s, (tuple, list)) or len(s) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < max(m, low) or v % m for v in s)):
            at_least = f" of at least {low}" if low > m else ""
            raise ValueError(f"parity_sizes: expected (H, W) pairs of positive multiples of {m}{at_least}, "
                             f"got {s!r}")
        out.append((int(s[0]), int(s[1])))
    if len(out) < 1:
        raise ValueError("parity_sizes: expected at least one size")
    return out


def _parity_inputs(net: nn.Module, sizes: List[Tuple[int, int]]) -> List[Tensor]:
    param = next(net.parameters())
    g = torch.Generator().manual_seed(20240607)  # random images, never zeros: a constant input hides errors
    return [torch.rand(1, net.in_channels, h, w, generator=g).to(device=param.device, dtype=param.dtype)
            for h, w in sizes]


def _check_parity(net: nn.Module, exported, inputs: List[Tensor], atol: float, what: str) -> Dict[str, float]:
    parity: Dict[str, float] = {}
    with torch.inference_mode():
        for x in inputs:
            ref = net(x).float()
            got = exported(x).float()
            key = f"{x.shape[-2]}x{x.shape[-1]}"
            if got.shape != ref.shape:
                raise ExportParityError(f"{what}: output shape {tuple(got.shape)} at {key}, eager gives "
                                        f"{tuple(ref.shape)}")
            parity[key] = float((got - ref).abs().max())
    worst = max(parity.values())
    if not worst <= atol:  # `not <=` also catches NaN
        detail = ", ".join(f"{k}: {v:.3g}" for k, v in parity.items())
        raise ExportParityError(f"{what}: exported output differs from the eager model by up to {worst:.3g} "
                                f"(max abs; allowed {atol:g}) - {detail}; nothing was written")
    return parity


class _StagedFile:
    """A temporary folder next to ``path``; ``commit`` renames the staged file onto ``path`` (same filesystem)."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise ValueError(f"out: {str(self.path)!r} is a folder; expected a file path")
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
        # The staged file keeps the final name: archives take their inner folder name from it.
        self.staged = self.folder / self.path.name

    def commit(self) -> None:
        os.chmod(self.staged, 0o644)
        os.replace(self.staged, self.path)

    def __enter__(self) -> "_StagedFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from .integrity import write_error

        shutil.rmtree(self.folder, ignore_errors=True)
        named = write_error(exc, self.path) if exc is not None else None
        if named is not None:
            raise named from None


def _out_path(path: PathLike, suffix: str, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    p = Path(path)
    if p.suffix != suffix:
        raise ValueError(f"out: {what} files must end in {suffix}, got {str(p)!r}")
    return p


# --- TorchScript --------------------------------------------------------------------------------------------------

def _to_torchscript(net: nn.Module, example: Tensor) -> Tuple[torch.jit.ScriptModule, str]:
    # Scripting keeps the dtype logic of the model (so the module can be cast to fp16 after loading); tracing bakes
    # the dtypes of the example in, and is only the fallback for models the compiler cannot script.
    with _torchscript_quietly():
        try:
            return torch.jit.script(net), "script"
        except Exception:  # noqa: BLE001 - any scripting failure means: trace instead
            with torch.no_grad():
                return torch.jit.trace(net, example, check_trace=False), "trace"


def export_torchscript(model: nn.Module, path: PathLike, *, tasks: Union[None, str, Sequence[str]] = None,
                       device: Union[str, torch.device] = "cpu", half: bool = False,
                       parity_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> ExportResult:
    """Write ``model`` (head stripped, eval) as a TorchScript file at ``path`` (``.pt``), parity-checked first."""
    out = _out_path(path, ".pt", "TorchScript")
    net = prepare_for_export(model, device=device, half=half)
    sizes = _parity_sizes(parity_sizes, net.size_multiple, _min_size(net, "torchscript"))
    inputs = _parity_inputs(net, sizes)
    scripted, mode = _to_torchscript(net, inputs[0])
    meta = build_metadata(net, artifact="torchscript", tasks=tasks, torchscript_mode=mode)
    with _StagedFile(out) as stage:
        with _torchscript_quietly():
            torch.jit.save(scripted, str(stage.staged),
                           _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(meta)})
        reloaded = load_exported(stage.staged, device=device, half=half)
        parity = _check_parity(net, reloaded, inputs, PARITY_ATOL[_dtype_of(net)], f"export {out}")
        stage.commit()
    return ExportResult(out, meta, parity)


def _dtype_of(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


# --- AOTInductor --------------------------------------------------------------------------------------------------

def export_program(net: nn.Module) -> "torch.export.ExportedProgram":
    """``torch.export`` of a prepared backbone: dynamic batch, H and W dynamic as multiples of ``size_multiple`` from
    the artifact's ``min_size`` (:func:`_min_size`) up."""
    from torch.export import Dim

    m = net.size_multiple
    low = _min_size(net, "aoti") // m
    param = next(net.parameters())
    batch = Dim("batch", min=1, max=1024)
    hb = Dim("height_blocks", min=low, max=MAX_SIDE // m)
    wb = Dim("width_blocks", min=low, max=MAX_SIDE // m)
    # Example sizes >= 2 and pairwise different, so that export neither specialises nor unifies any of them.
    example = torch.rand(2, net.in_channels, (low + 4) * m, (low + 3) * m, generator=torch.Generator().manual_seed(0))
    example = example.to(device=param.device, dtype=param.dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*treespec, LeafSpec")
        return torch.export.export(net, (example,), dynamic_shapes=({0: batch, 2: m * hb, 3: m * wb},))


def export_aoti(model: nn.Module, path: PathLike, *, tasks: Union[None, str, Sequence[str]] = None,
                device: Union[str, torch.device] = "cpu", half: bool = False,
                parity_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> ExportResult:
    """Write ``model`` (head stripped, eval) as an AOTInductor package at ``path`` (``.pt2``), parity-checked first.

    Compiling takes tens of seconds even for a small network on CPU. The package runs only on the device type it was
    compiled for, in the dtype it was compiled for, and only with this torch release.
    """
    out = _out_path(path, ".pt2", "AOTInductor")
    net = prepare_for_export(model, device=device, half=half)
    sizes = _parity_sizes(parity_sizes, net.size_multiple, _min_size(net, "aoti"))
    inputs = _parity_inputs(net, sizes)
    meta = build_metadata(net, artifact="aoti", tasks=tasks)
    program = export_program(net)
    with _StagedFile(out) as stage:
        with warnings.catch_warnings(), _torchscript_quietly():
            # torch 2.13 warns about its own use of a deprecated pytree class while pickling the program, and about
            # torch.jit decorators in modules inductor imports.
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*treespec, LeafSpec")
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(stage.staged),
                inductor_configs={"aot_inductor.metadata": {AOTI_METADATA_KEY: json.dumps(meta)}})
        from .integrity import add_manifest

        add_manifest(stage.staged)  # sizes and CRCs of the library and weights, checked on every load
        reloaded = load_exported(stage.staged, device=device, half=half)
        parity = _check_parity(net, reloaded, inputs, PARITY_ATOL[_dtype_of(net)], f"export {out}")
        del reloaded  # release the package's shared library before the staged folder is removed
        stage.commit()
    return ExportResult(out, meta, parity)


# --- reading artifacts --------------------------------------------------------------------------------------------

def artifact_kind(path: PathLike) -> str:
    """What the file at ``path`` is, from its contents: "torchscript", "aoti" or "checkpoint".

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything else (not a torch archive, a
    TorchScript file without tur_ext metadata, ...).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file {str(p)!r}")
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        from .integrity import is_truncated_zip, truncated_error

        if is_truncated_zip(p):
            raise truncated_error(p, "model") from None
        raise ValueError(f"model: {str(p)!r} is not a tur_ext model (expected a TorchScript .pt, an AOTInductor "
                         f".pt2 or a training checkpoint): {exc}") from None
    # Every torch archive keeps its records under one top folder; compare the paths below it.
    inner = {n.split("/", 1)[1] for n in names if "/" in n}
    if any(n.startswith("data/aotinductor/") for n in inner):
        return "aoti"
    if f"extra/{TORCHSCRIPT_METADATA_FILE}" in inner:
        return "torchscript"
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        raise ValueError(f"model: {str(p)!r} is a TorchScript file without tur_ext metadata; export the model with "
                         f"`tur export` (or tur_ext.export.export_torchscript)")
    if "data.pkl" in inner:
        return "checkpoint"
    raise ValueError(f"model: {str(p)!r} is not a tur_ext model (expected a TorchScript .pt, an AOTInductor .pt2 "
                     f"or a training checkpoint)")


def _parse_metadata(text: str, path: Path) -> Dict[str, Any]:
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"model: {str(path)!r} has unreadable tur_ext metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"model: {str(path)!r} has no tur_ext export metadata (format={FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"model: {str(path)!r} has export format version {meta['format_version']}; this tur_ext "
                         f"reads versions <= {FORMAT_VERSION}")
    return meta


def read_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata JSON object of an exported artifact, read without loading its model."""
    p = Path(path)
    kind = artifact_kind(p)
    if kind == "torchscript":
        with zipfile.ZipFile(p) as z:
            name = next(n for n in z.namelist() if n.endswith(f"/extra/{TORCHSCRIPT_METADATA_FILE}"))
            return _parse_metadata(z.read(name).decode("utf-8"), p)
    if kind == "aoti":
        # Reads the package's metadata JSON only: the shared library is not loaded (it may not even be loadable).
        entries = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(p), "model")
        if AOTI_METADATA_KEY not in entries:
            raise ValueError(f"model: {str(p)!r} is an AOTInductor package without tur_ext metadata; export the "
                             f"model with `tur export`")
        return _parse_metadata(entries[AOTI_METADATA_KEY], p)
    raise ValueError(f"model: {str(p)!r} is a training checkpoint, not an exported model; export it first with "
                     f"`tur export {p} --format torchscript|aoti --out PATH`")


def _release(version: str) -> str:
    return str(version).split("+", 1)[0]


def check_torch_version(meta: Dict[str, Any], path: PathLike) -> None:
    """Refuse an AOTInductor package compiled by another torch release (the local ``+cpu``/``+cu*`` tag aside)."""
    built = str(meta.get("torch_version", "unknown"))
    if _release(built) != _release(torch.__version__):
        raise TorchVersionMismatchError(
            f"model: {str(path)!r} was compiled by torch {built}, but this is torch {torch.__version__}; an "
            f"AOTInductor package only loads with the torch release that compiled it - re-export it with this torch "
            f"(`tur export ... --format aoti`), or use the TorchScript export")


def _resolve_dtype(meta: Dict[str, Any], dev: torch.device, half: bool, path: Path) -> torch.dtype:
    """The dtype to run an artifact in, or a ValueError saying why the request cannot be met."""
    built = meta.get("dtype", "float32")
    if half:
        if not meta.get("supports_fp16", False):
            raise ValueError(f"half: {meta.get('arch')} ({str(path)!r}) declares that it does not support fp16")
        if dev.type != "cuda":
            raise ValueError("half: fp16 inference needs device='cuda'")
    if meta["artifact"] == "aoti" or meta.get("torchscript_mode") == "trace":
        # The dtype is compiled (or traced) into these artifacts.
        if half and built != "float16":
            raise ValueError(f"half: {str(path)!r} was exported in {built}; export it with --half for fp16")
        if built == "float16" and dev.type != "cuda":
            raise ValueError(f"device: {str(path)!r} was exported in fp16, which needs device='cuda'")
        return torch.float16 if built == "float16" else torch.float32
    return torch.float16 if half else torch.float32


class ExportedModel:
    """A loaded artifact: ``model(x)`` maps ``(B, C, H, W)`` (H, W multiples of ``size_multiple``) to the result.

    ``x`` is moved to the artifact's device and dtype; the result comes back in that dtype, on that device.
    """

    def __init__(self, path: Path, metadata: Dict[str, Any], module: Any, device: torch.device, dtype: torch.dtype):
        self.path = path
        self.metadata = metadata
        self.artifact: str = metadata["artifact"]
        self.device = device
        self.dtype = dtype
        self._module = module

    @property
    def size_multiple(self) -> int:
        return int(self.metadata["size_multiple"])

    @property
    def min_size(self) -> int:
        return int(self.metadata.get("min_size", self.size_multiple))

    @property
    def in_channels(self) -> int:
        return int(self.metadata.get("in_channels", 3))

    def __repr__(self) -> str:
        return (f"ExportedModel({str(self.path)!r}, {self.artifact}, arch={self.metadata.get('arch')}, "
                f"device={self.device}, dtype={self.dtype})")

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        c, m = self.in_channels, self.size_multiple
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"x: expected shape (B, {c}, H, W), got {tuple(x.shape)}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        low = max(1, self.min_size)
        if h % m or w % m or h < low or w < low:
            at_least = f" of at least {low}" if low > m else ""
            raise ValueError(f"x: height and width must be positive multiples of {m}{at_least}, got {h}x{w}; pad "
                             f"with tur_ext.models.pad_to_multiple (tur_ext.inference does it for you)")
        limit = int(self.metadata.get("max_side", 0))
        if limit and (h > limit or w > limit):
            raise ValueError(f"x: this AOTInductor package accepts sides up to {limit}, got {h}x{w}; use tiling")

    def __call__(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = x.to(device=self.device, dtype=self.dtype).contiguous()
        with torch.inference_mode():
            out = self._module(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out


def load_exported(path: PathLike, *, device: Union[str, torch.device, None] = None,
                  half: bool = False) -> ExportedModel:
    """Load a TorchScript or AOTInductor artifact written by this module.

    ``device`` defaults to the device type the artifact was exported on; an AOTInductor package only runs there.
    ``half`` runs in fp16 (CUDA only; AOTInductor packages and traced TorchScript only in the dtype they were
    exported in). Raises :class:`TorchVersionMismatchError` for an AOTInductor package from another torch release.
    """
    from .integrity import verify_zip

    p = Path(path)
    verify_zip(p, "model")  # bit rot inside a tensor record or the .pt2 library would load and write garbage
    meta = read_metadata(p)
    dev = _device(device if device is not None else meta.get("device", "cpu"))
    dtype = _resolve_dtype(meta, dev, half, p)
    if meta["artifact"] == "aoti":
        check_torch_version(meta, p)
        if dev.type != meta.get("device", "cpu"):
            raise ValueError(f"device: {str(p)!r} was compiled for {meta.get('device')}; an AOTInductor package only "
                             f"runs on the device type it was compiled for (requested {dev.type})")
        index = dev.index if dev.index is not None else (0 if dev.type == "cuda" else -1)
        try:
            module = torch._inductor.aoti_load_package(str(p), device_index=index)
        except RuntimeError as exc:
            raise ValueError(f"model: cannot load the AOTInductor package {str(p)!r}: {exc}") from None
        return ExportedModel(p, meta, module, dev, dtype)
    try:
        with _torchscript_quietly():
            module = torch.jit.load(str(p), map_location=dev)
    except RuntimeError as exc:
        raise ValueError(f"model: cannot load the TorchScript file {str(p)!r}: {exc}") from None
    module = module.to(dtype).eval()
    return ExportedModel(p, meta, module, dev, dtype)


# --- models to export ---------------------------------------------------------------------------------------------

def model_from_checkpoint(path: PathLike, *, use_ema: bool = True) -> Tuple[nn.Module, List[str]]:
    """The plain backbone of a training checkpoint (``params_ema`` unless ``use_ema=False``) and its task names."""
    from .train.checkpoint import build_model_from_checkpoint, find_checkpoint, load_checkpoint

    ckpt = load_checkpoint(find_checkpoint(path))
    model = build_model_from_checkpoint(ckpt, use_ema=use_ema, uncertainty=False)
    tasks = ckpt.get("tasks") or []
    return model, [str(t) for t in tasks]


def model_from_weights(arch: str, weights: PathLike, config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Build ``arch`` (with ``config`` overrides) and load ``weights`` from any layout ``load_weights`` reads.

    An uncertainty head in the file is dropped: only the backbone is exported.
    """
    from .models import build, load_weights

    model = build(arch, **(config or {}))
    load_weights(model, weights, strict_head=False)
    return model.eval()
