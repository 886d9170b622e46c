"""The C++ runner tur-restore against `tur restore`, and its error handling.

Needs the runner binary: build/tur-restore (`make runner`) or the path in $TUR_RESTORE; skipped when it is absent
(the summary of the run counts them), and failed instead when TUR_REQUIRE_RUNNER=1 (CI).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from export_helpers import (
    photo_crop,
    repackage_with_torch_version,
    require_runner,
    runner_binary,
    session_artifacts,
    tiny_model,
)
from tur_ext import deploy_cli
from tur_ext.export import export_torchscript

RUNNER = runner_binary()


@pytest.fixture(autouse=True)
def _runner_present():
    require_runner()


def run_runner(*args, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUNNER), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return session_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Test photos in the formats the runner reads; 45x61 needs padding to the size multiple 4."""
    folder = tmp_path_factory.mktemp("runner_inputs")
    rgb = photo_crop(45, 61)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    wide = bgr.astype(np.uint16) * 257 + np.arange(bgr.size, dtype=np.uint16).reshape(bgr.shape) % 251
    ramp = np.arange(45 * 61).reshape(45, 61, 1)
    bgra = np.concatenate([bgr, (ramp % 256).astype(np.uint8)], axis=2)  # an alpha that varies, 0 and 255 included
    bgra16 = np.concatenate([wide, (ramp * 23 % 65536).astype(np.uint16)], axis=2)
    files = {"rgb8.png": bgr, "rgb16.png": wide, "gray.png": bgr[:, :, 1], "gray16.tif": wide[:, :, 0],
             "photo.jpg": bgr, "rgb8.tif": bgr, "alpha.png": bgra, "alpha16.png": bgra16}
    for name, pixels in files.items():
        assert cv2.imwrite(str(folder / name), pixels)
    return {name: folder / name for name in files}


def _python_restore(model: Path, image: Path, out_dir: Path, tiling) -> np.ndarray:
    argv = ["restore", "--model", str(model), str(image), "--out", str(out_dir)]
    if tiling:
        argv += ["--tile", str(tiling[0]), "--overlap", str(tiling[1])]
    assert deploy_cli.main(argv) == 0
    return cv2.imread(str(out_dir / image.name), cv2.IMREAD_UNCHANGED)


def _runner_restore(model: Path, image: Path, out: Path, tiling) -> np.ndarray:
    args = ["--model", model, "--input", image, "--output", out]
    if tiling:
        args += ["--tile", tiling[0], "--overlap", tiling[1]]
    proc = run_runner(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"tur-restore: wrote {out}")
    return cv2.imread(str(out), cv2.IMREAD_UNCHANGED)


def _assert_within_one(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= 1, f"{what}: max diff {diff.max()}, {np.mean(diff > 0):.2%} of samples differ"


@pytest.mark.parametrize("tiling", [None, (24, 8)], ids=["whole", "tiled"])
@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_runner_matches_tur_restore(artifacts, inputs, tmp_path, fmt, tiling):
    model = getattr(artifacts, fmt).path
    image = inputs["rgb8.png"]
    expected = _python_restore(model, image, tmp_path / "py", tiling)
    got = _runner_restore(model, image, tmp_path / "runner.png", tiling)
    _assert_within_one(got, expected, f"{fmt} {tiling}")
    # The README's "measured difference: 0": the same libtorch kernels on the same input give the same bytes.
    assert np.array_equal(got, expected), f"{fmt} {tiling}: {np.mean(got != expected):.2%} of samples differ"
    # The comparison is not trivial: the model changes the image, and the tiles change the result.
    assert np.abs(expected.astype(int) - cv2.imread(str(image)).astype(int)).mean() > 2


@pytest.mark.parametrize("name", ["rgb16.png", "gray.png", "gray16.tif", "photo.jpg", "rgb8.tif", "alpha.png",
                                  "alpha16.png"])
def test_runner_reads_formats_like_tur_restore(artifacts, inputs, tmp_path, name):
    image = inputs[name]
    expected = _python_restore(artifacts.torchscript.path, image, tmp_path / "py", (32, 8))
    got = _runner_restore(artifacts.torchscript.path, image, tmp_path / f"runner{image.suffix}", (32, 8))
    # gray promoted to RGB; the input's alpha carried over unchanged by both tools
    assert got.ndim == 3 and got.shape[2] == (4 if name.startswith("alpha") else 3)
    if name.startswith("alpha"):
        assert np.array_equal(got[:, :, 3], cv2.imread(str(image), cv2.IMREAD_UNCHANGED)[:, :, 3])
    assert got.dtype == (np.uint16 if "16" in name else np.uint8)
    if name.endswith(".jpg"):
        # Both sides write JPEG with OpenCV's default quality (95), but with different libjpeg builds (the wheel's
        # and the system's), which may round a DCT coefficient differently: one quantisation step (2-3 levels at
        # quality 95) at a few pixels. Measured here: 0 everywhere. The restorations are compared exactly above.
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.max() <= 4 and np.percentile(diff, 99) <= 1, (diff.max(), np.percentile(diff, 99))
    else:
        _assert_within_one(got, expected, name)


@pytest.mark.parametrize("case", ["8-bit into tif", "16-bit into webp", "float into png", "8-bit into jpg"])
def test_runner_alpha_at_other_depths_and_formats(artifacts, inputs, tmp_path, case):
    """The alpha at the output's depth (8 <-> 16 bit by 257, float as round(clip(a) * 255)), as tur restore does
    it; a format without alpha is said once."""
    src = cv2.imread(str(inputs["alpha16.png" if case.startswith("16") else "alpha.png"]), cv2.IMREAD_UNCHANGED)
    if case.startswith("float"):
        src = (src.astype(np.float32) / 255.0) * np.float32(1.2) - np.float32(0.1)  # outside [0, 1] too
        image = tmp_path / "alphaf.tif"
    else:
        image = tmp_path / f"alpha{src.dtype.itemsize * 8}.png"
    assert cv2.imwrite(str(image), src)
    out = tmp_path / ("out" + {"tif": ".tif", "webp": ".webp", "png": ".png", "jpg": ".jpg"}[case.split()[-1]])
    proc = run_runner("--model", artifacts.torchscript.path, "--input", image, "--output", out)
    assert proc.returncode == 0, proc.stderr
    got = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    if out.suffix == ".jpg":
        assert got.shape[2] == 3 and proc.stderr.count("has an alpha channel") == 1
        assert ".jpg files cannot hold; written without it" in proc.stderr
        return
    assert got.shape[2] == 4 and got.dtype == np.uint8
    a = src[:, :, 3].astype(np.float64)
    want = {np.dtype(np.uint8): a, np.dtype(np.uint16): np.round(a / 257.0),
            np.dtype(np.float32): np.round(np.clip(a, 0.0, 1.0) * 255.0)}[src.dtype]
    assert np.array_equal(got[:, :, 3], want.astype(np.uint8)) and want.std() > 10
    # the colour is the one written without alpha
    plain = run_runner("--model", artifacts.torchscript.path, "--input", image, "--output", tmp_path / "plain.png")
    assert plain.returncode == 0, plain.stderr
    colour = cv2.imread(str(tmp_path / "plain.png"), cv2.IMREAD_UNCHANGED)
    if out.suffix != ".webp":  # webp is lossy for the colour
        assert np.array_equal(got[:, :, :3], colour[:, :, :3] if colour.shape[2] == 4 else colour)


def _assert_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tur-restore: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_runner_error_cases(artifacts, inputs, tmp_path):
    ts, image = artifacts.torchscript.path, inputs["rgb8.png"]
    out = tmp_path / "out.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    checkpoint = tmp_path / "step_00000001.pt"
    torch.save({"params": {"w": torch.ones(2)}}, checkpoint)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    cases = [
        # (arguments, exit code, fragments of the message)
        ([" --model", ts], 2, "unexpected argument"),
        (["--model", ts, "--input", image], 2, "--output: required"),
        (["--model", ts, "--input", image, "--output", out, "--colour"], 2, "unknown option '--colour'"),
        (["--model", ts, "--input", image, "--output", out, "--tile", "abc"], 2, "--tile: expected an integer"),
        (["--model", ts, "--input", tmp_path / "missing.png", "--output", out], 4,
         f"--input '{tmp_path / 'missing.png'}': no such file"),
        (["--model", ts, "--input", broken, "--output", out], 4, f"--input '{broken}': not a readable image"),
        (["--model", tmp_path / "missing.pt", "--input", image, "--output", out], 3,
         f"--model '{tmp_path / 'missing.pt'}': no such file"),
        (["--model", image, "--input", image, "--output", out], 3, f"--model '{image}': not a model"),
        (["--model", checkpoint, "--input", image, "--output", out], 3, "a training checkpoint", "tur export"),
        (["--model", ts, "--input", image, "--output", out, "--tile", "3"], 2,
         "--tile: 3 is smaller than the model's size multiple 4"),
        (["--model", ts, "--input", image, "--output", out, "--tile", "16", "--overlap", "16"], 2, "--overlap: "),
        (["--model", ts, "--input", image, "--output", out, "--overlap", "4"], 2, "--overlap: only meaningful"),
        (["--model", ts, "--input", image, "--output", not_a_folder / "out.png"], 5,
         f"--output '{not_a_folder / 'out.png'}': cannot create its folder"),
        (["--model", ts, "--input", image, "--output", tmp_path / "out.xyz"], 5, "unsupported image format '.xyz'"),
        (["--model", ts, "--input", image, "--output", out, "--half"], 2, "--half: fp16 inference needs --device cuda"),
        (["--model", ts, "--input", image, "--output", out, "--device", "tpu"], 2, "--device: expected cpu, cuda"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", ts, "--input", image, "--output", out, "--device", "cuda"], 2,
                      "--device: 'cuda' requested but CUDA is not available"))
    for args, code, *fragments in cases:
        _assert_error(run_runner(*args), code, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "file", "step_00000001.pt"]


def test_runner_refuses_aoti_from_another_torch_release(artifacts, inputs, tmp_path):
    other = tmp_path / "other.pt2"
    repackage_with_torch_version(artifacts.aoti.path, other, "2.12.1+cpu")
    proc = run_runner("--model", other, "--input", inputs["rgb8.png"], "--output", tmp_path / "out.png")
    _assert_error(proc, 3, f"--model '{other}'", "compiled by torch 2.12.1+cpu", "re-export")
    assert not (tmp_path / "out.png").exists()


def test_runner_refuses_fp16_for_models_that_declare_it_unsupported(inputs, tmp_path):
    model = tiny_model()
    model.supports_fp16 = False
    path = export_torchscript(model, tmp_path / "fp32_only.pt").path
    proc = run_runner("--model", path, "--input", inputs["rgb8.png"], "--output", tmp_path / "o.png", "--half")
    _assert_error(proc, 2, "--half: ", "does not support fp16")


def test_runner_help():
    proc = run_runner("--help")
    assert proc.returncode == 0 and "usage: tur-restore --model PATH --input IN --output OUT" in proc.stdout


def test_deploy_demo_restores_a_held_out_image_with_the_runner(tmp_path, monkeypatch):
    from tur_ext.deploy_cli import deploy_demo
    from tur_ext.train.checkpoint import model_spec, save_checkpoint

    model = tiny_model(seed=5)
    save_checkpoint(tmp_path / "step_00000001.pt", {"step": 1, "model": model_spec(model, True),
                                                     "params": model.state_dict(), "params_ema": model.state_dict(),
                                                     "tasks": ["denoise_25"], "config": {}})
    monkeypatch.setenv("TUR_RESTORE", str(RUNNER.resolve()))
    lines = []
    summary = deploy_demo(tmp_path / "step_00000001.pt", tmp_path / "deploy", formats=("torchscript",),
                          log=lines.append)
    ts = summary["torchscript"]
    assert summary["runner"] == str(RUNNER.resolve())
    assert ts["parity_max_abs"] <= 1e-4 and ts["runner_vs_python_max_levels"] <= 1
    assert (tmp_path / "deploy" / "coffee_restored_torchscript.png").is_file()
    assert any("tur-restore wrote" in line and "coffee_restored_torchscript.png" in line for line in lines)
