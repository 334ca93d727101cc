"""A part on disk: a folder of files written whole under a temporary name, renamed into place, and read back only
once its bytes match what was recorded when they were written.

`part.json` records, per file, its sha256 (the archival checksum: the manifest's part sha256 is built from these,
and `pipeline verify` recomputes them), its xxh3-128 (the fast checksum every read checks, about 10 GB/s) and its
size. A reader opens only regular files found inside the folder, never follows a link, and never reads more bytes
than recorded, so a crafted part.json cannot point it at /dev/zero or at a file elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import xxhash

from .errors import CorruptCache

RECORD = "part.json"
MAX_RECORD_BYTES = 16 << 20


def fast_hash(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_sha256(file_sha256: dict[str, str]) -> str:
    """The part's sha256 (FORMAT.md): over one line per file, part.json included, in sorted order of path."""
    h = hashlib.sha256()
    for rel in sorted(file_sha256):
        h.update(f"{rel}\0{file_sha256[rel]}\n".encode())
    return h.hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dirs(folder: Path) -> None:
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write(folder: Path, files: dict[str, bytes], record: dict) -> dict:
    """Write files and their part.json into an empty folder, each fsynced; returns the record with its checksums."""
    for rel, data in files.items():
        _write_file(folder / rel, data)
    record = {
        **record,
        "files": {rel: sha256(d) for rel, d in files.items()},
        "sizes": {rel: len(d) for rel, d in files.items()},
        "xxh3_128": {rel: fast_hash(d) for rel, d in files.items()},
    }
    _write_file(folder / RECORD, json.dumps(record, indent=1, sort_keys=True).encode())
    _fsync_dirs(folder)
    return record


def record_sha256(record_bytes: bytes, record: dict) -> str:
    """The part's sha256 from the checksums recorded at write time (no file but part.json is read)."""
    return folder_sha256({**record["files"], RECORD: sha256(record_bytes)})


def _listing(folder: Path) -> dict[str, int]:
    """{relative path: size} of every file in the folder; a link or a special file is corruption."""
    out = {}
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in dirs + names:
            path = Path(root) / name
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and name in dirs:
                continue
            rel = path.relative_to(folder).as_posix()
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCache(f"{folder.name}: {rel} is not a regular file")
            out[rel] = st.st_size
    return out


def read_record(folder: Path) -> tuple[bytes, dict]:
    path = folder / RECORD
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CorruptCache(f"{folder.name}: {RECORD} is missing") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD_BYTES:
        raise CorruptCache(f"{folder.name}: {RECORD} is not a regular file of at most {MAX_RECORD_BYTES} bytes")
    raw = path.read_bytes()
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCache(f"{folder.name}: {RECORD} is not JSON ({e})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CorruptCache(f"{folder.name}: {RECORD} has no valid file list")
    return raw, record


def read(folder: Path, expected_sha256: str | None, full: bool = False, select=None) -> tuple[dict, dict[str, bytes]]:
    """(record, {relative path: bytes}) of a sealed part, after checking part.json against the manifest's sha256,
    the folder's files against the record, and every file read against its recorded checksum (sha256 when full, or
    when the record predates the fast one). `select(path)` limits which files are read (all are listed and sized).
    Raises CorruptCache naming the part and what differs."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        raise CorruptCache(f"{folder.name}: missing")
    raw, record = read_record(folder)
    if expected_sha256 is not None and record_sha256(raw, record) != expected_sha256:
        raise CorruptCache(f"{folder.name}: {RECORD} differs from what the manifest sealed")
    listing = _listing(folder)
    listing.pop(RECORD)
    missing = sorted(set(record["files"]) - set(listing))
    extra = sorted(set(listing) - set(record["files"]))
    if missing or extra:
        raise CorruptCache(
            f"{folder.name}: " + (f"file {missing[0]} is missing" if missing else f"unexpected file {extra[0]}")
        )
    fast = record.get("xxh3_128") if not full else None
    sizes = record.setdefault("sizes", dict(listing))  # records before version 2.1 hold no sizes
    files = {}
    for rel in sorted(listing):
        if rel in sizes and listing[rel] != sizes[rel]:
            raise CorruptCache(f"{folder.name}: {rel} holds {listing[rel]} bytes, {sizes[rel]} were written")
        if select is not None and not select(rel):
            continue
        with open(folder / rel, "rb") as f:
            data = f.read(listing[rel])
        ok = fast_hash(data) == fast[rel] if fast and rel in fast else sha256(data) == record["files"][rel]
        if not ok:
            raise CorruptCache(f"{folder.name}: checksum mismatch in {rel}")
        files[rel] = data
    return record, files
