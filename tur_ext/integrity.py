"""Integrity checks for zip-based artifacts (TorchScript ``.pt``, AOTInductor ``.pt2``, training checkpoints).

Every entry of these zip archives carries a CRC32; verifying them before loading turns a bit-rotted or truncated file
(which torch would otherwise load and run, writing an all-black image) into a one-line error naming the file.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Union

PathLike = Union[str, os.PathLike]


class CorruptFileError(ValueError):
    """A file whose contents fail an integrity check; the message names the file and the damaged entry."""


def verify_zip(path: PathLike, what: str = "file") -> None:
    """Raise :class:`CorruptFileError` unless ``path`` is a zip whose every entry matches its stored size and CRC32."""
    p = os.fspath(path)
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                crc, size = 0, 0
                try:
                    with zf.open(info) as f:
                        while True:
                            chunk = f.read(1 << 20)
                            if not chunk:
                                break
                            crc = zlib.crc32(chunk, crc)
                            size += len(chunk)
                except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                    raise CorruptFileError(f"{what}: {p!r} is corrupt (entry {info.filename!r}: {exc})") from None
                if size != info.file_size or (crc & 0xFFFFFFFF) != info.CRC:
                    raise CorruptFileError(f"{what}: {p!r} is corrupt (entry {info.filename!r} fails its CRC32 "
                                           f"check); re-export or copy it again")
    except CorruptFileError:
        raise
    except zipfile.BadZipFile as exc:  # includes zipfile's own CRC error on read
        raise CorruptFileError(f"{what}: {p!r} is corrupt or truncated ({exc})") from None
    except (EOFError, zlib.error) as exc:
        raise CorruptFileError(f"{what}: {p!r} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
