"""Training data: sources of samples (a teacher cache, several caches mixed, or a tokenized dataset), the
deterministic per-epoch plan of micro-batches split across ranks, and the collate that turns samples into tensors,
padded or packed."""
from __future__ import annotations

import numpy as np
import torch

import storage
from pipeline.errors import OptionError

TEACHER_KEYS = ("topk_ids", "topk_logprobs", "tail_logmass", "target_logprob", "drawn_ids", "drawn_logprobs",
                "behavior_logprob")
DEFAULT_PART_SIZE = 256          # cache-teacher's default: a dataset split like it gets the same epoch plans


class CacheSource:
    """Samples of a teacher cache at one temperature; reads parts on demand (never the whole cache)."""

    def __init__(self, path, temperature=None):
        self.path, self.temperature = str(path), temperature
        self.cache = storage.open_cache(path, temperature)
        self.part_sizes = self.cache.part_sizes
        self.lengths = self.cache.sample_lengths()
        self.has_teacher = True

    def __len__(self):
        return len(self.cache)

    def fingerprint(self) -> str:
        return self.cache.manifest["cache_key"]

    def caches(self) -> list:
        return [self.cache]

    def __getitem__(self, i):
        return self.cache[int(i)]


class TokenizedSource:
    """A tokenized dataset (pipeline.data.tokenized, memory-mapped), cut into parts like a cache of it would be,
    so a run from the dataset and a run from its cache see the same batches."""

    def __init__(self, ds, part_size: int = DEFAULT_PART_SIZE):
        self.ds = ds
        self.lengths = ds.data.column("length").to_numpy().astype(np.int64)
        n = len(self.lengths)
        self.part_sizes = [min(part_size, n - a) for a in range(0, n, part_size)] or [0]
        self.has_teacher = False

    def __len__(self):
        return len(self.lengths)

    def fingerprint(self) -> str:
        from pipeline.data import content_sha256
        return content_sha256(self.ds)

    def caches(self) -> list:
        return []

    def __getitem__(self, i):
        row = self.ds[int(i)]
        return {"sample_index": int(i), "input_ids": np.asarray(row["input_ids"], np.int64),
                "loss_mask": np.asarray(row["loss_mask"], np.uint8)}


class MixtureSource:
    """Several sources as one index space; its epoch plan draws each micro-batch from one source, chosen with
    probabilities `shares` (GKD's λ is the share of student-generated data), deterministically per (seed, epoch).
    A source that runs out within an epoch continues with its next own shuffle."""

    def __init__(self, sources: list, shares: list[float]):
        if len(sources) != len(shares) or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
            raise OptionError(f"--mix shares {shares} must be one non-negative share per cache, summing to 1")
        self.sources, self.shares = sources, np.asarray(shares, np.float64)
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in sources])]).astype(np.int64)
        self.lengths = np.concatenate([np.asarray(s.lengths) for s in sources])
        self.part_sizes = [p for s in sources for p in s.part_sizes]
        self.has_teacher = all(s.has_teacher for s in sources)

    def __len__(self):
        return int(self.starts[-1])

    def fingerprint(self) -> str:
        return "+".join(f"{s.fingerprint()}*{w:g}" for s, w in zip(self.sources, self.shares))

    def caches(self) -> list:
        return [c for s in self.sources for c in s.caches()]

    def __getitem__(self, i):
        k = int(np.searchsorted(self.starts, int(i), side="right") - 1)
        return self.sources[k][int(i) - int(self.starts[k])]

    def plan(self, seed, epoch, batch_size, batch_tokens, window, world_size, packed=False) -> list[list[int]]:
        streams = [_cycling(src, seed, epoch, batch_size, batch_tokens, window, world_size, packed)
                   for src in self.sources]
        n = sum(len(epoch_plan(src, seed, epoch, batch_size, batch_tokens, window, world_size, packed))
                for src in self.sources)
        choice = np.random.default_rng([seed, epoch, 0x6d6978]).choice(len(self.sources), size=n, p=self.shares)
        return [[int(self.starts[k]) + i for i in next(streams[k])] for k in choice.tolist()]


def _cycling(source, seed, epoch, *args):
    """Micro-batches of a source's epoch `epoch`, then of further shuffles of it (seeds apart from every epoch's)."""
    yield from epoch_plan(source, seed, epoch, *args)
    m = 1
    while True:
        batches = epoch_plan(source, seed, 10 ** 6 + 1000 * epoch + m, *args)
        if not batches:
            raise OptionError("a mixed cache holds no micro-batch")
        yield from batches
        m += 1


class SampleList:
    """Samples held in memory (a handful: evaluation of generated responses)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.lengths = np.array([len(s["input_ids"]) for s in samples], np.int64)
        self.part_sizes = [len(samples)]
        self.has_teacher = False

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[int(i)]


def micro_batches(order: np.ndarray, lengths, batch_size: int, batch_tokens: int | None,
                  packed: bool = False) -> list[list[int]]:
    """Consecutive samples of the epoch order, grouped by count or by a token budget (global, all ranks): the
    padded tokens, or with packing the real ones."""
    out, cur, width, total = [], [], 0, 0
    for i in order.tolist():
        n = int(lengths[i])
        w = max(width, n)
        if batch_tokens is None:
            full = len(cur) >= batch_size
        else:
            full = (total + n if packed else w * (len(cur) + 1)) > batch_tokens
        if cur and full:
            out.append(cur)
            cur, w, total = [], n, 0
        cur.append(i)
        width, total = w, total + n
    return out + [cur] if cur else out


def epoch_plan(source, seed: int, epoch: int, batch_size: int, batch_tokens: int | None, window: int,
               world_size: int, packed: bool = False) -> list[list[int]]:
    """Global micro-batches for one epoch: a fresh block shuffle per (seed, epoch); batches too small to give
    every rank a sample are dropped."""
    if isinstance(source, MixtureSource):
        return source.plan(seed, epoch, batch_size, batch_tokens, window, world_size, packed)
    order = storage.block_shuffle(source.part_sizes, seed, epoch, window)
    return [b for b in micro_batches(order, source.lengths, batch_size, batch_tokens, packed) if len(b) >= world_size]


def _layout(lengths: list[int], pack_length: int | None) -> list[tuple[int, int]]:
    """(row, column offset) of each sample: one per row, or packed in order into rows of pack_length tokens (a
    sample longer than that gets a row of its own)."""
    if not pack_length:
        return [(b, 0) for b in range(len(lengths))]
    out, row, used = [], 0, 0
    for n in lengths:
        if used and used + n > pack_length:
            row, used = row + 1, 0
        out.append((row, used))
        used += n
    return out


def collate(samples: list[dict], pad_id: int, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """Samples → input_ids [R, L] and, per distilled position (in sample order), its row, logit column j − 1 and
    target token j; plus the teacher rows, padded to the batch's widest row (ids −1, log-probs −inf).

    Padded (default): one sample per row, attention_mask marks the real tokens. Packed (pack_length): samples
    follow each other in rows of pack_length tokens with position_ids restarting at every sample and no
    attention mask; transformers then keeps attention within each sample."""
    lengths = [len(s["input_ids"]) for s in samples]
    place = _layout(lengths, pack_length)
    n_rows = place[-1][0] + 1
    width = max(pack_length or 0, max(lengths)) if pack_length else max(lengths)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n_rows, width), dtype=torch.long)
    pos = torch.arange(width).repeat(n_rows, 1)
    rows, cols = [], []
    for s, (r, o), n in zip(samples, place, lengths):
        ids[r, o:o + n] = torch.from_numpy(np.asarray(s["input_ids"], dtype=np.int64))
        attn[r, o:o + n] = 1
        pos[r, o:o + n] = torch.arange(n)
        j = np.nonzero(np.asarray(s["loss_mask"]))[0]
        rows.append(np.full(len(j), r))
        cols.append(o + j - 1)
    if pack_length:                      # padding after the last sample of a row: its own sequence from 0
        for r in range(n_rows):
            used = int(attn[r].sum())
            pos[r, used:] = torch.arange(width - used)
    rows, cols = torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))
    batch = {"input_ids": ids, "rows": rows, "cols": cols, "targets": ids[rows, cols + 1], "tokens": attn.sum()}
    if pack_length:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = attn
    batch.update(collate_teacher(samples))
    return batch


def collate_teacher(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The samples' teacher rows concatenated in order, 2-D fields padded to the widest (ids −1, log-probs −inf)."""
    out = {}
    for key in TEACHER_KEYS:
        if key not in samples[0]:
            continue
        arrs = [np.asarray(s[key]) for s in samples]
        if arrs[0].ndim == 2:
            w = max(a.shape[1] for a in arrs)
            pad = -1 if key.endswith("_ids") else -np.inf
            arrs = [np.pad(a, ((0, 0), (0, w - a.shape[1])), constant_values=pad) for a in arrs]
        dtype = np.int64 if key.endswith("_ids") else np.float32
        out[key] = torch.from_numpy(np.concatenate(arrs).astype(dtype))
    return out


class IndexDataset(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i]
