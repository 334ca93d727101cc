"""Training data: sources (a teacher cache, or tokenized samples for SFT), the deterministic per-epoch plan of
micro-batches split across ranks, and the collate that turns samples into tensors."""
from __future__ import annotations

import numpy as np
import torch

import storage


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

    def __getitem__(self, i):
        return self.cache[int(i)]


class TokenizedSource:
    """Tokenized samples held in memory (token ids only), for plain SFT."""

    def __init__(self, samples: list[dict]):
        self.samples = samples
        self.part_sizes = [len(samples)]
        self.lengths = np.array([len(s["input_ids"]) for s in samples])
        self.has_teacher = False

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[int(i)]


def micro_batches(order: np.ndarray, lengths, batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    """Consecutive samples of the epoch order, grouped by count or by a padded-token budget (global, all ranks)."""
    out, cur, width = [], [], 0
    for i in order.tolist():
        w = max(width, int(lengths[i]))
        full = len(cur) >= batch_size if batch_tokens is None else w * (len(cur) + 1) > batch_tokens
        if cur and full:
            out.append(cur)
            cur, w = [], int(lengths[i])
        cur.append(i)
        width = w
    return out + [cur] if cur else out


def epoch_plan(source, seed: int, epoch: int, batch_size: int, batch_tokens: int | None, window: int,
               world_size: int) -> list[list[int]]:
    """Global micro-batches for one epoch: a fresh block shuffle per (seed, epoch); batches too small to give
    every rank a sample are dropped."""
    order = storage.block_shuffle(source.part_sizes, seed, epoch, window)
    return [b for b in micro_batches(order, source.lengths, batch_size, batch_tokens) if len(b) >= world_size]


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to [B, L]; list the distilled positions (row b, logit column j − 1, target token j) and the teacher rows."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    rows, cols = [], []
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n] = torch.from_numpy(np.asarray(s["input_ids"], dtype=np.int64))
        attn[b, :n] = 1
        j = np.nonzero(np.asarray(s["loss_mask"]))[0]
        rows.append(np.full(len(j), b))
        cols.append(j - 1)
    rows, cols = torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))
    batch = {"input_ids": ids, "attention_mask": attn, "rows": rows, "cols": cols, "targets": ids[rows, cols + 1],
             "tokens": attn.sum()}
    if "topk_ids" in samples[0]:
        k = samples[0]["topk_ids"].shape[-1] if samples[0]["topk_ids"].ndim == 2 else 0
        batch["topk_ids"] = torch.from_numpy(np.concatenate([np.asarray(s["topk_ids"], np.int64).reshape(-1, k) for s in samples]))
        batch["topk_logprobs"] = torch.from_numpy(np.concatenate(
            [np.asarray(s["topk_logprobs"], np.float32).reshape(-1, k) for s in samples]))
        batch["tail_logmass"] = torch.from_numpy(np.concatenate([np.asarray(s["tail_logmass"], np.float32) for s in samples]))
    return batch


class IndexDataset(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i]
