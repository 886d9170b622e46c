"""Image I/O: real files written and read with OpenCV, 8/16-bit, gray, alpha, errors naming the path, atomic writes."""
import os

import cv2
import numpy as np
import pytest
import torch

from tur_ext.data.io import ImageReadError, read_image, write_image


def _rgb(h=20, w=24, seed=0):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def test_png_roundtrip_is_8bit_quantisation_and_rgb(tmp_path):
    img = _rgb()
    p = tmp_path / "a.png"
    write_image(p, img)
    back = read_image(p)
    assert back.dtype == np.float32 and back.shape == img.shape
    np.testing.assert_array_equal(back, np.round(img * 255).astype(np.uint8) / np.float32(255))
    # OpenCV itself sees BGR on disk: channel 0 of the file is our blue channel.
    raw = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(raw[:, :, 0], np.round(img[:, :, 2] * 255).astype(np.uint8))


def test_reads_16bit_gray_and_alpha(tmp_path):
    rng = np.random.default_rng(1)
    bgr16 = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), bgr16)
    got = read_image(tmp_path / "d.png")
    np.testing.assert_allclose(got, bgr16[:, :, ::-1].astype(np.float64) / 65535, atol=1e-6)

    gray = rng.integers(0, 256, (7, 5), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    got = read_image(tmp_path / "g.png")
    assert got.shape == (7, 5, 3)
    for c in range(3):
        np.testing.assert_allclose(got[:, :, c], gray / 255.0, atol=1e-7)

    bgra = rng.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    got = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(got, bgra[:, :, 2::-1] / 255.0, atol=1e-7)


def test_jpeg_and_uint16_write(tmp_path):
    write_image(tmp_path / "x.jpg", _rgb(32, 32))
    assert read_image(tmp_path / "x.jpg").shape == (32, 32, 3)
    u16 = np.random.default_rng(2).integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    write_image(tmp_path / "y.png", u16)
    np.testing.assert_allclose(read_image(tmp_path / "y.png"), u16 / 65535.0, atol=1e-6)


def test_write_tensor_chw(tmp_path):
    t = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(0))
    write_image(tmp_path / "t.png", t)
    np.testing.assert_allclose(read_image(tmp_path / "t.png"), t.permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("content", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_file_error_names_path(tmp_path, content):
    p = tmp_path / "broken.png"
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken.png") as ei:
        read_image(p)
    assert ei.value.path == str(p)
    assert isinstance(ei.value, ValueError)


def test_read_error_survives_pickling(tmp_path):
    import pickle

    err = ImageReadError(tmp_path / "x.png", "not a decodable image")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ImageReadError) and back.path == err.path and str(back) == str(err)


def test_missing_file_error_names_path(tmp_path):
    with pytest.raises(ImageReadError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


def test_write_is_atomic_and_leaves_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "out.png"
    write_image(p, _rgb(seed=3))
    before = p.read_bytes()

    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write_image(p, _rgb(seed=4))
    monkeypatch.undo()
    assert p.read_bytes() == before  # the previous file is intact
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # and the temp file was removed
    write_image(p, _rgb(seed=4))
    assert p.read_bytes() != before


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="path"):
        write_image(tmp_path / "a.txt", _rgb())
    with pytest.raises(ValueError, match="img"):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 5), np.float32))
    with pytest.raises(TypeError, match="img"):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.int64))
    assert not (tmp_path / "a.png").exists()
