"""Hostile files: bit-rotted artifacts and checkpoints are refused with a message naming the file."""
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
    with pytest.raises(ValueError, match=r"step_00000002\.pt"):
        load_checkpoint(path)


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
    first = mgr.save(1, {"params": {"w": torch.randn(256)}})
    newest = mgr.save(2, {"params": {"w": torch.randn(256)}})
    newest.write_bytes(newest.read_bytes()[:100])  # truncated by a crash or a full disk
    dead = tmp_path / ".step_00000003.pt.tmp.999999999"
    dead.write_bytes(b"partial")
    assert mgr.remove_stale_temps() == [dead] and not dead.exists()
    said = []
    assert mgr.latest_loadable(log=said.append) == first
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
