"""Integrity checks for zip-based artifacts (TorchScript ``.pt``, AOTInductor ``.pt2``, training checkpoints).

Every entry of these zip archives carries a CRC32; verifying them before loading turns a bit-rotted or truncated file
(which torch would otherwise load and run, writing an all-black image) into a one-line error naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import zipfile
import zlib
from typing import Union

PathLike = Union[str, os.PathLike]


#: The entry (under the archive's top folder) that lists the size and CRC32 of every other entry as exported.
MANIFEST_NAME = "tur_manifest.json"
MANIFEST_FORMAT = "tur_ext.manifest"


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
            _check_manifest(zf, p, what)
    except CorruptFileError:
        raise
    except zipfile.BadZipFile as exc:  # includes zipfile's own CRC error on read
        raise CorruptFileError(f"{what}: {p!r} is corrupt or truncated ({exc})") from None
    except (EOFError, zlib.error) as exc:
        raise CorruptFileError(f"{what}: {p!r} is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def is_truncated_zip(path: PathLike) -> bool:
    """Whether ``path`` starts as a zip archive (a local file header) but has no readable end (central directory):
    what a copy or download cut short, or a full disk, leaves of a torch archive."""
    try:
        with open(os.fspath(path), "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" and not zipfile.is_zipfile(os.fspath(path))


def truncated_error(path: PathLike, what: str) -> CorruptFileError:
    return CorruptFileError(f"{what}: {os.fspath(path)!r} is truncated (it starts as a zip archive but its end, the "
                            f"zip central directory, is missing); re-export or copy it again")


def _root(zf: zipfile.ZipFile) -> str:
    first = zf.infolist()[0].filename if zf.infolist() else ""
    return first.split("/", 1)[0] if "/" in first else ""


def add_manifest(path: PathLike) -> None:
    """Append to the zip at ``path`` a manifest of its entries (size and CRC32 each): a package whose library was
    later truncated or swapped, and re-zipped with valid CRCs, no longer matches it (:func:`verify_zip`)."""
    with zipfile.ZipFile(os.fspath(path), "a", compression=zipfile.ZIP_STORED) as zf:
        entries = {i.filename: {"size": i.file_size, "crc32": i.CRC} for i in zf.infolist()}
        name = f"{_root(zf)}/{MANIFEST_NAME}" if _root(zf) else MANIFEST_NAME
        zf.writestr(name, json.dumps({"format": MANIFEST_FORMAT, "version": 1, "entries": entries}))


def _check_manifest(zf: zipfile.ZipFile, p: str, what: str) -> None:
    root = _root(zf)
    name = f"{root}/{MANIFEST_NAME}" if root else MANIFEST_NAME
    try:
        raw = zf.read(name)
    except KeyError:
        return  # an export without a manifest (TorchScript, older packages): the CRCs above are the check
    try:
        manifest = json.loads(raw)
        listed = manifest["entries"]
        assert manifest.get("format") == MANIFEST_FORMAT and isinstance(listed, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CorruptFileError(f"{what}: {p!r} has an unreadable {MANIFEST_NAME}; re-export it") from None
    present = {i.filename: i for i in zf.infolist()}
    for entry, want in listed.items():
        info = present.get(entry)
        if info is None:
            raise CorruptFileError(f"{what}: {p!r} lacks entry {entry!r} that the export wrote: the package was "
                                   f"altered after export")
        if (info.file_size, info.CRC) != (want.get("size"), want.get("crc32")):
            raise CorruptFileError(f"{what}: {p!r}: entry {entry!r} is {info.file_size} bytes (CRC32 {info.CRC:08x}), "
                                   f"the export wrote {want.get('size')} bytes: the package was altered after export")
    extra = [n for n in present if n.endswith(".so") and n not in listed]
    if extra:
        raise CorruptFileError(f"{what}: {p!r} holds library {extra[0]!r} that the export did not write")


def write_error(exc: BaseException, path: PathLike):
    """The OSError naming ``path`` that a failed write of ``path`` should raise, or None to re-raise ``exc``:
    torch's zip writer reports a full disk as a RuntimeError ("[enforce fail at inline_container.cc] unexpected pos
    ..."), and a failed ``write`` raises an OSError that names no file."""
    if isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "file write failed" in str(exc)):
        return OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, exc.strerror, os.fspath(path))
    return None
