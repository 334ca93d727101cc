"""Manifest, plan and checksums: the JSON that makes a cache self-describing and verifiable."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

FORMAT_NAME = "distill-teacher-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PLAN = "plan.json"
MANIFEST = "manifest.json"
PARTS = "parts"
PART_RECORD = "part.json"

KEY_FIELDS = ("format_version", "k", "temperatures", "vocab_size", "dtypes", "encoding", "identity")


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def cache_key(plan: dict) -> str:
    """sha256 of everything that determines the contents (not the backend or the part layout)."""
    return hashlib.sha256(canonical({f: plan[f] for f in KEY_FIELDS if f in plan})).hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def folder_sha256(folder: Path) -> str:
    """sha256 over every file in a folder: its relative path and content hash, in sorted order."""
    h = hashlib.sha256()
    for p in folder_files(folder):
        h.update(f"{p.relative_to(folder).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def fsync_tree(folder: Path) -> None:
    for p in folder_files(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def identity_diff(a: dict, b: dict, prefix="") -> list[str]:
    """Dotted names of the fields where two plans disagree."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += identity_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def part_name(p: int) -> str:
    return f"part-{p:06d}"
