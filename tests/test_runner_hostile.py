"""The C++ runner tur-restore against hostile files: damaged or altered model archives, an output that would
overwrite the input, a model that produces NaN or inf, and the bounded-memory tiled path (one band of tiles at a
time) against `tur restore --tile`.

Needs the runner binary (build/tur-restore or $TUR_RESTORE), like tests/test_runner.py: skipped when it is absent,
failed instead when TUR_REQUIRE_RUNNER=1.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from export_helpers import photo_crop, require_runner, runner_binary, session_artifacts
from tur_ext import deploy_cli

RUNNER = runner_binary()
MANIFEST = "tur_manifest.json"
COPY_AGAIN = "re-export or copy it again"
ALTERED = "the package was altered after export"


@pytest.fixture(autouse=True)
def _runner_present():
    require_runner()


def run_runner(*args, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUNNER), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _assert_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """A clean failure: the exit code, and one line on stderr containing every fragment (never a crash)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tur-restore: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- archives ------------------------------------------------------------------------------------------------------

def _root(names) -> str:
    first = names[0]
    return first.split("/", 1)[0] if "/" in first else ""


def _manifest_name(names) -> str:
    root = _root(names)
    return f"{root}/{MANIFEST}" if root else MANIFEST


def _with_manifest(src: Path, dst: Path) -> Path:
    """A copy of the package ``src`` carrying the exporter's manifest (added here if this export has none yet)."""
    shutil.copyfile(src, dst)
    with zipfile.ZipFile(dst) as zf:
        names = zf.namelist()
    if _manifest_name(names) not in names:
        with zipfile.ZipFile(dst, "a", zipfile.ZIP_STORED) as zf:
            entries = {i.filename: {"size": i.file_size, "crc32": i.CRC} for i in zf.infolist()}
            zf.writestr(_manifest_name(names),
                        json.dumps({"format": "tur_ext.manifest", "version": 1, "entries": entries}))
    return dst


def _rezip(src: Path, dst: Path, replace=None, drop=(), add=None, compression=zipfile.ZIP_STORED) -> Path:
    """Rebuild the archive (valid zip, valid CRCs) with entries replaced, dropped or added; the manifest, if any, is
    copied unchanged: what a package altered after export and zipped again looks like."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            zout.writestr(info.filename, replace.get(info.filename, zin.read(info)), compress_type=compression)
        for name, data in add.items():
            zout.writestr(name, data)
    return dst


def _library(path: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as zf:
        libraries = [i for i in zf.infolist() if i.filename.endswith(".so")]
    assert libraries, "an AOTInductor package holds its model as a shared library"
    return max(libraries, key=lambda i: i.file_size)


def _largest(path: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as zf:
        return max(zf.infolist(), key=lambda i: i.file_size)


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    assert head[:4] == b"PK\x03\x04"
    return info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")


def _overwrite(src: Path, dst: Path, offset: int, count: int = 4096) -> Path:
    """A copy of ``src`` with ``count`` bytes at ``offset`` replaced by other (random) bytes; same length."""
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(offset)
    noise = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
    noise = bytes(b ^ 0xFF if b == old else b for b, old in zip(noise, data[offset:offset + count]))  # all differ
    data[offset:offset + count] = noise
    dst.write_bytes(bytes(data))
    return dst


def _truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return session_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def models(artifacts, tmp_path_factory):
    """The session's TorchScript export and its AOTInductor package with a manifest."""
    folder = tmp_path_factory.mktemp("hostile_models")
    return {"pt": artifacts.torchscript.path, "pt2": _with_manifest(artifacts.aoti.path, folder / "tiny.pt2")}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile_image") / "photo.png"
    assert cv2.imwrite(str(path), np.ascontiguousarray(photo_crop(45, 61)[:, :, ::-1]))
    return path


def _refused(model: Path, image: Path, tmp_path: Path, code: int, *fragments: str) -> str:
    out = tmp_path / "out.png"
    line = _assert_error(run_runner("--model", model, "--input", image, "--output", out), code,
                         f"--model '{model}'", *fragments)
    assert not out.exists()
    return line


def test_intact_models_still_restore(models, image, tmp_path):
    for kind, model in models.items():
        proc = run_runner("--model", model, "--input", image, "--output", tmp_path / f"{kind}.png")
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("kind", ["pt", "pt2"])
def test_flipped_bytes_in_an_entry_fail_its_crc(models, image, tmp_path, kind):
    """4 KiB of other bytes in the middle of the largest record (the weights, or the package's library): torch would
    load it and write a black image (or crash); the runner names the file and the entry."""
    src = models[kind]
    entry = _largest(src)
    offset = _data_offset(src, entry) + entry.file_size // 2 - 2048
    bad = _overwrite(src, tmp_path / f"flipped.{kind}", offset)
    _refused(bad, image, tmp_path, 3, f"is corrupt (entry '{entry.filename}' fails its CRC-32 check); {COPY_AGAIN}")


@pytest.mark.parametrize("kind", ["pt", "pt2"])
def test_flipped_bytes_in_the_middle_of_the_file(models, image, tmp_path, kind):
    src = models[kind]
    bad = _overwrite(src, tmp_path / f"middle.{kind}", src.stat().st_size // 2 - 2048)
    _refused(bad, image, tmp_path, 3, "is corrupt (", COPY_AGAIN)


@pytest.mark.parametrize("keep", [0.5, 0.999])
@pytest.mark.parametrize("kind", ["pt", "pt2"])
def test_truncated_model_files(models, image, tmp_path, kind, keep):
    bad = _truncated(models[kind], tmp_path / f"cut.{kind}", keep)
    _refused(bad, image, tmp_path, 3, "is truncated", COPY_AGAIN)


def test_damaged_central_directory(models, image, tmp_path):
    src = models["pt"]
    with open(src, "rb") as f:
        data = f.read()
    cd = data.rfind(b"PK\x01\x02")  # the last central directory record
    bad = tmp_path / "cd.pt"
    bad.write_bytes(data[:cd] + b"XX" + data[cd + 2:])
    _refused(bad, image, tmp_path, 3, "is corrupt (", COPY_AGAIN)


def test_library_truncated_and_rezipped_is_refused_by_the_manifest(models, image, tmp_path):
    """A valid zip with valid CRCs whose library was cut to half: loading it gave a Bus error."""
    src = models["pt2"]
    lib = _library(src)
    with zipfile.ZipFile(src) as zf:
        data = zf.read(lib)
    bad = _rezip(src, tmp_path / "half.pt2", replace={lib.filename: data[:len(data) // 2]})
    _refused(bad, image, tmp_path, 3,
             f": entry '{lib.filename}' is {len(data) // 2} bytes, the export wrote {len(data)}: {ALTERED}")


def test_library_swapped_for_one_of_the_same_size(models, image, tmp_path):
    src = models["pt2"]
    lib = _library(src)
    with zipfile.ZipFile(src) as zf:
        data = zf.read(lib)
    other = data[::-1]
    bad = _rezip(src, tmp_path / "swapped.pt2", replace={lib.filename: other})
    _refused(bad, image, tmp_path, 3, f": entry '{lib.filename}' has CRC-32 0x{zlib.crc32(other):08x}, "
                                      f"the export wrote 0x{zlib.crc32(data):08x}", ALTERED)


def test_manifest_entries_missing_or_unlisted(models, image, tmp_path):
    src = models["pt2"]
    with zipfile.ZipFile(src) as zf:
        names = zf.namelist()
    root = _root(names)
    dropped = next(n for n in names if n.endswith("archive_version"))
    bad = _rezip(src, tmp_path / "dropped.pt2", drop={dropped})
    _refused(bad, image, tmp_path, 3, f": it lacks entry '{dropped}', which the export wrote: {ALTERED}")
    extra = f"{root}/data/aotinductor/model/extra.so"
    bad = _rezip(src, tmp_path / "extra.pt2", add={extra: b"\x7fELF" + bytes(100)})
    _refused(bad, image, tmp_path, 3, f": library '{extra}' is not in the export's manifest: {ALTERED}")
    bad = _rezip(src, tmp_path / "garbled.pt2", replace={_manifest_name(names): b"{not json"})
    _refused(bad, image, tmp_path, 3, f"its {MANIFEST} is unreadable")


def test_packages_without_a_manifest_and_deflated_archives_load(models, image, tmp_path):
    """Older exports have no manifest (only the CRCs are checked), and an archive re-zipped with deflate (which torch
    loads) is inflated to check its CRCs: both restore exactly like the original."""
    ref = tmp_path / "ref.png"
    assert run_runner("--model", models["pt"], "--input", image, "--output", ref).returncode == 0
    with zipfile.ZipFile(models["pt2"]) as zf:
        manifest = _manifest_name(zf.namelist())
    candidates = {
        "old.pt2": _rezip(models["pt2"], tmp_path / "old.pt2", drop={manifest}),
        "deflated.pt": _rezip(models["pt"], tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED),
        "deflated.pt2": _rezip(models["pt2"], tmp_path / "deflated.pt2", compression=zipfile.ZIP_DEFLATED),
    }
    for name, model in candidates.items():
        out = tmp_path / f"{name}.png"
        proc = run_runner("--model", model, "--input", image, "--output", out)
        assert proc.returncode == 0, (name, proc.stderr)
        if name.endswith(".pt"):
            assert out.read_bytes() == ref.read_bytes(), name
    # A deflated archive with damaged compressed data is refused too.
    deflated = candidates["deflated.pt"]
    entry = _largest(deflated)
    offset = _data_offset(deflated, entry) + entry.compress_size // 2
    bad = _overwrite(deflated, tmp_path / "bad_deflated.pt", offset, count=min(512, entry.compress_size // 4))
    _refused(bad, image, tmp_path, 3, f"is corrupt (entry '{entry.filename}'", COPY_AGAIN)


# --- the output must not replace the input -------------------------------------------------------------------------

def test_output_that_is_the_input_is_refused_before_loading(models, image, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    src = folder / "photo.png"
    shutil.copyfile(image, src)
    before = src.read_bytes()
    (folder / "link.png").symlink_to(src)
    os.link(src, folder / "hard.png")
    missing_model = tmp_path / "missing.pt"  # exit 2 before the model is even looked at
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        for out in ["photo.png", "./photo.png", str(src), str(folder / ".." / "in" / "photo.png"), "link.png",
                    "hard.png"]:
            for model in (models["pt"], missing_model):
                proc = run_runner("--model", model, "--input", "photo.png", "--output", out)
                _assert_error(proc, 2, f"--output: '{out}' is the input file; choose another path")
    finally:
        os.chdir(cwd)
    assert src.read_bytes() == before
    proc = run_runner("--model", models["pt"], "--input", src, "--output", folder / "other.png")
    assert proc.returncode == 0, proc.stderr


# --- non-finite output ---------------------------------------------------------------------------------------------

def _poisoned(ts: Path, dst: Path, value: float) -> Path:
    """The TorchScript export with its output bias set to ``value``: a valid file whose model produces NaN or inf."""
    extra = {"tur_meta.json": ""}
    module = torch.jit.load(str(ts), _extra_files=extra)
    biases = [p for n, p in module.named_parameters() if n.endswith("ending.bias")]
    assert len(biases) == 1
    with torch.no_grad():
        biases[0].fill_(value)
    torch.jit.save(module, str(dst), _extra_files=extra)
    return dst


@pytest.mark.parametrize("tiling", [None, ("24", "8")], ids=["whole", "tiled"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_output_is_an_error_and_nothing_is_written(models, image, tmp_path, value, tiling):
    model = _poisoned(models["pt"], tmp_path / "poisoned.pt", value)
    out = tmp_path / "out.png"
    args = ["--model", model, "--input", image, "--output", out]
    if tiling:
        args += ["--tile", tiling[0], "--overlap", tiling[1]]
    _assert_error(run_runner(*args), 1, f"model '{model}' produced non-finite values on '{image}'; nothing written")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poisoned.pt"]  # no temporary file left either


# --- bounded-memory tiling: the same bytes as `tur restore --tile` -------------------------------------------------

def _inputs(folder: Path, h: int, w: int, sixteen: bool) -> Path:
    rgb = photo_crop(h, w)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if sixteen:
        rng = np.random.default_rng(h * w)
        bgr = bgr.astype(np.uint16) * 257 + rng.integers(0, 257, bgr.shape).astype(np.uint16)
    path = folder / f"img_{h}x{w}_{16 if sixteen else 8}.png"
    assert cv2.imwrite(str(path), bgr)
    return path


def _python_tiled(model: Path, image: Path, out_dir: Path, tile: int, overlap: int) -> np.ndarray:
    argv = ["restore", "--model", str(model), str(image), "--out", str(out_dir), "--tile", str(tile),
            "--overlap", str(overlap)]
    assert deploy_cli.main(argv) == 0
    return cv2.imread(str(out_dir / image.name), cv2.IMREAD_UNCHANGED)


CASES = [
    # (height, width, tile, overlap): non-square, sides that are no multiple of the tile (or of the size multiple 4),
    # no overlap, overlaps that do not divide the stride, a tile that rounds down (22 -> 20), one band, one tile.
    (45, 61, 16, 0),
    (61, 45, 24, 8),
    (37, 70, 22, 5),
    (50, 33, 12, 7),
    (19, 70, 20, 4),
    (30, 27, 64, 8),
]


@pytest.mark.parametrize("sixteen", [False, True], ids=["8bit", "16bit"])
@pytest.mark.parametrize("h,w,tile,overlap", CASES)
def test_band_tiling_matches_tur_restore_exactly(models, tmp_path, h, w, tile, overlap, sixteen):
    image = _inputs(tmp_path, h, w, sixteen)
    expected = _python_tiled(models["pt"], image, tmp_path / "py", tile, overlap)
    out = tmp_path / "runner.png"
    proc = run_runner("--model", models["pt"], "--input", image, "--output", out, "--tile", tile,
                      "--overlap", overlap)
    assert proc.returncode == 0, proc.stderr
    got = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert got.dtype == (np.uint16 if sixteen else np.uint8) and got.shape == (h, w, 3)
    assert expected.dtype == got.dtype and expected.shape == got.shape
    diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    assert diff.max() == 0, f"max diff {diff.max()}, {np.mean(diff > 0):.2%} of samples differ"


def test_band_tiling_matches_tur_restore_for_an_aoti_package(models, tmp_path):
    image = _inputs(tmp_path, 41, 58, False)
    expected = _python_tiled(models["pt2"], image, tmp_path / "py", 16, 4)
    out = tmp_path / "runner.png"
    proc = run_runner("--model", models["pt2"], "--input", image, "--output", out, "--tile", 16, "--overlap", 4)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), expected)
