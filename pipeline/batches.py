"""Batches: samples grouped into micro-batches (by count or by a token budget), and the collate that turns a
micro-batch's samples into tensors, padded or packed, with the teacher's fields beside them."""

from __future__ import annotations

import numpy as np
import torch

TEACHER_KEYS = (
    "topk_ids",
    "topk_logprobs",
    "tail_logmass",
    "target_logprob",
    "drawn_ids",
    "drawn_logprobs",
    "drawn_logweights",
    "sketch_coeffs",
    "behavior_logprob",
    "chunk_logprob",
    "chunk_first",
    "chunk_of",
)
INDEX_KEYS = {"chunk_first": "positions", "chunk_of": "chunks"}  # indices into the batch: offset per sample


def micro_batches(
    order: np.ndarray, lengths, batch_size: int, batch_tokens: int | None, packed: bool = False
) -> list[list[int]]:
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
        ids[r, o : o + n] = torch.from_numpy(np.asarray(s["input_ids"], dtype=np.int64))
        attn[r, o : o + n] = 1
        pos[r, o : o + n] = torch.arange(n)
        j = np.nonzero(np.asarray(s["loss_mask"]))[0]
        rows.append(np.full(len(j), r))
        cols.append(o + j - 1)
    if pack_length:  # padding after the last sample of a row: its own sequence from 0
        for r in range(n_rows):
            used = int(attn[r].sum())
            pos[r, used:] = torch.arange(width - used)
    rows, cols = torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))
    batch = {
        "input_ids": ids,
        "row_index": rows,
        "col_index": cols,
        "targets": ids[rows, cols + 1],
        "tokens": attn.sum(),
    }
    if pack_length:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = attn
    batch.update(collate_teacher(samples))
    return batch


def collate_teacher(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The samples' teacher rows concatenated in order, 2-D fields padded to the widest (ids −1, log-probs −inf);
    index fields (a cross-tokenizer sample's chunk_first, chunk_of) offset to point into the batch (−1 stays)."""
    out = {}
    for key in TEACHER_KEYS:
        if key not in samples[0]:
            continue
        arrs = [np.asarray(s[key]) for s in samples]
        if key in INDEX_KEYS:
            arrs = [np.where(a >= 0, a + o, -1) for a, o in zip(arrs, _index_offsets(samples, INDEX_KEYS[key]))]
        if arrs[0].ndim == 2:
            w = max(a.shape[1] for a in arrs)
            pad = -1 if key.endswith("_ids") else -np.inf
            arrs = [np.pad(a, ((0, 0), (0, w - a.shape[1])), constant_values=pad) for a in arrs]
        dtype = np.int64 if key.endswith("_ids") or key in INDEX_KEYS else np.float32
        out[key] = torch.from_numpy(np.concatenate(arrs).astype(dtype))
    return out


def _index_offsets(samples: list[dict], what: str) -> np.ndarray:
    """Per sample, the batch index of its first distilled position ("positions") or first chunk ("chunks")."""
    sizes = [int(np.asarray(s["loss_mask"]).sum()) if what == "positions" else len(s["chunk_first"]) for s in samples]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
