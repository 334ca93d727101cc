"""Writing a cache in parts: each part appears whole or not at all, the manifest comes last.

Writers on one or many machines fill disjoint parts of one cache with no shared-file locking: a part is
written under a temporary name, then renamed; whoever finds every part present writes the manifest (the
same bytes whoever does it).
"""
from __future__ import annotations

import datetime
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from . import backends
from . import manifest as M
from . import codecs as C
from . import part as P


class CacheMismatch(ValueError):
    pass


def make_plan(*, backend, k, temperatures, vocab_size, num_rows, part_size, identity, logprob_dtype="float16",
              top_p=None, min_k=1, ids="plain", draws=0, target_logprob=True, behavior_logprob=False,
              package_version="0"):
    """What the writers fill: the cache's identity, encoding (see part.make_encoding) and part layout."""
    if part_size < 1:
        raise ValueError(f"part size {part_size} must be at least 1 sample")
    if k < 1 or k > vocab_size:
        raise ValueError(f"top-k {k} must lie between 1 and the vocabulary size {vocab_size}")
    encoding = P.make_encoding(k=k, vocab_size=vocab_size, top_p=top_p, min_k=min(min_k, k), ids=ids,
                               logprobs=logprob_dtype, draws=draws, target_logprob=target_logprob,
                               behavior_logprob=behavior_logprob)
    plan = {
        "format": M.FORMAT_NAME, "format_version": M.FORMAT_VERSION, "backend": backends.get(backend).name,
        "k": int(k), "temperatures": [float(t) for t in temperatures], "vocab_size": int(vocab_size),
        "dtypes": {"token_ids": str(C.uint_dtype(vocab_size - 1)), "loss_mask": "uint8",
                   "topk_width": str(P.width_dtype(encoding)), "tail_logmass": "float32",
                   "target_logprob": P.target_dtype(encoding), "offsets": "int64"},
        "encoding": encoding,
        "identity": identity, "num_rows": int(num_rows), "part_size": int(part_size),
        "num_parts": max(1, -(-int(num_rows) // int(part_size))),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "package_version": package_version,
    }
    plan["cache_key"] = M.cache_key(plan)
    return plan


def part_rows(plan: dict, p: int) -> range:
    """Dataset rows that part p covers."""
    size = plan["part_size"]
    return range(p * size, min((p + 1) * size, plan["num_rows"]))


class CacheWriter:
    def __init__(self, path, plan: dict, overwrite: bool = False):
        self.path = Path(path)
        self.parts_dir = self.path / M.PARTS
        existing = self.path / M.PLAN
        if existing.exists():
            old = M.read_json(existing)
            same = old.get("cache_key") == plan["cache_key"] and old.get("backend") == plan["backend"] \
                and old.get("part_size") == plan["part_size"] and old.get("num_rows") == plan["num_rows"]
            if not same and not overwrite:
                diff = M.identity_diff({f: old.get(f) for f in M.KEY_FIELDS + ("backend", "part_size", "num_rows")},
                                       {f: plan.get(f) for f in M.KEY_FIELDS + ("backend", "part_size", "num_rows")})
                raise CacheMismatch(f"{self.path} holds a different cache (differs in {', '.join(diff[:4])}); "
                                    "pass --overwrite to replace it or choose another --out")
            if same:
                plan = old
            else:
                shutil.rmtree(self.path)
        elif self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise CacheMismatch(f"{self.path} exists and is not a cache; choose another --out or pass --overwrite")
        elif self.path.exists() and overwrite:
            shutil.rmtree(self.path)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        if not existing.exists():
            M.write_json_atomic(existing, plan)
        self.plan = plan
        self.backend = backends.get(plan["backend"])

    @property
    def num_parts(self) -> int:
        return self.plan["num_parts"]

    def part_rows(self, p: int) -> range:
        return part_rows(self.plan, p)

    def done_parts(self) -> set[int]:
        return {int(d.name.split("-")[1]) for d in self.parts_dir.glob("part-*") if d.is_dir()}

    def missing_parts(self, shard: int = 0, num_shards: int = 1) -> list[int]:
        """Parts of this shard (p mod num_shards == shard) not yet written; clears this shard's stale temporaries."""
        mine = [p for p in range(self.num_parts) if p % num_shards == shard]
        for tmp in self.parts_dir.glob(".tmp-part-*"):
            if int(tmp.name.split("-")[2]) in mine:
                shutil.rmtree(tmp, ignore_errors=True)
        done = self.done_parts()
        return [p for p in mine if p not in done]

    def write_part(self, p: int, samples: list[dict], extra_counts: dict | None = None) -> dict:
        """Encode part p from its samples (see part.encode) and write it atomically; returns its record."""
        plan = self.plan
        arrays, stats = P.encode(samples, plan["encoding"], len(plan["temperatures"]),
                                 np.dtype(plan["dtypes"]["token_ids"]))
        counts = {"samples": len(arrays["sample_index"]), "tokens": int(arrays["token_offsets"][-1]),
                  "distilled_positions": int(arrays["position_offsets"][-1]), **stats, **(extra_counts or {})}
        return self.write_arrays(p, arrays, counts)

    def write_arrays(self, p: int, arrays: dict, counts: dict) -> dict:
        """Write part p's encoded arrays under a temporary name, then rename it into place."""
        name = M.part_name(p)
        tmp = self.parts_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        self.backend.write(tmp, arrays)
        record = {"part": p, "rows": [self.part_rows(p).start, self.part_rows(p).stop], "counts": counts,
                  "files": {f.relative_to(tmp).as_posix(): M.file_sha256(f) for f in M.folder_files(tmp)}}
        M.write_json_atomic(tmp / M.PART_RECORD, record)
        M.fsync_tree(tmp)
        try:
            os.rename(tmp, self.parts_dir / name)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (self.parts_dir / name).is_dir():
                raise
        return record

    def finalize(self) -> dict | None:
        """Write the manifest if every part is present; returns it, or None while parts are missing."""
        if len(self.done_parts()) < self.num_parts:
            return None
        return write_manifest(self.path, self.plan)


def write_manifest(path: Path, plan: dict) -> dict:
    parts, totals = {}, {}
    for p in range(plan["num_parts"]):
        folder = path / M.PARTS / M.part_name(p)
        record = M.read_json(folder / M.PART_RECORD)
        parts[M.part_name(p)] = {"sha256": M.folder_sha256(folder), "counts": record["counts"]}
        for key, v in record["counts"].items():
            totals[key] = max(totals.get(key, v), v) if "_max" in key or key.startswith("max_") else totals.get(key, 0) + v
    manifest = {**plan, "counts": totals, "parts": parts, "complete": True}
    M.write_json_atomic(path / M.MANIFEST, manifest)
    return manifest


def complete_manifest(path, cache_key: str | None = None) -> dict | None:
    """The manifest of a finished cache at path (matching cache_key when given), else None."""
    f = Path(path) / M.MANIFEST
    if not f.exists():
        return None
    manifest = M.read_json(f)
    if cache_key is not None and manifest.get("cache_key") != cache_key:
        return None
    return manifest
