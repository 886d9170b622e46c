"""Builds a framework-free .cu against the emulator (build.sh) once per content: the library's name carries a hash
of everything that goes into it (the .cu, its drivers, every header under csrc/, the emulator's own files, the
flavor and flags), so tests rebuild only when one of those changed and reuse build/cuda_emu/ otherwise.

    python tests/cuda_emu/cached_build.py KERNELS.cu DRIVER.cpp [...]   # prints the library's path
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / "build" / "cuda_emu"


def _inputs(cu: Path, drivers: Sequence[Path]) -> list:
    headers = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".inc", ".cuh"))
    own = sorted(p for p in HERE.iterdir() if p.suffix in (".h", ".cpp", ".py", ".sh") and p.is_file())
    return [cu, *drivers, *headers, *own]


def library(cu: os.PathLike, drivers: Sequence[os.PathLike], *, flavor: str = "contract",
            extra: Sequence[str] = ("-I", "csrc"), name: Optional[str] = None) -> Path:
    """Path of the emulated build of ``cu`` linked with ``drivers``; builds it when no build of this content
    exists. ``name`` defaults to the .cu's stem."""
    cu = Path(cu).resolve()
    drivers = [Path(d).resolve() for d in drivers]
    h = hashlib.sha1()
    for p in _inputs(cu, drivers):
        h.update(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p).encode())
        h.update(p.read_bytes())
    h.update(repr((flavor, tuple(extra))).encode())
    out = BUILD / f"{name or cu.stem}-{flavor}-{h.hexdigest()[:12]}.so"
    if out.exists():
        return out
    BUILD.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"tmp{os.getpid()}-{out.name}")
    res = subprocess.run(
        ["bash", str(HERE / "build.sh"), str(tmp), str(cu), *map(str, drivers), "--", *extra],
        cwd=ROOT, env={**os.environ, "FLAVOR": flavor}, capture_output=True, text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"cuda_emu: building {cu.name} failed:\n{res.stdout}\n{res.stderr}")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(library(sys.argv[1], sys.argv[2:]))
