"""Checkpoint files: atomic writes, keep-last-K rotation, safe loading, and rebuilding a model from a checkpoint alone.

A checkpoint is a plain dict (loadable with ``torch.load(..., weights_only=True)``)::

    format        "tur_ext.checkpoint"
    version       1
    step          optimizer steps done
    model         {"name": preset/arch, "uncertainty": bool, "config": {...}}  -> tur_ext.models.build(...)
    params        the model's state dict (BasicSR naming)
    params_ema    the EMA model's state dict
    tasks         the ordered task names of the run
    config        the whole run config (a nested dict)
    optimizer, scheduler, ema, loss, scaler, rng, sampler   what an exact resume needs
"""
from __future__ import annotations

import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..integrity import write_error

FORMAT = "tur_ext.checkpoint"
VERSION = 1
_NAME_RE = re.compile(r"^step_(\d+)\.pt$")

PathLike = Union[str, os.PathLike]


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, then rename it over ``path``.

    A crash or an exception at any point leaves ``path`` as it was (old contents or absent), never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        named = write_error(exc, path)
        if named is not None:
            raise named from None
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
    from ..integrity import is_truncated_zip, truncated_error, verify_zip

    if zipfile.is_zipfile(path):  # torch.save's format; a CRC check catches bit rot torch.load would accept
        verify_zip(path, "checkpoint")
    elif is_truncated_zip(path):
        raise truncated_error(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint: {str(path)!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {str(path)!r} is not a tur_ext checkpoint (no format={FORMAT!r} entry)")
    if int(ckpt.get("version", 0)) > VERSION:
        raise ValueError(f"checkpoint: {str(path)!r} has version {ckpt['version']}, this tur_ext reads <= {VERSION}")
    return ckpt


def save_checkpoint(path: PathLike, state: dict) -> None:
    """Atomically write a checkpoint dict (``format``/``version`` are added)."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


class CheckpointManager:
    """``<folder>/step_XXXXXXXX.pt`` files; keeps the newest ``keep_last`` after each save (0 keeps all)."""

    def __init__(self, folder: PathLike, keep_last: int = 3):
        if keep_last < 0:
            raise ValueError(f"keep_last: expected >= 0, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = int(keep_last)

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def list(self) -> list[tuple[int, Path]]:
        """(step, path) of every finished checkpoint, oldest first (temporary files are not listed)."""
        if not self.folder.is_dir():
            return []
        out = []
        for p in self.folder.iterdir():
            m = _NAME_RE.match(p.name)
            if m and p.is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def remove_stale_temps(self) -> list[Path]:
        """Delete ``.step_*.pt.tmp.PID`` files left by killed writers (PID no longer running); returns them."""
        removed = []
        if not self.folder.is_dir():
            return removed
        for p in self.folder.glob(".step_*.pt.tmp.*"):
            pid = p.name.rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def latest_loadable(self, log=print, map_location: Union[str, torch.device, None] = "cpu"
                        ) -> Optional[Tuple[Path, dict]]:
        """The newest checkpoint that loads and its contents (read once), saying which newer (damaged/truncated)
        ones were skipped."""
        for _, p in reversed(self.list()):
            try:
                return p, load_checkpoint(p, map_location=map_location)
            except ValueError as exc:
                log(f"[tur] skipping checkpoint {p}: {exc}")
        return None

    def latest(self) -> Optional[Path]:
        items = self.list()
        return items[-1][1] if items else None

    def save(self, step: int, state: dict) -> Path:
        path = self.path_for(step)
        save_checkpoint(path, {"step": step, **state})
        if self.keep_last:
            for _, old in self.list()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path


def find_checkpoint(path: PathLike) -> Path:
    """A checkpoint file itself, or the newest one in a run folder (``<run>/checkpoints``) or checkpoint folder."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            latest = CheckpointManager(folder).latest()
            if latest is not None:
                return latest
        raise FileNotFoundError(f"checkpoint: no step_*.pt checkpoint in {str(p)!r} or {str(p / 'checkpoints')!r}")
    raise FileNotFoundError(f"checkpoint: no such file or folder {str(p)!r}")


# --- RNG states, stored as tensors / ints so that weights_only loading accepts them -----------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --- models from checkpoints --------------------------------------------------------------------------------------

def model_spec(model: nn.Module, uncertainty: bool) -> dict:
    """What :func:`build_model_from_checkpoint` needs to rebuild ``model``."""
    arch = getattr(model, "arch", None)
    config = getattr(model, "config", None)
    if arch is None or config is None:
        raise TypeError("model: expected a tur_ext.models model (with .arch and .config attributes)")
    return {"name": str(arch), "uncertainty": bool(uncertainty), "config": dict(config)}


def build_model_from_checkpoint(ckpt: Union[dict, PathLike], *, use_ema: bool = True,
                                uncertainty: Optional[bool] = None) -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights (``params_ema`` when ``use_ema``).

    ``uncertainty=False`` drops the uncertainty head of a TUR model (inference only needs the image).
    """
    from .. import models

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(find_checkpoint(ckpt))
    spec = ckpt.get("model")
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError("checkpoint: no 'model' entry (name/config) to rebuild the model from")
    config = dict(spec.get("config") or {})
    # tur_ext.models configs carry "uncertainty" themselves (build(arch, **config) rebuilds the model, head included).
    config.setdefault("uncertainty", bool(spec.get("uncertainty", False)))
    has_unc = bool(config["uncertainty"])
    model = models.build(spec["name"], **config)
    key = "params_ema" if use_ema and "params_ema" in ckpt else "params"
    model.load_state_dict(ckpt[key])
    if has_unc and uncertainty is False:
        model = models.strip_uncertainty(model)
    return model.eval()
