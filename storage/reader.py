"""Reading a finished cache: random access with a small part cache, streaming with read-ahead, and splits
of samples across data-loader workers and distributed ranks. Only a few parts are ever in memory."""
from __future__ import annotations

import bisect
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import backends
from . import manifest as M
from . import part as P
from . import v1


class Cache:
    """A finished cache. cache[i] → dict of numpy arrays for stored sample i at the chosen temperature."""

    def __init__(self, path, temperature: float | None = None, max_parts_in_memory: int = 4):
        self.path = Path(path)
        f = self.path / M.MANIFEST
        if not f.exists():
            state = "incomplete (no manifest: a writer has not finished)" if (self.path / M.PLAN).exists() \
                else "not a teacher cache"
            raise FileNotFoundError(f"{self.path} is {state}; run `pipeline cache-teacher` to create or finish it")
        self.manifest = M.read_json(f)
        self.version = self.manifest.get("format_version")
        if self.version not in M.READABLE_VERSIONS:
            raise ValueError(f"{self.path} has format version {self.version}; this reader understands "
                             f"{', '.join(map(str, M.READABLE_VERSIONS))} (upgrade distill-cache)")
        self.backend = backends.get(self.manifest["backend"])
        self.encoding = self.manifest["encoding"] if self.version >= 2 else v1.encoding(self.manifest)
        self.temperature_index = self.temperature_index_of(temperature)
        sizes = [self.manifest["parts"][M.part_name(p)]["counts"]["samples"] for p in range(self.num_parts)]
        self.part_sizes = sizes
        self.part_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        self._lru: OrderedDict[int, dict] = OrderedDict()
        self._max_parts = max_parts_in_memory

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
        raise ValueError(f"temperature {temperature} is not in this cache; cached temperatures: "
                         f"{', '.join(map(str, temps))} (rerun cache-teacher with --temperature {temperature})")

    def at_temperature(self, temperature: float) -> "Cache":
        """The same cache read at another cached temperature (shares nothing mutable)."""
        return Cache(self.path, temperature, self._max_parts)

    def __len__(self) -> int:
        return self.part_starts[-1]

    # -- parts
    def part_folder(self, p: int) -> Path:
        return self.path / M.PARTS / M.part_name(p)

    def read_encoded(self, p: int, names: list[str] | None = None) -> dict:
        """Part p's arrays as stored (version-2 encoded form; a version-1 part is converted on the way)."""
        if self.version == 1:
            arrays = v1.read(self.backend.name, self.part_folder(p), self.manifest)
            return arrays if names is None else {n: arrays[n] for n in names}
        return self.backend.read(self.part_folder(p), names or P.array_names(self.encoding, len(self.temperatures)))

    def decode(self, p: int, temperatures: list[int] | None = None) -> dict:
        """Part p decoded at the given temperature indices (default: this cache's temperature)."""
        temps = [self.temperature_index] if temperatures is None else temperatures
        return P.decode(self.read_encoded(p), self.encoding, temps)

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
        return P.sample(self.read_part(p), j, self.temperature_index)

    def sample_lengths(self) -> np.ndarray:
        """Token count of every stored sample, read from the offsets alone."""
        offs = [self.read_encoded(p, ["token_offsets"])["token_offsets"] for p in range(self.num_parts)]
        return np.concatenate([np.diff(o) for o in offs]) if offs else np.zeros(0, np.int64)

    def iter_parts(self, parts=None, readahead: int = 2, temperatures: list[int] | None = None):
        """Yield (p, decoded arrays) for parts in order, decoding the next `readahead` parts in a background thread."""
        parts = list(range(self.num_parts)) if parts is None else list(parts)
        read = lambda p: self.decode(p, temperatures)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = [pool.submit(read, p) for p in parts[:readahead + 1]]
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
            for j in range(P.n_samples(arrays)):
                yield P.sample(arrays, j, self.temperature_index)


def open_cache(path, temperature: float | None = None, max_parts_in_memory: int = 4) -> Cache:
    return Cache(path, temperature, max_parts_in_memory)


def block_shuffle(part_sizes: list[int], seed: int, epoch: int, window: int = 4) -> np.ndarray:
    """A fresh permutation of all sample indices per (seed, epoch) that touches only `window` parts at a time:
    parts are shuffled, then samples are shuffled within each group of `window` consecutive parts."""
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(part_sizes)]).astype(np.int64)
    order = rng.permutation(len(part_sizes))
    out = []
    for g in range(0, len(order), window):
        idx = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in order[g:g + window]] or [np.zeros(0, np.int64)])
        out.append(rng.permutation(idx))
    return np.concatenate(out) if out else np.zeros(0, np.int64)
