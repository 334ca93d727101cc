"""Reading a finished cache: random access with a small part cache, streaming with read-ahead, and splits
of samples across data-loader workers and distributed ranks. Only a few parts are ever in memory."""

from __future__ import annotations

import bisect
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import backends, part_folder, v1
from . import manifest as manifest_io
from . import part as part_io
from . import sketch as sketch_io
from .errors import CacheError, CorruptCache, IncompleteCache

# a part may claim to decode to at most this many bytes per byte stored (zstd on real rows gives 2–20), plus a slack
MAX_EXPANSION, EXPANSION_SLACK = 4096, 256 << 20
DECODE_ERRORS = (ValueError, IndexError, TypeError, KeyError, MemoryError, OverflowError, AttributeError)


class Cache:
    """A finished cache. cache[i] → dict of numpy arrays for stored sample i at the chosen temperature.

    Every part's files are checked against the checksums recorded when they were written each time they are read
    (xxh3; sha256 with full_checks), and every size the decoders allocate by is checked against the manifest and the
    part's bytes, so a damaged or crafted cache gives a CorruptCache error naming the part, never wrong values."""

    def __init__(self, path, temperature: float | None = None, max_parts_in_memory: int = 4, full_checks: bool = False):
        self.path = Path(path)
        f = self.path / manifest_io.MANIFEST
        if not f.exists():
            state = (
                "incomplete (no manifest: a writer has not finished)"
                if (self.path / manifest_io.PLAN).exists()
                else "not a teacher cache"
            )
            raise IncompleteCache(f"{self.path} is {state}; run `pipeline cache-teacher` to create or finish it")
        self.manifest = manifest_io.read_json(f)
        self.version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
        if self.version not in manifest_io.READABLE_VERSIONS:
            raise CacheError(
                f"{self.path} has format version {self.version}; this reader understands "
                f"{', '.join(map(str, manifest_io.READABLE_VERSIONS))} (upgrade distill-cache)"
            )
        try:
            self.encoding = self.manifest["encoding"] if self.version >= 2 else v1.encoding(self.manifest)
            manifest_io.check(self.manifest, self.encoding)
        except (KeyError, TypeError, AttributeError) as e:
            raise CorruptCache(f"{f}: malformed manifest ({type(e).__name__}: {e})") from None
        self.backend = backends.for_parts(self.manifest)
        self.full_checks = full_checks
        self.temperature_index = self.temperature_index_of(temperature)
        sizes = [self.manifest["parts"][manifest_io.part_name(p)]["counts"]["samples"] for p in range(self.num_parts)]
        self.part_sizes = sizes
        self.part_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self._lru: OrderedDict[int, dict] = OrderedDict()
        self._max_parts = max_parts_in_memory
        self._sketch = None

    # -- description
    @property
    def temperatures(self) -> list[float]:
        return self.manifest["temperatures"]

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def num_parts(self) -> int:
        return self.manifest["num_parts"]

    def temperature_index_of(self, temperature) -> int:
        temps = self.manifest["temperatures"]
        if temperature is None:
            return 0
        for j, t in enumerate(temps):
            if abs(t - float(temperature)) < 1e-9:
                return j
        raise CacheError(
            f"temperature {temperature} is not in this cache; cached temperatures: "
            f"{', '.join(map(str, temps))} (rerun cache-teacher with --temperature {temperature})"
        )

    def at_temperature(self, temperature: float) -> "Cache":
        """The same cache read at another cached temperature (shares nothing mutable)."""
        return Cache(self.path, temperature, self._max_parts)

    def __len__(self) -> int:
        return self.part_starts[-1]

    # -- parts
    def part_folder(self, p: int) -> Path:
        return self.path / manifest_io.PARTS / manifest_io.part_name(p)

    def read_encoded(self, p: int, names: list[str] | None = None, unpacked: bool = False) -> dict:
        """Part p's arrays as stored (version-2 encoded form; a version-1 part is converted on the way), after its
        files passed their checksums; `unpacked`: bit-packed arrays may come as their uint32 codes (decoding only)."""
        name = manifest_io.part_name(p)
        entry = self.manifest["parts"][name]
        n_temps = len(self.temperatures)
        names = names or part_io.array_names(self.encoding, n_temps)
        try:
            select = self.backend.needs(names) if self.version >= 2 else None
            record, files = part_folder.read(self.part_folder(p), entry["sha256"], self.full_checks, select)
            self._check_budget(name, entry["counts"], record)
            if self.version == 1:
                arrays = v1.decode(self.backend.name, files, self.manifest)
                return {n: arrays[n] for n in names}
            shapes = part_io.stored_shapes(entry["counts"], self.encoding, n_temps)
            return self.backend.decode(files, names, shapes, unpacked)
        except CacheError as e:
            raise CorruptCache(f"{self.path}: {e}" if name in str(e) else f"{self.path}: {name}: {e}") from e
        except DECODE_ERRORS as e:
            raise CorruptCache(f"{self.path}: {name} cannot be decoded ({type(e).__name__}: {e})") from e

    def _check_budget(self, name: str, counts: dict, record: dict) -> None:
        stored = sum(record["sizes"].values())
        need = part_io.decoded_bytes(counts, self.encoding, len(self.temperatures))
        if need > MAX_EXPANSION * stored + EXPANSION_SLACK:
            raise CorruptCache(f"{name}: its counts claim {need} decoded bytes from {stored} stored; refusing")
        if record.get("counts", {}).get("samples") != counts["samples"]:
            raise CorruptCache(
                f"{name}: part.json holds {record.get('counts', {}).get('samples')} samples, the "
                f"manifest {counts['samples']}"
            )

    def decode(self, p: int, temperatures: list[int] | None = None) -> dict:
        """Part p decoded at the given temperature indices (default: this cache's temperature)."""
        temps = [self.temperature_index] if temperatures is None else temperatures
        arrays = self.read_encoded(p, unpacked=True)
        try:
            return part_io.decode(arrays, self.encoding, temps)
        except DECODE_ERRORS as e:
            raise CorruptCache(
                f"{self.path}: {manifest_io.part_name(p)} cannot be decoded ({type(e).__name__}: {e})"
            ) from e

    def read_part(self, p: int) -> dict:
        """Part p decoded at this cache's temperature, from the in-memory cache of recent parts or from disk."""
        if p in self._lru:
            self._lru.move_to_end(p)
            return self._lru[p]
        arrays = self.decode(p)
        self._lru[p] = arrays
        while len(self._lru) > self._max_parts:
            self._lru.popitem(last=False)
        return arrays

    @property
    def has_target_logprob(self) -> bool:
        return bool(self.encoding.get("target_logprob"))

    def sketch(self) -> dict | None:
        """The teacher sketch (storage.sketch.read: mean, components, basis), or None when the cache has none."""
        if not self.encoding.get("sketch"):
            return None
        if self._sketch is None:
            try:
                self._sketch = sketch_io.read(
                    self.path, self.manifest, self.manifest["sketch"]["sha256"], self.full_checks
                )
            except DECODE_ERRORS as e:
                raise CorruptCache(
                    f"{self.path}: the teacher sketch cannot be decoded ({type(e).__name__}: {e})"
                ) from e
            except CacheError as e:
                raise CorruptCache(f"{self.path}: {e}") from e
        return self._sketch

    @property
    def draws(self) -> int:
        return self.encoding["draws"]["n"] if self.encoding.get("draws") else 0

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)} samples")
        p = bisect.bisect_right(self.part_starts, i) - 1
        return p, i - self.part_starts[p]

    def __getitem__(self, i: int) -> dict:
        p, j = self.locate(int(i))
        return part_io.sample(self.read_part(p), j, self.temperature_index)

    def sample_lengths(self) -> np.ndarray:
        """Token count of every stored sample, read from the offsets alone."""
        offs = [self.read_encoded(p, ["token_offsets"])["token_offsets"] for p in range(self.num_parts)]
        return np.concatenate([np.diff(o) for o in offs]) if offs else np.zeros(0, np.int64)

    def texts(self) -> list[tuple[bytes, bytes]]:
        """Every stored sample's (prompt, distilled text) as UTF-8 bytes, read from the text arrays alone (a cache
        with `encoding.text`)."""
        out = []
        for p in range(self.num_parts):
            a = self.read_encoded(p, ["prompt_length", "text_offsets", "text"])
            raw, o = a["text"].tobytes(), a["text_offsets"]
            cut = o[:-1] + a["prompt_length"]
            out += [(raw[o[i] : cut[i]], raw[cut[i] : o[i + 1]]) for i in range(len(cut))]
        return out

    def iter_parts(self, parts=None, readahead: int = 2, temperatures: list[int] | None = None):
        """Yield (p, decoded arrays) for parts in order, decoding the next `readahead` parts in a background thread."""
        parts = list(range(self.num_parts)) if parts is None else list(parts)
        read = lambda p: self.decode(p, temperatures)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = [pool.submit(read, p) for p in parts[: readahead + 1]]
            for n, p in enumerate(parts):
                arrays = pending[n].result()
                pending[n] = None
                if n + readahead + 1 < len(parts):
                    pending.append(pool.submit(read, parts[n + readahead + 1]))
                yield p, arrays

    def stream(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1, readahead: int = 2):
        """Samples in storage order, restricted to this (rank, worker)'s parts: part p goes to slot p mod (W·N)."""
        slot, slots = rank * num_workers + worker, world_size * num_workers
        for _, arrays in self.iter_parts(range(slot, self.num_parts, slots), readahead):
            for j in range(part_io.n_samples(arrays)):
                yield part_io.sample(arrays, j, self.temperature_index)


def open_cache(
    path, temperature: float | None = None, max_parts_in_memory: int = 4, full_checks: bool = False
) -> Cache:
    return Cache(path, temperature, max_parts_in_memory, full_checks)


def block_shuffle(part_sizes: list[int], seed: int, epoch: int, window: int = 4) -> np.ndarray:
    """A fresh permutation of all sample indices per (seed, epoch) that touches only `window` parts at a time:
    parts are shuffled, then samples are shuffled within each group of `window` consecutive parts."""
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(part_sizes)]).astype(np.int64)
    order = rng.permutation(len(part_sizes))
    out = []
    for g in range(0, len(order), window):
        idx = np.concatenate(
            [np.arange(starts[p], starts[p + 1]) for p in order[g : g + window]] or [np.zeros(0, np.int64)]
        )
        out.append(rng.permutation(idx))
    return np.concatenate(out) if out else np.zeros(0, np.int64)
