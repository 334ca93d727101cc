"""Sources of training samples: a teacher cache, several caches mixed, a tokenized dataset, or samples in memory.

A source is map-style (`len`, `source[i]` → a sample dict of numpy arrays) and knows its epoch plan: the
deterministic list of global micro-batches of one (seed, epoch), the same on every rank. A cached split and its
dataset are cut into the same parts, so a run from either sees the same batches.
"""

from __future__ import annotations

import numpy as np

import storage
from pipeline.batches import micro_batches
from pipeline.config import DEFAULT_PART_SIZE
from pipeline.errors import OptionError


class Source:
    """What every source has: per-sample `lengths`, `part_sizes` (the block shuffle's blocks) and the plan."""

    lengths: np.ndarray
    part_sizes: list[int]

    def __len__(self):
        return len(self.lengths)

    def caches(self) -> list:
        """The teacher caches behind this source (none for a dataset)."""
        return []

    def plan(
        self,
        seed: int,
        epoch: int,
        batch_size: int,
        batch_tokens: int | None,
        window: int,
        world_size: int,
        packed: bool = False,
    ) -> list[list[int]]:
        """Global micro-batches for one epoch: a fresh block shuffle per (seed, epoch); batches too small to give
        every rank a sample are dropped."""
        order = storage.block_shuffle(self.part_sizes, seed, epoch, window)
        return [b for b in micro_batches(order, self.lengths, batch_size, batch_tokens, packed) if len(b) >= world_size]


class CacheSource(Source):
    """Samples of a teacher cache at one temperature, with their teacher fields; reads parts on demand."""

    def __init__(self, path, temperature=None):
        self.path, self.temperature = str(path), temperature
        self.cache = storage.open_cache(path, temperature)
        self.part_sizes = self.cache.part_sizes
        self.lengths = self.cache.sample_lengths()

    def fingerprint(self) -> str:
        return self.cache.manifest["cache_key"]

    def caches(self) -> list:
        return [self.cache]

    def __getitem__(self, i):
        return self.cache[int(i)]


class TokenizedSource(Source):
    """A tokenized dataset (pipeline.data.tokenized, memory-mapped), cut into parts like a cache of it would be."""

    def __init__(self, ds, part_size: int = DEFAULT_PART_SIZE):
        self.ds = ds
        self.lengths = ds.data.column("length").to_numpy().astype(np.int64)
        n = len(self.lengths)
        self.part_sizes = [min(part_size, n - a) for a in range(0, n, part_size)] or [0]

    def fingerprint(self) -> str:
        from pipeline.data import content_sha256

        return content_sha256(self.ds)

    def __getitem__(self, i):
        sample = self.ds[int(i)]
        out = {
            "sample_index": int(i),
            "input_ids": np.asarray(sample["input_ids"], np.int64),
            "loss_mask": np.asarray(sample["loss_mask"], np.uint8),
        }
        if "text_end" in sample:
            out["text_end"] = np.asarray(sample["text_end"], np.int32)
        return out


class SampleList(Source):
    """Samples held in memory (a handful: evaluation of generated responses)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.lengths = np.array([len(s["input_ids"]) for s in samples], np.int64)
        self.part_sizes = [len(samples)]

    def __getitem__(self, i):
        return self.samples[int(i)]


class MixtureSource(Source):
    """Several sources as one index space; its epoch plan draws each micro-batch from one source, chosen with
    probabilities `shares` (GKD's λ is the share of student-generated data), deterministically per (seed, epoch).
    A source that runs out within an epoch continues with its next own shuffle."""

    def __init__(self, sources: list[Source], shares: list[float]):
        if len(sources) != len(shares) or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
            raise OptionError(f"--mix shares {shares} must be one non-negative share per cache, summing to 1")
        self.sources, self.shares = sources, np.asarray(shares, np.float64)
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in sources])]).astype(np.int64)
        self.lengths = np.concatenate([np.asarray(s.lengths) for s in sources])
        self.part_sizes = [p for s in sources for p in s.part_sizes]

    def fingerprint(self) -> str:
        return "+".join(f"{s.fingerprint()}*{w:g}" for s, w in zip(self.sources, self.shares))

    def caches(self) -> list:
        return [c for s in self.sources for c in s.caches()]

    def __getitem__(self, i):
        k = int(np.searchsorted(self.starts, int(i), side="right") - 1)
        return self.sources[k][int(i) - int(self.starts[k])]

    def plan(self, seed, epoch, batch_size, batch_tokens, window, world_size, packed=False) -> list[list[int]]:
        args = (batch_size, batch_tokens, window, world_size, packed)
        plans = [src.plan(seed, epoch, *args) for src in self.sources]
        streams = [_cycling(src, first, seed, epoch, args) for src, first in zip(self.sources, plans)]
        n = sum(map(len, plans))
        choice = np.random.default_rng([seed, epoch, 0x6D6978]).choice(len(self.sources), size=n, p=self.shares)
        return [[int(self.starts[k]) + i for i in next(streams[k])] for k in choice.tolist()]


def _cycling(source: Source, first: list, seed: int, epoch: int, args: tuple):
    """Micro-batches `first` (the source's epoch `epoch`), then of further shuffles of it (seeds apart from every
    epoch's)."""
    yield from first
    m = 1
    while True:
        more = source.plan(seed, 10**6 + 1000 * epoch + m, *args)
        if not more:
            raise OptionError("a mixed cache holds no micro-batch")
        yield from more
        m += 1
