"""Manifest and plan: the JSON that makes a cache self-describing and verifiable, written atomically and read with
every field a reader relies on checked first (a crafted manifest gives a one-line error, not a huge allocation)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
from pathlib import Path

from . import part as part_io
from .errors import CorruptCache

FORMAT_NAME = "distill-teacher-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PLAN = "plan.json"
MANIFEST = "manifest.json"
PARTS = "parts"
SKETCH = "sketch"
LOCKS = ".locks"
MAX_JSON_BYTES = 1 << 30
MAX_VOCAB = 1 << 31

KEY_FIELDS = ("format_version", "k", "temperatures", "vocab_size", "dtypes", "encoding", "identity")


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def cache_key(plan: dict) -> str:
    """sha256 of everything that determines the contents (not the backend or the part layout)."""
    return hashlib.sha256(canonical({f: plan[f] for f in KEY_FIELDS if f in plan})).hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside, fsync, rename: readers see the old file or the new one. A failed write (a full disk) leaves no
    temporary behind."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def is_temporary(filename: str, name: str) -> bool:
    return filename.startswith(f".{name}.") and filename.endswith(".tmp")


def remove_temporaries(folder: Path, name: str) -> None:
    """Temporaries that write_json_atomic left for `name` when a process was killed mid-write."""
    for tmp in folder.glob(f".{name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_json(path: Path):
    path = Path(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CorruptCache(f"{path} is larger than {MAX_JSON_BYTES} bytes; it is not a manifest this reader wrote")
    try:
        with open(path) as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCache(f"{path} is not valid JSON ({e})") from None


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


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check(m: dict, encoding: dict) -> None:
    """Every field a reader sizes or indexes by, against the others; raises CorruptCache with the first problem."""

    def bad(msg):
        raise CorruptCache(f"manifest: {msg}")

    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        bad(f"not a {FORMAT_NAME} manifest")
    temps = m.get("temperatures")
    if (
        not isinstance(temps, list)
        or not temps
        or not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in temps)
    ):
        bad("temperatures must be a non-empty list of finite positive numbers")
    vocab = m.get("vocab_size")
    if not _count(vocab) or not 2 <= vocab <= MAX_VOCAB:
        bad(f"vocab_size {vocab!r} is not an integer in [2, {MAX_VOCAB}]")
    problem = part_io.encoding_problem(encoding, vocab)
    if problem:
        bad(f"encoding: {problem}")
    for f in ("num_rows", "part_size", "num_parts"):
        if not _count(m.get(f)):
            bad(f"{f} {m.get(f)!r} is not a non-negative integer")
    if m["part_size"] < 1 or m["num_parts"] != max(1, -(-m["num_rows"] // m["part_size"])):
        bad(f"num_parts {m['num_parts']} does not cover num_rows {m['num_rows']} in parts of {m['part_size']}")
    if encoding.get("sketch") and not isinstance((m.get("sketch") or {}).get("sha256"), str):
        bad("the encoding declares a teacher sketch but no sketch.sha256 seals it")
    parts = m.get("parts")
    if not isinstance(parts, dict) or len(parts) != m["num_parts"]:
        bad(f"lists {len(parts) if isinstance(parts, dict) else 0} parts, num_parts says {m['num_parts']}")
    for p in range(m["num_parts"]):
        entry = parts.get(part_name(p))
        counts = entry.get("counts") if isinstance(entry, dict) else None
        if not isinstance(counts, dict) or not isinstance(entry.get("sha256"), str):
            bad(f"{part_name(p)} has no sha256 and counts")
        for f in ("samples", "tokens", "distilled_positions"):
            if not _count(counts.get(f)):
                bad(f"{part_name(p)}: count {f} {counts.get(f)!r} is not a non-negative integer")
        if counts["samples"] > m["part_size"]:
            bad(f"{part_name(p)} holds {counts['samples']} samples, more than the part size {m['part_size']}")
