"""Deployment latency and memory: eager Python vs TorchScript vs AOTInductor, in Python and in the C++ runner.

* ``test_latency[<variant>-<size>]``: restoring one ``size x size`` RGB image (no tiling; I/O excluded) with
  ``eager`` (a training checkpoint through ``tur_ext.inference``), ``torchscript`` and ``aoti`` (the exported files
  through ``tur_ext.inference``), and ``runner-torchscript`` / ``runner-aoti`` (``tur-restore --benchmark K``: the
  same restoration K times inside the runner). ``extra_info["median_ms"]`` is the steady-state median per image for
  every variant (for the runner, as the runner measures it; the benchmark's own timing of a runner case is the whole
  process: start, model load, K + 1 restorations and the image I/O).
* ``test_peak_memory[<format>-<mode>]``: the runner's peak resident memory (its VmHWM) restoring a 1024x1024
  image whole and with ``--tile 256 --overlap 32``; ``extra_info["peak_rss_mib"]``, and the same for a 16x16 image
  (``baseline_rss_mib``: the runner with libtorch and the model loaded).

Targets (from the issue): runner <= Python eager, AOTI <= TorchScript. The model is ``nafnet-tiny`` (the quickstart
model) with random weights, on CPU unless CUDA is present. Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_inference.py --benchmark-json=...
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_inference.py      # the same, printed as tables

The runner is build/tur-restore (``make runner``) or $TUR_RESTORE; its cases are skipped when it is missing. The
AOTInductor package is compiled once per run (a minute or two on CPU). On a shared machine the figures move by
10-30 %: compare variants measured in the same run, and use ``OMP_NUM_THREADS=1``.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = (256, 512, 1024)
VARIANTS = ("eager", "torchscript", "aoti", "runner-torchscript", "runner-aoti")
ROUNDS = int(os.environ.get("TUR_BENCH_ROUNDS", 5))
MEMORY_TILE = (256, 32)
RUNNER = Path(os.environ.get("TUR_RESTORE", REPO_ROOT / "build" / "tur-restore"))


class Setup(NamedTuple):
    folder: Path
    checkpoint: Path
    torchscript: Path
    aoti: Path
    images: Dict[int, Path]


def prepare(folder: Path) -> Setup:
    """nafnet-tiny with random weights, as a training checkpoint and both exports; test photos at every size."""
    import cv2
    from skimage import data

    from tur_ext.export import export_aoti, export_torchscript
    from tur_ext.models import build
    from tur_ext.train.checkpoint import model_spec, save_checkpoint

    torch.manual_seed(0)
    model = build("nafnet-tiny", uncertainty=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0.0, 0.1)  # the published zero init would make every block an identity
    checkpoint = folder / "tiny_ckpt.pt"
    save_checkpoint(checkpoint, {"step": 0, "model": model_spec(model, True), "params": model.state_dict(),
                                 "params_ema": model.state_dict(), "tasks": ["denoise_25"], "config": {}})
    ts = export_torchscript(model, folder / "tiny.pt", device=DEVICE).path
    aoti = export_aoti(model, folder / "tiny.pt2", device=DEVICE).path
    photo = data.astronaut()[:, :, ::-1]  # 512x512, BGR for OpenCV
    images = {}
    for size in SIZES + (16,):
        images[size] = folder / f"photo_{size}.png"
        cv2.imwrite(str(images[size]), cv2.resize(photo, (size, size), interpolation=cv2.INTER_CUBIC))
    return Setup(folder, checkpoint, ts, aoti, images)


def _model_path(setup: Setup, variant: str) -> Path:
    fmt = variant.replace("runner-", "")
    return {"eager": setup.checkpoint, "torchscript": setup.torchscript, "aoti": setup.aoti}[fmt]


def python_latency_ms(setup: Setup, variant: str, size: int, rounds: int = ROUNDS) -> List[float]:
    """Per-image times of ``tur_ext.inference`` restoring the size x size photo (after two warm-up runs)."""
    from tur_ext.data.io import read_image
    from tur_ext.inference import load_restorer

    restorer = load_restorer(_model_path(setup, variant), device=DEVICE)
    x = torch.from_numpy(read_image(setup.images[size])).permute(2, 0, 1)[None].contiguous()
    times = []
    for i in range(rounds + 2):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        restorer(x)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return times


class RunnerResult(NamedTuple):
    median_ms: float
    min_ms: float
    first_ms: float
    load_ms: float
    peak_rss_mib: float
    wall_s: float


def run_runner(setup: Setup, fmt: str, size: int, *, repeat: int = 1, tile: Optional[tuple] = None) -> RunnerResult:
    """One runner process with ``--benchmark repeat``: its timings and its peak resident memory (VmHWM).

    The runner reads its own peak: the parent's ``wait4`` max RSS would count this (large) Python process, whose
    pages the child holds between fork and exec.
    """
    out = setup.folder / f"out_{fmt}_{size}.png"
    args = [str(RUNNER), "--model", str(_model_path(setup, fmt)), "--input", str(setup.images[size]),
            "--output", str(out), "--device", DEVICE, "--benchmark", str(max(1, repeat))]
    if tile:
        args += ["--tile", str(tile[0]), "--overlap", str(tile[1])]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"tur-restore failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    timing = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", proc.stderr)}
    return RunnerResult(timing["median_ms"], timing["min_ms"], timing["first_ms"], timing["load_ms"],
                        timing["peak_rss_mib"], wall)


def latency_ms(setup: Setup, variant: str, size: int) -> float:
    if variant.startswith("runner-"):
        return run_runner(setup, variant[len("runner-"):], size, repeat=ROUNDS).median_ms
    return statistics.median(python_latency_ms(setup, variant, size))


# --- pytest-benchmark ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return prepare(tmp_path_factory.mktemp("bench_inference"))


def _skip_without_runner(variant: str) -> None:
    if variant.startswith("runner-") and not RUNNER.is_file():
        pytest.skip(f"the C++ runner is not built ({RUNNER} missing): run `make runner` or set TUR_RESTORE")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}px")
@pytest.mark.parametrize("variant", VARIANTS)
def test_latency(benchmark, setup, variant, size):
    _skip_without_runner(variant)
    benchmark.group = f"latency-{size}px"
    if variant.startswith("runner-"):
        fmt = variant[len("runner-"):]
        result = benchmark.pedantic(run_runner, args=(setup, fmt, size), kwargs={"repeat": ROUNDS}, rounds=1,
                                    iterations=1)
        benchmark.extra_info.update(result._asdict())
    else:
        from tur_ext.data.io import read_image
        from tur_ext.inference import load_restorer

        restorer = load_restorer(_model_path(setup, variant), device=DEVICE)
        x = torch.from_numpy(read_image(setup.images[size])).permute(2, 0, 1)[None].contiguous()
        benchmark.pedantic(restorer, args=(x,), rounds=ROUNDS, iterations=1, warmup_rounds=2)
        benchmark.extra_info["median_ms"] = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(device=DEVICE, threads=torch.get_num_threads())


@pytest.mark.parametrize("mode", ["whole", "tiled"])
@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_peak_memory(benchmark, setup, fmt, mode):
    _skip_without_runner("runner-")
    benchmark.group = "runner-peak-memory-1024px"
    tile = MEMORY_TILE if mode == "tiled" else None
    result = benchmark.pedantic(run_runner, args=(setup, fmt, 1024), kwargs={"tile": tile}, rounds=1, iterations=1)
    baseline = run_runner(setup, fmt, 16)
    benchmark.extra_info.update(peak_rss_mib=result.peak_rss_mib, baseline_rss_mib=baseline.peak_rss_mib,
                                tile=list(tile) if tile else None)


# --- as a script --------------------------------------------------------------------------------------------------

def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        started = time.perf_counter()
        setup = prepare(Path(tmp))
        print(f"prepared nafnet-tiny checkpoint + exports in {time.perf_counter() - started:.0f} s "
              f"(device {DEVICE}, {torch.get_num_threads()} thread(s), {ROUNDS} rounds)")
        variants = [v for v in VARIANTS if RUNNER.is_file() or not v.startswith("runner-")]
        table: Dict[str, Dict[int, float]] = {v: {} for v in variants}
        for size in SIZES:
            for v in variants:
                table[v][size] = latency_ms(setup, v, size)
        print("\nmedian latency per image (ms)\n")
        print("| variant | " + " | ".join(f"{s}²" for s in SIZES) + " |")
        print("|---|" + "---|" * len(SIZES))
        for v in variants:
            print(f"| {v} | " + " | ".join(f"{table[v][s]:.1f}" for s in SIZES) + " |")
        if RUNNER.is_file():
            print("\nrunner peak resident memory at 1024² (MiB)\n")
            print(f"| format | loaded (16² image) | whole image | tile {MEMORY_TILE[0]}, overlap {MEMORY_TILE[1]} |")
            print("|---|---|---|---|")
            for fmt in ("torchscript", "aoti"):
                base = run_runner(setup, fmt, 16).peak_rss_mib
                whole = run_runner(setup, fmt, 1024).peak_rss_mib
                tiled = run_runner(setup, fmt, 1024, tile=MEMORY_TILE).peak_rss_mib
                print(f"| {fmt} | {base:.0f} | {whole:.0f} | {tiled:.0f} |")
        else:
            print(f"\n(runner not built: {RUNNER} missing)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
