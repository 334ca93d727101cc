"""Writing a cache in parts: each part appears whole or not at all, one writer per part, the manifest last.

Any number of writers, on one machine or many sharing a file system, fill the parts of one cache. A writer claims a
part with a lock file under `.locks/` (released by the operating system when the process dies, so a killed
writer's part is free again) and alone may clear that part's leftovers and write it. A part is written under a
temporary name, then renamed. Whoever finds every part present writes the manifest, after checking each part's
files against the checksums recorded when they were written, so a part damaged in between is never sealed.

`overwrite` never deletes the cache it replaces before the new one is whole: the new cache is written beside it,
in `.NAME.staging-KEY/`, and swapped in when its manifest is written.
"""

from __future__ import annotations

import datetime
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from . import backends, codecs, part_folder
from . import manifest as manifest_io
from . import part as part_io
from . import sketch as sketch_io
from .errors import CacheMismatch, CorruptCache


def make_plan(
    *,
    backend,
    k,
    temperatures,
    vocab_size,
    num_rows,
    part_size,
    identity,
    logprob_dtype="float16",
    package_version="0",
    **encoding_options,
):
    """What the writers fill: the cache's identity, encoding (part.make_encoding's options: top_p, min_k, ids, draws,
    target_logprob, behavior_logprob, exact_draws, sketch_rank, sketch_bits) and part layout."""
    if part_size < 1:
        raise CacheMismatch(f"part size {part_size} must be at least 1 sample")
    encoding = part_io.make_encoding(k=k, vocab_size=vocab_size, logprobs=logprob_dtype, **encoding_options)
    plan = {
        "format": manifest_io.FORMAT_NAME,
        "format_version": manifest_io.FORMAT_VERSION,
        "backend": backends.get(backend).name,
        "k": int(k),
        "temperatures": [float(t) for t in temperatures],
        "vocab_size": int(vocab_size),
        "dtypes": {
            "token_ids": str(codecs.uint_dtype(vocab_size - 1)),
            "loss_mask": "uint8",
            "topk_width": str(part_io.width_dtype(encoding)),
            "tail_logmass": "float32",
            "target_logprob": part_io.target_dtype(encoding),
            "offsets": "int64",
        },
        "encoding": encoding,
        "identity": identity,
        "num_rows": int(num_rows),
        "part_size": int(part_size),
        "num_parts": max(1, -(-int(num_rows) // int(part_size))),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "package_version": package_version,
    }
    if plan["backend"] == "arrow":  # one row per sample (sample_layout.py); caches without "layout" hold one per part
        plan["layout"] = "samples"
    plan["cache_key"] = manifest_io.cache_key(plan)
    return plan


def part_rows(plan: dict, p: int) -> range:
    """Dataset rows that part p covers."""
    size = plan["part_size"]
    return range(p * size, min((p + 1) * size, plan["num_rows"]))


LAYOUT_FIELDS = ("cache_key", "backend", "part_size", "num_rows")


def same_cache(a: dict, b: dict) -> bool:
    return all(a.get(f) == b.get(f) for f in LAYOUT_FIELDS)


def staging_path(path: Path, plan: dict) -> Path:
    return path.parent / f".{path.name}.staging-{plan['cache_key'][:16]}"


def _lock(path: Path) -> FileLock:
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), thread_local=False)


def cache_lock(folder: Path) -> FileLock:
    """The lock of a cache folder's own steps: writing its plan, its manifest, swapping it in."""
    return _lock(folder / manifest_io.LOCKS / "cache.lock")


class Claim:
    """A part this process alone writes; released after its write (or when the process dies)."""

    def __init__(self, p: int, lock: FileLock):
        self.p, self.lock = p, lock

    def release(self) -> None:
        self.lock.release()


class CacheWriter:
    def __init__(self, path, plan: dict, overwrite: bool = False):
        self.target = Path(path)
        self._folder(plan, overwrite)  # refuse before creating anything
        with cache_lock(self.target):
            self.path = self._folder(plan, overwrite)
            self.parts_dir = self.path / manifest_io.PARTS
            existing = self.path / manifest_io.PLAN
            if existing.exists() and not same_cache(
                manifest_io.read_json(existing), plan
            ):  # a staging folder of another
                shutil.rmtree(self.path)  # layout, never finished
            self.path.mkdir(parents=True, exist_ok=True)
            manifest_io.remove_temporaries(self.path, manifest_io.PLAN)
            if not existing.exists():
                manifest_io.write_json_atomic(existing, plan)
            self.parts_dir.mkdir(exist_ok=True)
            self.plan = manifest_io.read_json(existing)
        self.backend = backends.for_parts(self.plan)

    def _folder(self, plan: dict, overwrite: bool) -> Path:
        """Where this plan's parts go: the target itself, or beside it when it holds another cache to replace."""
        target = self.target
        if (target / manifest_io.PLAN).exists():
            old = manifest_io.read_json(target / manifest_io.PLAN)
            if same_cache(old, plan):
                return target
            if not overwrite:
                fields = manifest_io.KEY_FIELDS + LAYOUT_FIELDS[1:]
                diff = manifest_io.identity_diff({f: old.get(f) for f in fields}, {f: plan.get(f) for f in fields})
                raise CacheMismatch(
                    f"{target} holds a different cache (differs in {', '.join(diff[:4])}); "
                    "pass --overwrite to replace it or choose another --out"
                )
            return staging_path(target, plan)
        staged = staging_path(target, plan)
        if not target.exists() and complete_manifest(staged, plan["cache_key"]):  # a swap that was cut short
            os.rename(staged, target)
            return target
        if target.exists() and not target.is_dir():
            raise CacheMismatch(f"{target} is a file, not a cache folder; choose another --out")
        if target.exists() and any(
            p.name != manifest_io.LOCKS and not manifest_io.is_temporary(p.name, manifest_io.PLAN)
            for p in target.iterdir()
        ):
            raise CacheMismatch(
                f"{target} exists and is not a teacher cache; choose another --out (--overwrite "
                "replaces a cache, never other files)"
            )
        return target

    @property
    def num_parts(self) -> int:
        return self.plan["num_parts"]

    def part_rows(self, p: int) -> range:
        return part_rows(self.plan, p)

    def done_parts(self) -> set[int]:
        return {int(d.name.split("-")[1]) for d in self.parts_dir.glob("part-*") if d.is_dir()}

    def missing_parts(self, shard: int = 0, num_shards: int = 1) -> list[int]:
        """Parts of this shard (p mod num_shards == shard) not yet written (some may be in another writer's hands)."""
        done = self.done_parts()
        return [p for p in range(shard, self.num_parts, num_shards) if p not in done]

    def claim(self, p: int, wait: bool = False) -> Claim | None:
        """Part p for this process alone, its leftovers cleared; None if it is written already, or (without wait)
        while another live writer holds it."""
        lock = _lock(self.path / manifest_io.LOCKS / f"{manifest_io.part_name(p)}.lock")
        try:
            lock.acquire(blocking=wait)
        except Timeout:
            return None
        if (self.parts_dir / manifest_io.part_name(p)).is_dir():
            lock.release()
            return None
        for tmp in self.parts_dir.glob(f".tmp-{manifest_io.part_name(p)}-*"):  # a killed writer's: nobody else's
            shutil.rmtree(tmp, ignore_errors=True)
        return Claim(p, lock)

    def claims(self, parts):
        """Claims of the given parts, in order: first those free now, then, waiting for their writers, those other
        processes hold (a part they finish is skipped; one whose writer died is claimed)."""
        busy = []
        for p in parts:
            c = self.claim(p)
            if c is not None:
                yield c
            elif not (self.parts_dir / manifest_io.part_name(p)).is_dir():
                busy.append(p)
        for p in busy:
            c = self.claim(p, wait=True)
            if c is not None:
                yield c

    def write_part(
        self, p: int, samples: list[dict], extra_counts: dict | None = None, claim: Claim | None = None
    ) -> dict:
        """Encode part p from its samples (see part.encode) and write it atomically; returns its record."""
        plan = self.plan
        arrays, stats = part_io.encode(
            samples, plan["encoding"], len(plan["temperatures"]), np.dtype(plan["dtypes"]["token_ids"])
        )
        counts = {
            "samples": len(arrays["sample_index"]),
            "tokens": int(arrays["token_offsets"][-1]),
            "distilled_positions": int(arrays["position_offsets"][-1]),
            **stats,
            **(extra_counts or {}),
        }
        return self.write_arrays(p, arrays, counts, claim)

    def store_sketch(self, arrays: dict) -> dict:
        """The cache's teacher sketch (sketch.SKETCH_ARRAYS): written from `arrays` unless a writer stored one first;
        returns the stored one, which every writer then uses."""
        folder = self.path / manifest_io.SKETCH
        with cache_lock(self.path):
            if not folder.is_dir():
                sketch_io.check(arrays, self.plan)
                tmp = self.path / f".tmp-{manifest_io.SKETCH}-{uuid.uuid4().hex[:8]}"
                tmp.mkdir()
                try:
                    files = backends.get(self.plan["backend"]).encode(arrays)
                    part_folder.write(tmp, files, {"sketch": self.plan["encoding"]["sketch"]})
                    os.rename(tmp, folder)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        return self.sketch()

    def sketch(self) -> dict | None:
        """The stored teacher sketch (checked against its checksums), or None while none is stored."""
        if not (self.path / manifest_io.SKETCH).is_dir():
            return None
        return sketch_io.read(self.path, self.plan, None)

    def write_arrays(self, p: int, arrays: dict, counts: dict, claim: Claim | None = None) -> dict:
        """Write part p's encoded arrays under a temporary name, then rename it into place (claiming it first
        unless the caller holds its claim); the claim is released either way."""
        claim = claim or self.claim(p, wait=True)
        if claim is None:
            return part_folder.read_record(self.parts_dir / manifest_io.part_name(p))[1]  # written meanwhile
        try:
            files = self.backend.encode(arrays)
            tmp = self.parts_dir / f".tmp-{manifest_io.part_name(p)}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                rows = self.part_rows(p)
                record = part_folder.write(tmp, files, {"part": p, "rows": [rows.start, rows.stop], "counts": counts})
                os.rename(tmp, self.parts_dir / manifest_io.part_name(p))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return record
        finally:
            claim.release()

    def finalize(self) -> dict | None:
        """Write the manifest if every part is present (and, when replacing a cache, swap the new one in); returns
        it, or None while parts are missing."""
        try:
            with cache_lock(self.path):
                done = complete_manifest(self.target, self.plan["cache_key"])
                if done is not None or len(self.done_parts()) < self.num_parts:
                    return done
                manifest = write_manifest(self.path, self.plan)
                if self.path != self.target:
                    _swap(self.path, self.target)
        except FileNotFoundError:  # this staging folder was swapped in by another writer
            return complete_manifest(self.target, self.plan["cache_key"])
        return manifest


def _swap(new: Path, target: Path) -> None:
    """Put a finished cache where another stood; the old one is removed only once the new one is in place."""
    old = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(path: Path, plan: dict) -> dict:
    """The manifest from the part records: each part's sha256 is built from the checksums recorded when its files
    were written, after checking the files still match them (a damaged part is moved aside, never sealed)."""
    parts, totals = {}, {}
    for p in range(plan["num_parts"]):
        folder = path / manifest_io.PARTS / manifest_io.part_name(p)
        try:
            record, _ = part_folder.read(folder, None)
        except CorruptCache as e:
            aside = folder.with_name(f".corrupt-{folder.name}-{uuid.uuid4().hex[:8]}")
            os.rename(folder, aside)
            raise CorruptCache(
                f"{e}; it changed after it was written and was moved to {aside.name}: rerun "
                "cache-teacher to write it again"
            ) from None
        raw, record = part_folder.read_record(folder)
        parts[manifest_io.part_name(p)] = {"sha256": part_folder.record_sha256(raw, record), "counts": record["counts"]}
        for key, v in record["counts"].items():
            totals[key] = (
                max(totals.get(key, v), v) if "_max" in key or key.startswith("max_") else totals.get(key, 0) + v
            )
    manifest = {**plan, "counts": totals, "parts": parts, "complete": True}
    if plan["encoding"].get("sketch"):
        manifest["sketch"] = {"sha256": sketch_io.sealed_sha256(path)}
    manifest_io.write_json_atomic(path / manifest_io.MANIFEST, manifest)
    manifest_io.remove_temporaries(path, manifest_io.MANIFEST)
    for lock in (path / manifest_io.LOCKS).glob("part-*.lock"):  # no part is being written any more
        lock.unlink(missing_ok=True)
    return manifest


def cache_key_at(path) -> str | None:
    """The key of the cache at path, finished or still being written, else None."""
    f = Path(path) / manifest_io.PLAN
    return manifest_io.read_json(f).get("cache_key") if f.exists() else None


def complete_manifest(path, cache_key: str | None = None) -> dict | None:
    """The manifest of a finished cache at path (matching cache_key when given), else None."""
    f = Path(path) / manifest_io.MANIFEST
    if not f.exists():
        return None
    manifest = manifest_io.read_json(f)
    if cache_key is not None and manifest.get("cache_key") != cache_key:
        return None
    return manifest


class BackgroundWriter:
    """Writes parts on a thread so the device never waits for storage: put() queues (part, samples, counts, claim)
    for CacheWriter.write_part; an error there is raised by the next put() or by close()."""

    def __init__(self, writer: CacheWriter):
        self.writer, self.error = writer, None
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_part(*item)
                except BaseException as e:
                    self.error = e
            elif item[3] is not None:
                item[3].release()

    def put(self, p: int, samples: list[dict], counts: dict | None = None, claim: Claim | None = None) -> None:
        if self.error:
            raise self.error
        self.q.put((p, samples, counts, claim))

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error
