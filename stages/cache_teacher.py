"""Stage 1: run the teacher over a dataset and store, per distilled token, its top-k log-probs and exact tail mass."""
from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import storage
from pipeline import __version__, batching, data as D, models


class NonFiniteLogits(RuntimeError):
    pass


@dataclass
class CacheTeacherConfig:
    teacher: str
    data: D.DataConfig
    out: str | None = None
    cache_root: str | None = None
    top_k: int = 64
    temperatures: tuple[float, ...] = (1.0,)
    format: str = "zarr"
    batch_size: int = 8
    batch_tokens: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    shard: tuple[int, int] | None = None
    part_size: int = 256
    logprob_dtype: str = "float16"
    overwrite: bool = False
    strict: bool = False
    trust_remote_code: bool = False
    chunk_bytes: int = 1 << 29
    progress: bool = True

    def __post_init__(self):
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive, got {self.temperatures}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"temperatures repeat: {self.temperatures}")
        if self.out is None and self.cache_root is None:
            raise ValueError("give --out or --cache-root")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"--shard {self.shard[0]}/{self.shard[1]} is not of the form I/N with 0 <= I < N")


def teacher_topk(logits: torch.Tensor, k: int, temperatures):
    """Rows of float32 logits [P, V] → ids [P, k] (sorted by p), log p [T, P, k], log P_R [T, P], and whether
    each row was finite; log P_R = logsumexp(z[not topk]/t) − logsumexp(z/t), summed over the non-top-k terms
    themselves. A NaN or +inf logit makes the row's log-normalizer non-finite, which is how rows are checked."""
    vals, ids = logits.topk(k, dim=-1)
    lps, tails = [], []
    for t in temperatures:
        top = vals[:, :1] / t
        e = (logits - top if t == 1 else (logits / t).sub_(top)).exp_()
        log_z = e.sum(-1, keepdim=True).log_()
        lps.append(vals / t - top - log_z)
        tails.append(e.scatter_(-1, ids, 0.0).sum(-1).log_() - log_z[:, 0])
    finite = torch.isfinite(log_z[:, 0]) & torch.isfinite(top[:, 0])
    return ids, torch.stack(lps), torch.stack(tails), finite


def batches(lengths: list[int], batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    """Indices grouped longest-first so each batch pads little: by sample count, or by padded-token budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur = [], []
    for i in order:
        width = max([lengths[j] for j in cur] + [lengths[i]])
        full = len(cur) >= batch_size if batch_tokens is None else width * (len(cur) + 1) > batch_tokens
        if cur and full:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


class BackgroundWriter:
    """Writes parts on a thread so the device never waits for storage."""

    def __init__(self, writer: storage.CacheWriter):
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

    def put(self, *item):
        if self.error:
            raise self.error
        self.q.put(item)

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def default_shard(cfg: CacheTeacherConfig) -> tuple[int, int]:
    if cfg.shard is not None:
        return cfg.shard
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world)


def run(cfg: CacheTeacherConfig) -> dict:
    """Returns {status: hit|complete|partial, path, manifest?, samples_written, tokens, seconds}."""
    tok = models.load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    rows = D.load_rows(cfg.data)
    samples = D.tokenize(rows, tok, cfg.data)
    vocab = len(tok)
    if cfg.top_k < 1 or cfg.top_k > vocab:
        raise ValueError(f"--top-k {cfg.top_k} must lie between 1 and the vocabulary size {vocab}")
    from transformers import AutoConfig
    teacher_cfg = AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    identity = {
        "teacher": {"name_or_path": cfg.teacher, "config_sha256": models.config_sha256(teacher_cfg),
                    "weights_fingerprint": models.weights_fingerprint(cfg.teacher)},
        "tokenizer": {"fingerprint": models.tokenizer_fingerprint(tok), "size": vocab},
        "dataset": D.fingerprint(samples, tok, cfg.data),
    }
    plan = storage.make_plan(backend=cfg.format, k=cfg.top_k, temperatures=cfg.temperatures, vocab_size=vocab,
                             num_rows=len(samples), part_size=cfg.part_size, identity=identity,
                             logprob_dtype=cfg.logprob_dtype, package_version=__version__)
    out = Path(cfg.out) if cfg.out else Path(cfg.cache_root) / plan["cache_key"][:16]
    done = storage.complete_manifest(out, plan["cache_key"])
    if done is not None and not cfg.overwrite:
        return {"status": "hit", "path": str(out), "manifest": done}
    writer = storage.CacheWriter(out, plan, overwrite=cfg.overwrite)
    shard, num_shards = default_shard(cfg)
    missing = writer.missing_parts(shard, num_shards)
    t0 = time.perf_counter()
    stats = {"samples": 0, "tokens": 0}
    if missing:
        stats = _compute(cfg, writer, missing, samples, tok, vocab)
    manifest = writer.finalize()
    return {"status": "complete" if manifest else "partial", "path": str(out), "manifest": manifest,
            "seconds": time.perf_counter() - t0, "parts_written": len(missing), **stats}


def _compute(cfg, writer, parts, samples, tok, vocab) -> dict:
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    model = models.load_model(cfg.teacher, dtype, device, cfg.trust_remote_code).eval()
    models.check_vocab(model, tok, "teacher")
    head = models.PositionLogits(model, vocab)
    chunk = max(1, cfg.chunk_bytes // (vocab * 4 * 3))
    total = sum(len(samples[i]["input_ids"]) for p in parts for i in writer.part_rows(p))
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="cache-teacher", disable=not cfg.progress)
    out_writer = BackgroundWriter(writer)
    n_samples = 0
    try:
        for p in parts:
            part = [samples[i] for i in writer.part_rows(p)]
            results, skipped = [None] * len(part), 0
            for batch in batches([len(s["input_ids"]) for s in part], cfg.batch_size, cfg.batch_tokens):
                for i, r in zip(batch, _teacher_batch(cfg, head, [part[i] for i in batch], tok, device, chunk)):
                    results[i] = r
                bar.update(sum(len(part[i]["input_ids"]) for i in batch))
                bar.set_postfix(samples=n_samples + sum(r is not None for r in results))
            for s, r in zip(part, results):
                if r is None:
                    skipped += 1
                    msg = f"non-finite teacher logits in sample {s['sample_index']}"
                    if cfg.strict:
                        raise NonFiniteLogits(msg + " (--strict)")
                    warnings.warn(msg + "; skipped")
            kept = [{**s, **r} for s, r in zip(part, results) if r is not None]
            n_samples += len(kept)
            out_writer.put(p, kept, {"truncated_samples": sum(int(s["truncated"]) for s in kept),
                                     "skipped_samples": skipped})
    finally:
        out_writer.close()
        bar.close()
    return {"samples": n_samples, "tokens": total}


@torch.inference_mode()
def _teacher_batch(cfg, head, batch, tok, device, chunk) -> list[dict | None]:
    c = batching.collate(batch, tok.pad_token_id)
    rows = head.hidden_rows(*(c[k].to(device) for k in ("input_ids", "attention_mask", "rows", "cols")))
    out_ids, out_lp, out_tail, finite = [], [], [], []
    for a in range(0, len(rows), chunk):
        i, lp, tail, ok = teacher_topk(head.logits(rows[a:a + chunk]).float(), cfg.top_k, cfg.temperatures)
        finite.append(ok)
        out_ids.append(i)
        out_lp.append(lp)
        out_tail.append(tail)
    k, nt = cfg.top_k, len(cfg.temperatures)
    ids_all = torch.cat(out_ids).cpu().numpy() if out_ids else np.zeros((0, k), np.int64)
    lp_all = torch.cat(out_lp, 1).cpu().numpy() if out_lp else np.zeros((nt, 0, k), np.float32)
    tail_all = torch.cat(out_tail, 1).cpu().numpy() if out_tail else np.zeros((nt, 0), np.float32)
    ok = torch.cat(finite).cpu().numpy() if finite else np.zeros(0, bool)
    results, start = [], 0
    for s in batch:
        n = int(s["loss_mask"].sum())
        sl = slice(start, start + n)
        start += n
        if not ok[sl].all():
            results.append(None)
            continue
        results.append({"topk_ids": ids_all[sl], "topk_logprobs": lp_all[:, sl], "tail_logmass": tail_all[:, sl]})
    return results
