"""The deployment subcommands of ``tur``: ``export`` and ``restore``.

    tur export CHECKPOINT --format torchscript|aoti|safetensors|onnx --out PATH [--device cpu|cuda] [--half]
    tur export --arch NAME --weights FILE [--config KEY=VALUE ...] [--tasks SET|A,B,..] --format ... --out PATH
    tur export --weights FILE --format ... --out PATH          (no --arch: a tur_ext safetensors export says what it
                                                               holds; any other file's architecture is detected)
    tur restore --model PATH IMAGES... --out DIR [--tile N [--overlap M]] [--device cpu|cuda] [--half]
    tur restore --arch NAME --weights FILE [--config KEY=VALUE ...] IMAGES... --out DIR [...]
    tur restore --weights FILE IMAGES... --out DIR [...]      (architecture detected, see tur_ext.models.detect)

:func:`register` adds both to the ``tur`` parser's subparsers (dispatch through :data:`COMMANDS` or the ``func``
default each subparser sets); :func:`main` runs them on their own (``python -m tur_ext.deploy_cli export ...``).
Exit status: 0 ok, 1 an error (its one-line message on stderr), 2 a usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["COMMANDS", "EXPORT_FORMATS", "cmd_export", "cmd_restore", "deploy_demo", "exporter_for", "find_runner",
           "main", "register"]

#: ``tur export --format`` -> (module, exporter function, file suffix).
EXPORT_FORMATS: Dict[str, Tuple[str, str, str]] = {
    "torchscript": ("tur_ext.export", "export_torchscript", ".pt"),
    "aoti": ("tur_ext.export", "export_aoti", ".pt2"),
    "safetensors": ("tur_ext.export_safetensors", "export_safetensors", ".safetensors"),
    "onnx": ("tur_ext.export_onnx", "export_onnx", ".onnx"),
}


def exporter_for(fmt: str) -> Callable[..., Any]:
    """The export function of ``fmt`` (a key of :data:`EXPORT_FORMATS`), imported on demand (onnx is optional)."""
    import importlib

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    module, name, _ = EXPORT_FORMATS[fmt]
    return getattr(importlib.import_module(module), name)


def _parse_config(items: Sequence[str]) -> Dict[str, Any]:
    import yaml

    config: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config: expected KEY=VALUE, got {item!r}")
        try:
            config[key.strip()] = yaml.safe_load(value)  # so that enc_blocks=[1,1] and width=16 get their types
        except yaml.YAMLError as exc:
            raise ValueError(f"--config: cannot parse the value of {item!r}: {exc}") from None
    return config


def _parse_tasks(value: Optional[str]) -> Optional[List[str]]:
    from .tasks import TASK_SETS, TaskSet

    if value is None:
        return None
    if value in TASK_SETS:
        return list(TaskSet(value))
    return list(TaskSet([t.strip() for t in value.split(",") if t.strip()]))


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``export`` and ``restore`` subcommands to ``subparsers`` (each sets ``func`` to its command)."""
    e = subparsers.add_parser(
        "export", help="export a model to TorchScript (.pt), AOTInductor (.pt2), safetensors or ONNX for deployment",
        description="Export the backbone (uncertainty head stripped, eval mode) with its metadata, after checking "
                    "that the artifact reproduces the eager model (max abs <= 1e-4 in fp32; safetensors: exactly) "
                    "at two sizes. safetensors: the weights in the authors' key layout (spandrel, chaiNNer, ComfyUI "
                    "load them); onnx: opset 18 (AirNet: 19, DeformConv), dynamic batch/H/W, checked in ONNX Runtime.")
    e.add_argument("checkpoint", nargs="?", default=None,
                   help="a tur_ext training checkpoint or run folder (or use --arch and --weights)")
    e.add_argument("--arch", default=None, help="model name (tur_ext.models.available()), with --weights")
    e.add_argument("--weights", default=None,
                   help="weights from elsewhere: a state dict, BasicSR (params/params_ema) or Lightning checkpoint, "
                        "or safetensors; without --arch the architecture is detected from the file")
    e.add_argument("--config", dest="config", action="append", default=[], metavar="KEY=VALUE",
                   help="model configuration override for --arch, e.g. --config width=16 (repeatable)")
    e.add_argument("--tasks", default=None,
                   help="task names the weights were trained on (a set name such as 3task, or a,b,c); "
                        "checkpoints carry their own")
    e.add_argument("--format", required=True, choices=tuple(EXPORT_FORMATS), help="artifact format")
    e.add_argument("--out", required=True,
                   help="output file (.pt torchscript, .pt2 aoti, .safetensors safetensors, .onnx onnx)")
    e.add_argument("--onnx-exporter", default="torchscript", choices=("torchscript", "dynamo"),
                   help="torch's ONNX exporter for --format onnx (dynamo: slower, via torch.export)")
    e.add_argument("--device", default="cpu", help="cpu or cuda[:N] (AOTInductor packages run only there)")
    e.add_argument("--half", action="store_true", help="export in fp16 (CUDA only)")
    e.add_argument("--no-ema", action="store_true", help="export a checkpoint's params instead of params_ema")
    e.set_defaults(func=cmd_export)

    r = subparsers.add_parser(
        "restore", help="restore image files with an exported model or a training checkpoint",
        description="Writes each result as OUT/<input file name>. Images are reflect-padded to the model's size "
                    "multiple and cropped back; with --tile they are processed in overlapping tiles blended with "
                    "linear ramps (see tur_ext.inference; the C++ runner tur-restore does exactly the same).")
    r.add_argument("images", nargs="+", help="image files (PNG, JPEG, TIFF, ...; 8- or 16-bit; gray or color)")
    r.add_argument("--model", default=None,
                   help="a .pt (TorchScript), .pt2 (AOTInductor), .onnx (ONNX Runtime), tur_ext .safetensors or "
                        "training checkpoint; any other weights file is read as --weights FILE")
    r.add_argument("--arch", default=None, help="model name (tur_ext.models.available()), with --weights")
    r.add_argument("--weights", default=None,
                   help="published weights: a state dict, BasicSR (params/params_ema), Lightning (PromptIR) "
                        "checkpoint or safetensors; the uncertainty head, if any, is dropped; without --arch the "
                        "architecture is detected from the file")
    r.add_argument("--config", dest="config", action="append", default=[], metavar="KEY=VALUE",
                   help="model configuration override for --arch, e.g. --config width=16 (repeatable)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--tile", type=int, default=None,
                   help="tile size in pixels (rounded down to the size multiple; 0 or absent: whole image)")
    r.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default min(32, tile/2))")
    r.add_argument("--keep-going", action="store_true",
                   help="skip unreadable images (each reported), restore the others, and fail at the end with a list")
    r.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    r.add_argument("--half", action="store_true", help="fp16 inference (CUDA only, models that support it)")
    r.add_argument("--no-ema", action="store_true", help="for a training checkpoint: use params, not params_ema")
    r.set_defaults(func=cmd_restore)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import model_from_checkpoint

    from_weights = args.arch is not None or args.weights is not None
    if from_weights and args.checkpoint is not None:
        raise ValueError("export: give either CHECKPOINT or --arch with --weights, not both")
    if from_weights:
        model, tasks = _model_from_weights_args(args, "export")
        if args.tasks is not None:
            tasks = _parse_tasks(args.tasks)
    else:
        if args.checkpoint is None:
            raise ValueError("export: expected a CHECKPOINT (file or run folder), or --arch NAME --weights FILE")
        if args.config:
            raise ValueError("--config: only with --arch (a checkpoint carries its model configuration)")
        model, tasks = model_from_checkpoint(args.checkpoint, use_ema=not args.no_ema)
        if args.tasks is not None:
            tasks = _parse_tasks(args.tasks)
    exporter = exporter_for(args.format)
    options = {"exporter": args.onnx_exporter} if args.format == "onnx" else {}
    started = time.perf_counter()
    result = exporter(model, args.out, tasks=tasks, device=args.device, half=args.half, **options)
    meta = result.metadata
    parity = ", ".join(f"{v:.2g} at {k}" for k, v in result.parity.items())
    layout = f", {meta['release_layout']} keys" if "release_layout" in meta else ""
    print(f"[tur] wrote {result.path} ({args.format}, {meta['arch']}{layout}, size multiple {meta['size_multiple']}, "
          f"{meta['dtype']} on {meta['device']}) in {time.perf_counter() - started:.1f} s; "
          f"parity vs eager (max abs): {parity}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .inference import resolve_tiling, restore_files

    tile = None if args.tile == 0 else args.tile
    if tile is not None and tile < 0:
        raise ValueError(f"--tile: expected a positive number of pixels (or 0 for none), got {tile}")
    if tile is None and args.overlap is not None:
        raise ValueError("--overlap: only meaningful with --tile")
    restorer = _restorer_for(args)
    try:
        resolve_tiling(tile, args.overlap, restorer.size_multiple, restorer.min_size)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None  # "tile: ..." -> "--tile: ...": name the option the user typed
    written = restore_files(restorer, args.images, args.out, tile=tile, overlap=args.overlap,
                            progress=lambda src, dst: print(f"[tur] {src} -> {dst}", flush=True),
                            keep_going=args.keep_going, log=lambda m: print(m, flush=True))
    print(f"[tur] restored {len(written)} image(s) into {args.out}")
    return 0


def _model_from_weights_args(args: argparse.Namespace, command: str) -> Tuple[Any, List[str]]:
    """The backbone of ``--arch NAME --weights FILE [--config ...]``, or of ``--weights`` alone (a tur_ext safetensors
    export's header names the architecture; any other file's is detected), and the task names known for it."""
    from .models import build, load_weights
    from .models.weights import is_safetensors

    if args.weights is None:
        raise ValueError(f"{command}: --arch and --weights go together (--arch needs --weights FILE)")
    if not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights: no such file {args.weights!r}")
    tasks = _parse_tasks(getattr(args, "tasks", None)) or []
    if args.arch is None:
        tur_export = is_safetensors(args.weights) and _has_tur_metadata(args.weights)
        if args.config:
            what = "a tur_ext safetensors file carries" if tur_export else "the file's is detected"
            raise ValueError(f"--config: only with --arch ({what} its configuration)")
        if not tur_export:
            return _detected_model(args.weights), tasks
        from .export_safetensors import model_from_safetensors

        model, file_tasks = model_from_safetensors(args.weights)
        return model, tasks or file_tasks
    model = build(args.arch, **_parse_config(args.config))
    # Downloaded checkpoints carry trainer objects beside the weights: read those as inert data (no code runs).
    load_weights(model, args.weights, strict_head=False, inert_objects=True)
    return model.eval(), tasks


def _has_tur_metadata(path: Union[str, os.PathLike]) -> bool:
    """Whether a safetensors file carries tur_ext's header (``tur export --format safetensors`` wrote it)."""
    from .export_safetensors import SAFETENSORS_METADATA_KEY

    try:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            return SAFETENSORS_METADATA_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - a malformed file: reading its weights names the problem
        return False


def _detected_model(path: Union[str, os.PathLike], option: str = "--weights") -> Any:
    """The backbone of a weights file whose architecture and configuration are detected from its keys and shapes
    (``option``: the command-line option that named the file, for errors); prints what was found. The file is read
    once, without running code from it."""
    from .models import build, detect_architecture, load_weights
    from .models.weights import read_checkpoint_file, read_state_dict

    source = os.fspath(path)
    payload = read_checkpoint_file(source, inert_objects=True)
    state_dict, _, _ = read_state_dict(payload, f"{option}: {source}")
    try:
        found = detect_architecture(state_dict, f"{option}: {source}")
    except ValueError as exc:
        hint = "--arch NAME" if option == "--weights" else "--arch NAME --weights FILE"
        raise ValueError(f"{exc}; name the architecture with {hint}") from None
    model = build(found.arch, **found.config)
    load_weights(model, payload, strict_head=False, source=source)
    dropped = "; uncertainty head dropped" if found.has_head else ""
    print(f"[tur] detected {found.describe()} from {source}{dropped}", flush=True)
    return model.eval()


def _is_downloaded_checkpoint(path: Path) -> bool:
    """Whether ``--model PATH`` holds weights from elsewhere (a state dict, BasicSR, Lightning or plain safetensors
    file) rather than a tur_ext artifact or training checkpoint, which keep their own loaders and errors."""
    import pickle

    import torch

    from .export import artifact_kind
    from .integrity import verify_zip
    from .models.weights import is_safetensors
    from .train.checkpoint import FORMAT

    if not path.is_file():
        return False
    if is_safetensors(path):
        return not _has_tur_metadata(path)
    try:
        kind = artifact_kind(path)
    except ValueError:
        kind = None  # not a zip archive: a torch file in the legacy format, or no model at all
    if kind in ("torchscript", "aoti"):
        return False
    if kind == "checkpoint":
        verify_zip(path, "model")  # a bit-rotted file is refused as such, whatever it holds
    try:
        # Only the top-level dict is needed: mmap leaves the tensors on disk.
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "checkpoint")
    except pickle.UnpicklingError:
        # weights_only refused an object. Training checkpoints hold none; a Lightning download does (its
        # hyper_parameters). A non-zip file refused here is no torch file: the artifact loader says so.
        return kind == "checkpoint"
    except Exception:  # noqa: BLE001 - unreadable: the artifact loader names the problem
        return False
    return isinstance(payload, dict) and payload.get("format") != FORMAT


def _restorer_for(args: argparse.Namespace) -> Any:
    """The Restorer of ``tur restore``'s ``--model FILE`` or ``--arch``/``--weights``."""
    from .inference import Restorer, load_restorer
    from .models.weights import is_safetensors

    if args.model is not None and (args.arch is not None or args.weights is not None):
        raise ValueError("restore: give either --model or --arch with --weights, not both")
    if args.model is None and args.weights is None:
        if args.arch is not None:
            raise ValueError("restore: --arch and --weights go together (--arch needs --weights FILE)")
        raise ValueError("restore: expected --model FILE, or --arch NAME --weights FILE")
    if args.config and args.arch is None:
        raise ValueError("--config: only with --arch")
    path = Path(args.model) if args.model is not None else None
    if path is not None and path.suffix.lower() != ".onnx" and _is_downloaded_checkpoint(path):
        return _restorer_from_model(_detected_model(path, "--model"), [], args)
    if path is not None and path.is_file() and path.suffix.lower() == ".onnx":
        from .export_onnx import load_onnx

        if args.half or args.device != "cpu":
            raise ValueError("--device/--half: ONNX models run with ONNX Runtime on the CPU (fp32)")
        model = load_onnx(path)
        return Restorer(model, model.metadata, model.device)
    if path is not None and not (path.is_file() and is_safetensors(path)):
        return load_restorer(path, device=args.device, half=args.half, use_ema=not args.no_ema)
    if path is not None:  # a tur_ext safetensors export given as --model: its header says what it is
        args = argparse.Namespace(**{**vars(args), "weights": str(path), "arch": None})
    model, tasks = _model_from_weights_args(args, "restore")
    return _restorer_from_model(model, tasks, args)


def _restorer_from_model(model: Any, tasks: List[str], args: argparse.Namespace) -> Any:
    """An eager Restorer of ``model`` on ``--device`` (fp16 with ``--half``)."""
    from .export import build_metadata, prepare_for_export
    from .inference import Restorer, _EagerModel

    net = prepare_for_export(model, device=args.device, half=args.half)
    return Restorer(_EagerModel(net), build_metadata(net, artifact="eager", tasks=tasks),
                    next(net.parameters()).device)


def find_runner() -> Optional[Path]:
    """The tur-restore executable: ``$TUR_RESTORE``, else ``build/tur-restore`` of the source tree, else ``PATH``."""
    import shutil

    env = os.environ.get("TUR_RESTORE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1] / "build" / "tur-restore")
    found = shutil.which("tur-restore")
    if found:
        candidates.append(Path(found))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def deploy_demo(checkpoint: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], *,
                formats: Sequence[str] = ("torchscript", "aoti"), log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The deployment step of ``tur demo``: export a trained checkpoint, restore a held-out image with the runner.

    Exports ``checkpoint`` to ``out_dir/model.pt`` and ``out_dir/model.pt2``, degrades the held-out ``coffee`` photo
    (Gaussian noise, sigma 25) into ``out_dir/coffee_noisy.png``, restores it with the C++ runner for each format
    (``out_dir/coffee_restored_<format>.png``; with ``tur restore`` when the runner is not built) and compares with
    ``tur restore``. Returns the export parity, the runner-vs-Python max difference (uint8 levels) and PSNRs.
    """
    import subprocess

    import numpy as np
    from skimage import data as skdata

    from .data.degradations import gaussian_noise
    from .data.io import read_image, write_image
    from .export import export_aoti, export_torchscript, model_from_checkpoint
    from .inference import load_restorer, to_file_pixels
    from .metrics import psnr

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tasks = model_from_checkpoint(checkpoint)
    clean = skdata.coffee()[:256, 128:448].astype(np.float32) / 255.0  # held out of the quickstart's training set
    noisy = gaussian_noise(clean, 25.0, np.random.default_rng(0))
    noisy_path = out / "coffee_noisy.png"
    write_image(noisy_path, noisy)
    noisy = read_image(noisy_path)  # what the runner will see: 8-bit
    runner = find_runner()
    summary: Dict[str, Any] = {"noisy": str(noisy_path), "psnr_noisy": psnr(noisy, clean), "runner": str(runner)}
    exporters = {"torchscript": (export_torchscript, "model.pt"), "aoti": (export_aoti, "model.pt2")}
    for fmt in formats:
        exporter, name = exporters[fmt]
        started = time.perf_counter()
        result = exporter(model, out / name, tasks=tasks)
        parity = max(result.parity.values())
        log(f"[tur] demo: exported {result.path} ({fmt}) in {time.perf_counter() - started:.0f} s; parity vs eager "
            f"{parity:.2g} (max abs)")
        python_out = to_file_pixels(load_restorer(result.path).restore_image(noisy), 8)
        restored_path = out / f"coffee_restored_{fmt}.png"
        if runner is not None:
            proc = subprocess.run([str(runner), "--model", str(result.path), "--input", str(noisy_path),
                                   "--output", str(restored_path)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise ValueError(f"tur-restore failed on {noisy_path}: {proc.stderr.strip()}")
            runner_out = (read_image(restored_path) * 255.0).round().astype(np.int64)
            diff = int(np.abs(runner_out - python_out.astype(np.int64)).max())
            log(f"[tur] demo: tur-restore wrote {restored_path}; runner vs `tur restore`: max {diff} level(s) in 255")
        else:
            write_image(restored_path, python_out)
            diff = None
            log(f"[tur] demo: the C++ runner is not built (`make runner`); `tur restore` wrote {restored_path}")
        restored = read_image(restored_path)
        summary[fmt] = {"path": str(result.path), "parity_max_abs": parity, "output": str(restored_path),
                        "runner_vs_python_max_levels": diff, "psnr": psnr(restored, clean)}
        log(f"[tur] demo: PSNR on the held-out image: noisy {summary['psnr_noisy']:.2f} dB -> restored "
            f"{summary[fmt]['psnr']:.2f} dB")
    return summary


#: Subcommand name -> handler, for a dispatcher keyed by ``args.command``.
COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {"export": cmd_export, "restore": cmd_restore}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``export`` or ``restore`` (``argv`` without the program name); returns the exit status, with the
    parser behaviour and error handling of ``tur`` (:mod:`tur_ext.cli_support`)."""
    from .cli_support import Parser, run_command

    parser = Parser(prog="tur", description="Export and run restoration models.")
    register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return run_command(parser, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
