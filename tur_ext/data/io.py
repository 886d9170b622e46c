"""Image files in and out with OpenCV: float32 RGB HxWx3 in [0, 1] inside the package, whatever the file holds."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
import torch

from ..integrity import write_error

PathLike = Union[str, os.PathLike]

#: File extensions the folder datasets treat as images (lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """An image file that cannot be read; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: PathLike, reason: Optional[str] = None):
        if reason is None:
            # Rebuilt from its message alone: unpickling, or a DataLoader re-raising a worker's error (its message
            # wraps ours) - recover the path so callers can rely on the type and ``.path`` with any worker count.
            msg = str(path)
            # The last match: a worker's message is "Caught ImageReadError in DataLoader worker ..." + its
            # traceback, ending in our line; keep only that line, so that the error stays one line for the user.
            found = list(re.finditer(r"cannot read image '(.*?)': ([^\n]*)", msg))
            self.path = found[-1].group(1) if found else None
            self.reason = found[-1].group(2).strip() if found else msg
            super().__init__(f"cannot read image '{self.path}': {self.reason}" if found else msg)
            return
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image '{self.path}': {reason}")


def is_image_file(path: PathLike) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS`."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as float32 RGB, shape (H, W, 3), values in [0, 1].

    8- and 16-bit files are scaled by their full range, gray images are repeated to three channels and an alpha
    channel is dropped. Raises :class:`ImageReadError` (naming the path) for a missing, empty or undecodable file.
    """
    return to_float_rgb(read_file_pixels(path), path)


def read_file_pixels(path: PathLike) -> np.ndarray:
    """The decoded samples of an image file as OpenCV gives them: (H, W) or (H, W, C) in BGR(A) order, uint8,
    uint16 or float; checked as :func:`read_image` does. :func:`to_float_rgb` of any crop of it equals the same crop
    of ``read_image`` (what tiled restoration uses to convert one tile at a time)."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(path, "no such file")
    try:
        # Decoding from bytes (not cv2.imread) distinguishes "missing" from "undecodable" and accepts any path.
        buf = np.fromfile(str(p), dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(path, str(e)) from e
    if buf.size == 0:
        raise ImageReadError(path, "empty file")
    _check_pixel_limit(buf, path)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # e.g. OpenCV's own CV_IO_MAX_IMAGE_PIXELS check: name the file, keep it one line
        if e.code == cv2.Error.StsNoMem:  # a decompression bomb under the pixel limit, or just too little memory
            size = _header_size(buf)
            what = f" ({size[0]}x{size[1]} pixels)" if size else ""
            raise ImageReadError(path, f"not enough memory to decode it{what}") from None
        raise ImageReadError(path, " ".join(str(e).split())[-200:]) from None
    if img is None or img.size == 0:
        raise ImageReadError(path, "not a decodable image")
    return img


def max_image_pixels() -> int:
    """The largest width * height read: ``$TUR_MAX_IMAGE_PIXELS``, default 2**30 (OpenCV's CV_IO_MAX_IMAGE_PIXELS)."""
    value = os.environ.get("TUR_MAX_IMAGE_PIXELS", "")
    try:
        return int(value) if value.strip() else 1 << 30
    except ValueError:
        raise ValueError(f"TUR_MAX_IMAGE_PIXELS: expected a number of pixels, got {value!r}") from None


def _header_size(buf: np.ndarray) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG IHDR or a JPEG start-of-frame, without decoding; None for other formats."""
    head = buf[:24].tobytes()
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] == b"\xff\xd8":
        data, i = buf[: 1 << 20].tobytes(), 2  # the frame header comes before the image data
        while i + 9 <= len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn: precision, height, width
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            i += 2 + length
    return None


def _check_pixel_limit(buf: np.ndarray, path: PathLike) -> None:
    # From the header before decoding, so a decompression bomb is refused without allocating its pixels.
    size = _header_size(buf)
    if size is not None:
        w, h = size
        limit = max_image_pixels()
        if w * h > limit:
            raise ImageReadError(path, f"{w}x{h} pixels is over the limit of {limit} (set TUR_MAX_IMAGE_PIXELS to "
                                       f"raise it)")


#: Bytes read from the start of a file for a header check: room for a JPEG's EXIF/ICC segments before its frame.
_HEAD_BYTES = 256 * 1024


def header_problem(path: PathLike) -> tuple[Optional[str], Optional[tuple[int, int]]]:
    """A cheap check without decoding (for training splits of thousands of files): (reason the file is unusable or
    None, (width, height) when the header gives it). Reads the first 256 KiB and the last 12 bytes: a missing or
    empty file, a format OpenCV has no reader for, zero or too many pixels in a PNG/JPEG header, a PNG cut short
    (no IEND chunk at its end, as a crashed copy leaves it), a JPEG without a frame header."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(_HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 12))
            tail = f.read(12)
    except FileNotFoundError:
        return "no such file", None
    except OSError as e:
        return e.strerror or str(e), None
    if not head:
        return "empty file", None
    if not cv2.haveImageReader(str(p)):
        return "not an image format OpenCV reads (by its signature)", None
    dims = _header_size(np.frombuffer(head, dtype=np.uint8))
    if dims is not None:
        w, h = dims
        if w < 1 or h < 1:
            return f"its header says {w}x{h} pixels", dims
        if w * h > max_image_pixels():
            return f"{w}x{h} pixels is over the limit of {max_image_pixels()} (set TUR_MAX_IMAGE_PIXELS to raise it)", dims
    if head[:8] == b"\x89PNG\r\n\x1a\n" and tail[4:8] != b"IEND":
        return "truncated PNG (no IEND chunk at the end)", dims
    if head[:2] == b"\xff\xd8" and dims is None and size <= len(head):  # the whole file read: no frame in it
        return "truncated JPEG (no frame header)", None
    return None, dims


def to_float_rgb(img: np.ndarray, path: PathLike) -> np.ndarray:
    """Samples of :func:`read_file_pixels` -> float32 RGB (H, W, 3) in [0, 1] (``path`` only names errors)."""
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / np.float32(255.0)
    elif img.dtype == np.uint16:
        out = img.astype(np.float32) / np.float32(65535.0)
    elif img.dtype in (np.float32, np.float64):
        out = np.clip(img.astype(np.float32), 0.0, 1.0)
    else:
        raise ImageReadError(path, f"unsupported pixel type {img.dtype}")
    if out.ndim == 2:
        out = out[:, :, None]
    if out.ndim != 3:
        raise ImageReadError(path, f"unsupported image shape {img.shape}")
    c = out.shape[2]
    if c in (1, 2):  # gray (+ alpha)
        out = np.repeat(out[:, :, :1], 3, axis=2)
    elif c in (3, 4):  # OpenCV order is BGR(A)
        out = out[:, :, 2::-1]
    else:
        raise ImageReadError(path, f"unsupported channel count {c}")
    return np.ascontiguousarray(out)


def _to_file_pixels(img: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        if img.dim() != 3:
            raise ValueError(f"img: expected a (C, H, W) tensor, got shape {tuple(img.shape)}")
        img = img.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy()
    if not isinstance(img, np.ndarray):
        raise TypeError(f"img: expected a numpy array or torch tensor, got {type(img).__name__}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f"img: expected (H, W), (H, W, 3) or (H, W, 4), got shape {img.shape}")
    if img.dtype in (np.uint8, np.uint16):
        out = img
    elif np.issubdtype(img.dtype, np.floating):
        out = np.round(np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise TypeError(f"img: expected float in [0, 1], uint8 or uint16 pixels, got {img.dtype}")
    if out.ndim == 3:
        out = out[:, :, [2, 1, 0, 3][: out.shape[2]]]  # RGB(A) -> BGR(A)
    return np.ascontiguousarray(out)


def write_image(path: PathLike, img: Union[np.ndarray, torch.Tensor]) -> None:
    """Write an RGB image atomically (temp file in the same folder, then rename).

    ``img``: (H, W, 3) / (H, W) array (float in [0, 1] -> 8-bit; uint8 and uint16 written as they are), or a
    (3, H, W) float tensor. The format follows the extension of ``path``.
    """
    _check_image_path(path)
    write_file_pixels(path, _to_file_pixels(img))


def _check_image_path(path: PathLike) -> str:
    ext = Path(path).suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"path: expected an image extension {IMAGE_EXTENSIONS}, got {str(path)!r}")
    return ext


def write_file_pixels(path: PathLike, pixels: np.ndarray) -> None:
    """Write samples already in the file's order ((H, W) or (H, W, 3|4) BGR(A), uint8 or uint16) atomically."""
    p = Path(path)
    ext = _check_image_path(p)
    ok, encoded = cv2.imencode(ext, pixels)
    if not ok:
        raise ValueError(f"img: OpenCV cannot encode {pixels.dtype} {pixels.shape} as {ext} for {str(path)!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encoded.tobytes())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an image should be readable like any other output
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        named = write_error(exc, p)
        if named is not None:
            raise named from None
        raise
