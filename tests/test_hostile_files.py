"""Hostile files: bit-rotted artifacts and checkpoints are refused with a message naming the file."""
import os
import zipfile

import pytest
import torch

from tur_ext.integrity import CorruptFileError, verify_zip
from tur_ext.train.checkpoint import load_checkpoint, save_checkpoint


def _flip_inside_largest_entry(path):
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # the entry's data starts after its local header (30 bytes + name + extra); damage its middle
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    pos = start + info.compress_size // 2
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    return info.filename


def test_bitflipped_torchscript_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 3)), str(path))
    verify_zip(path, "model")  # intact: passes
    entry = _flip_inside_largest_entry(path)
    with pytest.raises(CorruptFileError, match=r"model: '.*m\.pt' is corrupt") as info:
        verify_zip(path, "model")
    assert entry in str(info.value) and "\n" not in str(info.value)


def test_bitflipped_checkpoint_is_refused(tmp_path):
    path = tmp_path / "step_00000001.pt"
    save_checkpoint(path, {"step": 1, "params": {"w": torch.randn(4096)}})
    assert load_checkpoint(path)["step"] == 1
    _flip_inside_largest_entry(path)
    with pytest.raises(ValueError, match=r"checkpoint: '.*step_00000001\.pt' is corrupt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "step_00000002.pt"
    save_checkpoint(path, {"step": 2, "params": {"w": torch.randn(4096)}})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"step_00000002\.pt' is truncated .*copy it again"):
        load_checkpoint(path)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_export_is_named_truncated(tmp_path, cut):
    from export_helpers import tiny_model

    from tur_ext.export import artifact_kind, export_torchscript

    art = export_torchscript(tiny_model(), tmp_path / "tiny.pt", tasks=["denoise_25"]).path
    data = art.read_bytes()
    art.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"model: '.*tiny\.pt' is truncated"):
        artifact_kind(art)
    art.write_bytes(b"not a zip at all")  # a foreign file is still "not a tur_ext model"
    with pytest.raises(ValueError, match="is not a tur_ext model"):
        artifact_kind(art)


def test_tur_restore_refuses_bitflipped_export(tmp_path, capsys):
    from export_helpers import photo_crop, tiny_model

    from tur_ext.cli import main
    from tur_ext.data.io import write_image
    from tur_ext.export import export_torchscript

    art = export_torchscript(tiny_model(), tmp_path / "tiny.pt", tasks=["denoise_25"]).path
    _flip_inside_largest_entry(art)
    img = tmp_path / "in.png"
    write_image(img, photo_crop(32, 40))
    rc = main(["restore", "--model", str(art), str(img), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "tiny.pt" in err and "corrupt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "in.png").exists()


def _huge_png_header(path, w, h):
    import struct
    import zlib as z

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", z.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", z.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_huge_png_header_is_an_image_read_error(tmp_path, monkeypatch):
    from tur_ext.data.io import ImageReadError, read_image

    path = tmp_path / "bomb.png"
    _huge_png_header(path, 100000, 100000)
    with pytest.raises(ImageReadError, match=r"bomb\.png.*100000x100000 pixels is over the limit"):
        read_image(path)
    monkeypatch.setenv("TUR_MAX_IMAGE_PIXELS", "100")
    _huge_png_header(path, 20, 20)
    with pytest.raises(ImageReadError, match="over the limit of 100"):
        read_image(path)


def test_stale_temps_removed_and_resume_falls_back(tmp_path):
    from tur_ext.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(tmp_path, keep_last=0)
    weights = torch.randn(256)
    first = mgr.save(1, {"params": {"w": weights}})
    newest = mgr.save(2, {"params": {"w": torch.randn(256)}})
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash or a full disk
    dead = tmp_path / ".step_00000003.pt.tmp.999999999"
    dead.write_bytes(b"partial")
    assert mgr.remove_stale_temps() == [dead] and not dead.exists()
    said = []
    path, ckpt = mgr.latest_loadable(log=said.append)
    assert path == first and ckpt["step"] == 1 and torch.equal(ckpt["params"]["w"], weights)
    assert len(said) == 1 and "step_00000002.pt" in said[0]


# ------------------------------------------------------------------------------------- bounded-memory tiled restore

@pytest.fixture(scope="module")
def tiny_restorer(tmp_path_factory):
    from export_helpers import session_artifacts

    from tur_ext.inference import load_restorer

    return load_restorer(session_artifacts(tmp_path_factory).torchscript.path)


@pytest.mark.parametrize("shape, dtype", [((37, 53, 3), "uint8"), ((64, 40, 3), "uint16"), ((23, 70), "uint8"),
                                          ((50, 45, 4), "uint8"), ((9, 9, 3), "uint8")])
@pytest.mark.parametrize("tile, overlap", [(16, 4), (24, 0), (8, 3), (64, None)])
def test_band_tiling_from_file_samples_equals_the_float_path(tiny_restorer, shape, dtype, tile, overlap):
    """restore_file_pixels (tiles gathered from the uint samples through the padding's index maps, blended one row of
    tiles at a time) gives the bits of the float path: whole float image, padded, tiled, blended, quantised."""
    import numpy as np

    from tur_ext.data.io import to_float_rgb
    from tur_ext.inference import to_file_pixels

    top = 255 if dtype == "uint8" else 65535
    raw = (np.random.default_rng(sum(shape)).random(shape) * top).astype(dtype)
    depth = 8 if dtype == "uint8" else 16
    expected = to_file_pixels(tiny_restorer.restore_image(to_float_rgb(raw, "x"), tile=tile, overlap=overlap),
                              depth)[:, :, ::-1]
    got = tiny_restorer.restore_file_pixels(raw, depth, tile=tile, overlap=overlap)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


# ----------------------------------------------------------------------------------- AOTI packages altered later

def _rezip(src, dst, change):
    """Copy the zip ``src`` to ``dst`` with ``change(name, data) -> data`` applied (fresh, valid CRCs)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))


def test_aoti_package_with_truncated_or_swapped_library_is_refused(tmp_path_factory, tmp_path):
    """The zip's CRCs cannot see a library truncated (or replaced) and re-zipped; the manifest the export adds can.
    Without it torch maps the truncated library and dies of a bus error."""
    from export_helpers import session_artifacts

    from tur_ext.export import load_exported

    package = session_artifacts(tmp_path_factory).aoti.path
    with zipfile.ZipFile(package) as zf:
        names = zf.namelist()
    assert any(n.endswith("/tur_manifest.json") for n in names)
    verify_zip(package, "model")  # the export as written passes
    library = next(n for n in names if n.endswith(".so"))
    cases = {
        "truncated": lambda n, d: d[:len(d) // 2] if n == library else d,
        "swapped": lambda n, d: bytes(reversed(d)) if n == library else d,
    }
    for case, change in cases.items():
        bad = tmp_path / f"{case}.pt2"
        _rezip(package, bad, change)
        with pytest.raises(CorruptFileError, match=r"model: .*%s.*the package was altered after export"
                           % case):
            load_exported(bad)
    extra = tmp_path / "extra.pt2"
    _rezip(package, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as zf:
        zf.writestr(library.rsplit("/", 1)[0] + "/other.so", b"\x7fELF")
    with pytest.raises(CorruptFileError, match="holds library .*other.so.* that the export did not write"):
        load_exported(extra)


# ------------------------------------------------------------------------------- full and read-only file systems

@pytest.fixture
def small_mounts(tmp_path):
    """A 256 KiB tmpfs (``full``) and a read-only tmpfs (``ro``) under tmp_path; skips where mounting is not
    allowed (not root, or no mount namespace)."""
    import subprocess

    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), ro.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)], capture_output=True)
    if ok.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({ok.stderr.decode().strip()[:80]})")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)], check=True)
    yield full, ro
    for m in (full, ro):
        subprocess.run(["umount", str(m)], capture_output=True)


def test_full_and_read_only_disks_are_one_line_errors(small_mounts, tmp_path_factory, tmp_path, capsys):
    import errno

    import numpy as np

    from export_helpers import session_artifacts

    from tur_ext.cli import main
    from tur_ext.data.io import write_image
    from tur_ext.train.checkpoint import atomic_torch_save

    full, ro = small_mounts
    model = session_artifacts(tmp_path_factory).torchscript.path
    # A checkpoint that does not fit: torch's zip writer fails mid-write; nothing is left behind.
    with pytest.raises(OSError) as info:
        atomic_torch_save({"w": torch.randn(256, 1024)}, full / "ck.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(full / "ck.pt")
    assert list(full.iterdir()) == []
    # An image that does not fit.
    with pytest.raises(OSError) as info:
        write_image(full / "big.png", np.random.default_rng(0).random((300, 400, 3)).astype(np.float32))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(full / "big.png")
    assert list(full.iterdir()) == []
    src = tmp_path / "photo.png"
    write_image(src, np.random.default_rng(1).random((300, 400, 3)).astype(np.float32))
    capsys.readouterr()
    cases = [(["restore", "--model", str(model), str(src), "--out", str(ro / "out")], "is on a read-only file system"),
             (["restore", "--model", str(model), str(src), "--out", str(full)], "no space left on")]
    for argv, message in cases:
        assert main(argv) == 3, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and str(ro if "read-only" in message else full) in err, err


def test_bad_cli_numbers_and_sections_name_themselves(tmp_path, capsys):
    from tur_ext.cli import main
    from tur_ext.train.config import ConfigError, apply_overrides

    with pytest.raises(ConfigError, match=r"--set train=5: 'train' is a section, not a value; set one of its keys"):
        apply_overrides({"train": {"steps": 10}}, ["train=5", "train.steps=3"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: nafnet-tiny}\ndata: {type: embedded, length: 10}\ntrain: {steps: 2}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--max-steps", "-3"]) == 1
    assert "max_steps (--max-steps): expected a positive number of steps, got -3" in capsys.readouterr().err


def test_trainer_seeds_every_rng_it_stores(tmp_path):
    import random

    import numpy as np

    from tur_ext.train import Trainer, load_config

    draws = []
    for _ in range(2):
        np.random.seed(None), random.seed(None)  # whatever the process did before
        cfg = load_config(raw={"seed": 7, "model": {"name": "nafnet-tiny"}, "data": {"type": "embedded", "length": 10},
                               "output_dir": str(tmp_path / "run"), "train": {"steps": 1}})
        with Trainer(cfg):
            draws.append((np.random.random(), random.random()))
    assert draws[0] == draws[1]


def test_resume_auto_skips_a_truncated_newest_checkpoint_and_never_repeats_validation_rows(tmp_path, capsys):
    import csv

    from test_trainer import tiny

    from tur_ext.train import Trainer

    def run(*overrides):
        with Trainer(tiny(tmp_path / "run", "train.validate=true", "train.val_every=3", "train.resume=auto",
                          *overrides)) as tr:
            tr.train()
        return tr

    first = run()
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts][-2:] == ["step_00000003.pt", "step_00000006.pt"]
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:1000])  # the newest, truncated
    (tmp_path / "run" / "checkpoints" / ".step_00000009.pt.tmp.999999999").write_bytes(b"partial")
    capsys.readouterr()
    again = run()
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step_00000006.pt" in out and "removed .step_00000009" in out
    assert again.step == 6 and not list((tmp_path / "run" / "checkpoints").glob(".step_*"))
    run()  # a finished run re-run: its last validation is replaced, not appended again
    with open(tmp_path / "run" / "val.csv", newline="") as f:
        rows = [(r["step"], r["task"]) for r in csv.DictReader(f)]
    assert len(rows) == len(set(rows)) and {s for s, _ in rows} == {"3", "6"}
    assert first.step == 6


def test_bad_eval_images_are_named_before_training_or_skipped(tmp_path):
    """A 1x1 image and a corrupt file in an eval split: refused when the dataset is built (before any step), naming
    the file and the option that skips them; with skip_bad_images they are dropped and counted."""
    import numpy as np

    from tur_ext.data.datasets import PairedEvalDataset
    from tur_ext.data.io import ImageReadError, write_image
    from tur_ext.tasks import TaskSet

    rng = np.random.default_rng(0)
    pairs = []
    for i, (h, w) in enumerate([(40, 48), (1, 1), (32, 32)]):
        lq, gt = tmp_path / f"lq{i}.png", tmp_path / f"gt{i}.png"
        write_image(lq, rng.random((h, w, 3)).astype(np.float32))
        write_image(gt, rng.random((h, w, 3)).astype(np.float32))
        pairs.append((lq, gt))
    (tmp_path / "gt2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    tasks = TaskSet("3task")
    # Header problems are found first (no decode), so the corrupt file is the one named; the 1x1 pair is counted.
    with pytest.raises(ImageReadError, match=r"gt2\.png': truncated PNG \(no IEND chunk at the end\) "
                                             r"\(and 2 more\); checked before training: set data\.skip_bad_images"):
        PairedEvalDataset(pairs, "derain", tasks)
    del pairs[2]
    with pytest.raises(ImageReadError, match=r"lq1\.png': 1x1 is smaller than 16 pixels \(data\.size_multiple=16\) "
                                             r"\(and 1 more\); checked before training: set data\.skip_bad_images"):
        PairedEvalDataset(pairs, "derain", tasks)
    pairs.append((tmp_path / "lq2.png", tmp_path / "gt2.png"))
    ds = PairedEvalDataset(pairs, "derain", tasks, skip_bad_images=True)
    assert len(ds) == 1 and ds.num_bad_images == 3 and ds[0]["gt"].shape[-2:] == (32, 48)


def test_jpeg_header_claiming_a_huge_frame_is_refused_before_decoding(tmp_path):
    import cv2
    import numpy as np

    from tur_ext.data.io import ImageReadError, read_image

    ok, enc = cv2.imencode(".jpg", (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8))
    data = bytearray(enc.tobytes())
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] == 0xC0)
    data[sof + 5:sof + 7] = (60000).to_bytes(2, "big")
    data[sof + 7:sof + 9] = (50000).to_bytes(2, "big")
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"bomb\.jpg': 50000x60000 pixels is over the limit of 1073741824"):
        read_image(tmp_path / "bomb.jpg")


def test_restore_keeps_alpha_and_keep_going_reports_bad_images(tmp_path_factory, tmp_path, capsys):
    import cv2
    import numpy as np

    from export_helpers import session_artifacts

    from tur_ext import deploy_cli
    from tur_ext.data.io import read_image

    model = session_artifacts(tmp_path_factory).torchscript.path
    rng = np.random.default_rng(2)
    rgba = (rng.random((24, 32, 4)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    cv2.imwrite(str(tmp_path / "b.jpg"), rgba[:, :, :3])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for tile in ([], ["--tile", "16"]):
        out = tmp_path / f"out{len(tile)}"
        argv = ["restore", "--model", str(model), str(tmp_path / "a.png"), str(tmp_path / "bad.png"),
                str(tmp_path / "b.jpg"), "--out", str(out), *tile]
        assert deploy_cli.main(argv) == 1  # without --keep-going the bad file stops it
        capsys.readouterr()
        assert deploy_cli.main([*argv, "--keep-going"]) == 1
        captured = capsys.readouterr()
        assert f"[tur] skipped {tmp_path / 'bad.png'}: not a decodable image" in captured.out
        assert "images: 1 of 3 could not be read and were skipped" in captured.err
        kept = cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED)
        assert kept.shape == (24, 32, 4) and np.array_equal(kept[:, :, 3], rgba[:, :, 3])
        assert np.array_equal(cv2.imread(str(out / "a.png"))[:, :, ::-1],
                              (read_image(out / "a.png") * 255).round().astype(np.uint8))
        assert (out / "b.jpg").is_file()


def test_decompression_bomb_under_a_memory_limit_is_one_line(tmp_path):
    """A 16000 x 16000 PNG of 1.4 MB (under the pixel limit; 768 MB decoded, 3 GB as float) run by both tools
    with 2.5 GB of address space: 'not enough memory' naming the file, never a crash or an allocator's message."""
    import resource
    import subprocess
    import sys

    import cv2
    import numpy as np

    from export_helpers import REPO_ROOT, require_runner, tiny_model

    from tur_ext.export import export_torchscript

    bomb = tmp_path / "bomb.png"
    assert cv2.imwrite(str(bomb), np.zeros((16000, 16000, 3), np.uint8))
    assert bomb.stat().st_size < 4 << 20
    model = export_torchscript(tiny_model(), tmp_path / "tiny.pt", tasks=["denoise_25"]).path

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (2500 << 20, 2500 << 20))

    commands = {"tur restore": [sys.executable, "-m", "tur_ext", "restore", "--model", str(model), str(bomb),
                                "--out", str(tmp_path / "out")],
                "runner": [str(require_runner()), "--model", str(model), "--input", str(bomb),
                           "--output", str(tmp_path / "out.png")]}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, cmd in commands.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limited, env=env, cwd=REPO_ROOT,
                              timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode in (1, 4) and len(lines) == 1, (name, proc.returncode, proc.stderr[-2000:])
        assert "bomb.png" in lines[0] and "not enough memory" in lines[0], (name, lines[0])
    assert not (tmp_path / "out" / "bomb.png").exists() and not (tmp_path / "out.png").exists()
