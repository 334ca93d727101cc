"""On-policy data: the student samples responses to a prompt set, in batches, with a KV cache.

Prompts are rendered with the training template, sorted by length, left-padded and decoded together; each row
records the response text and its exact token ids (what cache-teacher then scores: decoding and re-tokenizing text
does not always give the same ids), the sampler's log-prob of every token (the importance-weight denominator),
and provenance: the generating model's fingerprint, the round and the sampling settings.

With --teacher and --alpha > 0 each token is drawn from α·p_T + (1 − α)·q_S (MiniLLM's teacher-mixed sampling):
both models run side by side, each with its own KV cache, so a step costs a student and a teacher forward on one
token, and both log-probs of the drawn token are recorded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import data, models
from pipeline.config import DataConfig, GenerateConfig
from pipeline.errors import OptionError


def sampling_settings(cfg: GenerateConfig) -> dict:
    return {
        k: getattr(cfg, k)
        for k in ("temperature", "top_p", "top_k", "max_new_tokens", "samples_per_prompt", "seed", "alpha")
    } | {"teacher": cfg.teacher}


def filtered(logp: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probs [B, V] restricted to the top-k tokens and the smallest top-p nucleus, renormalized."""
    if top_k and top_k < logp.shape[-1]:
        kth = logp.topk(top_k, -1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1:
        sorted_lp, order = logp.sort(-1, descending=True)
        before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        drop = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, before >= top_p)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp - torch.logsumexp(logp, -1, keepdim=True)


class Stepper:
    """One model decoding a left-padded batch token by token with a KV cache; log-probs of the next token."""

    def __init__(self, model, ids, attn, vocab):
        from transformers import DynamicCache

        self.model, self.vocab, self.attn = model, vocab, attn
        self.cache = DynamicCache()
        # transformers renamed the forward's past_key_values to cache in 5.x (the old name goes in 5.40)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.pos = (attn.cumsum(-1) - 1).clamp_min(0)
        self.logits = self._run(ids, self.pos)

    def _run(self, ids, pos):
        out = self.model(
            input_ids=ids, attention_mask=self.attn, position_ids=pos, use_cache=True, **{self.cache_arg: self.cache}
        )
        return out.logits[:, -1, : self.vocab].float()

    def advance(self, tokens):
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], 1)
        self.pos = self.pos[:, -1:] + 1
        self.logits = self._run(tokens[:, None], self.pos)


@torch.no_grad()
def sample_batch(cfg, student, teacher, prompts: list[list[int]], vocab, pad_id, eos_id, generator, device) -> list:
    """Responses for a batch of prompt ids: per row (token ids, behavior, student and teacher log-probs, finished)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    s = Stepper(student, ids, attn, vocab)
    t = Stepper(teacher, ids, attn, vocab) if teacher is not None else None
    temp = cfg.temperature or 1.0
    rows = [{"ids": [], "behavior": [], "student": [], "teacher": [], "finished": False} for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(cfg.max_new_tokens):
        log_q = torch.log_softmax(s.logits / temp, -1)
        log_p = torch.log_softmax(t.logits / temp, -1) if t is not None else None
        mix = (
            log_q
            if log_p is None
            else torch.logaddexp(
                log_p + math.log(cfg.alpha),
                log_q + math.log1p(-cfg.alpha) if cfg.alpha < 1 else torch.full_like(log_q, float("-inf")),
            )
        )
        if cfg.temperature == 0:
            y = mix.argmax(-1)
            behavior = torch.zeros_like(y, dtype=torch.float32)
        else:
            mix = filtered(mix, cfg.top_k, cfg.top_p)
            y = torch.multinomial(mix.exp(), 1, generator=generator)[:, 0]
            behavior = mix.gather(-1, y[:, None])[:, 0]
        y = torch.where(done, torch.full_like(y, pad_id), y)
        for b in (~done).nonzero()[:, 0].tolist():
            r = rows[b]
            r["ids"].append(int(y[b]))
            r["behavior"].append(float(behavior[b]))
            r["student"].append(float(log_q[b, y[b]]))
            if log_p is not None:
                r["teacher"].append(float(log_p[b, y[b]]))
            if int(y[b]) == eos_id:
                r["finished"] = True
        done |= y == eos_id
        if done.all():
            break
        s.advance(y)
        if t is not None:
            t.advance(y)
    return rows


def run(cfg: GenerateConfig) -> dict:
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    tok = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    student = models.load_model(cfg.model, dtype, device, cfg.trust_remote_code).eval()
    vocab = models.check_vocab(student, tok, "generating")
    teacher = None
    if cfg.teacher:
        teacher = models.load_teacher(cfg.teacher, dtype, device, trust_remote_code=cfg.trust_remote_code)
        if models.tokenizer_fingerprint(models.load_tokenizer(cfg.teacher)) != models.tokenizer_fingerprint(tok):
            raise OptionError("teacher-mixed sampling needs the teacher and the student to share a tokenizer")
    rows = data.load_rows(DataConfig(cfg.source, cfg.split, text_field=cfg.prompt_field, limit=cfg.limit))
    prompts = data.as_texts(rows[cfg.prompt_field], cfg.prompt_field, range(len(rows)))
    prompt_ids = [p[-cfg.max_prompt_length :] for p in data.encode_instructions(tok, prompts, [""] * len(prompts))[0]]
    provenance = {
        "model": cfg.model,
        "config_sha256": models.config_sha256(student.config),
        "weights_fingerprint": models.weights_fingerprint(cfg.model),
        "round": cfg.round,
    }
    settings = sampling_settings(cfg)
    jobs = [
        (i, j)
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
        for j in range(cfg.samples_per_prompt)
    ]
    results = {}
    bar = tqdm(total=len(jobs), unit="sample", desc="generate", disable=not cfg.progress)
    t0, n_tokens = time.perf_counter(), 0
    for a in range(0, len(jobs), cfg.batch_size):
        batch = jobs[a : a + cfg.batch_size]
        key = hashlib.sha256(f"{cfg.seed}:{cfg.round}:{batch[0]}:{len(batch)}".encode()).digest()
        gen = torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") >> 1)
        out = sample_batch(
            cfg,
            student,
            teacher,
            [prompt_ids[i] for i, _ in batch],
            vocab,
            tok.pad_token_id,
            tok.eos_token_id,
            gen,
            device,
        )
        for job, r in zip(batch, out):
            results[job] = r
            n_tokens += len(r["ids"])
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    out_path = Path(cfg.out)
    write_rows(out_path, rows, results, cfg, tok, provenance, settings, teacher is not None)
    seconds = time.perf_counter() - t0
    return {
        "path": str(out_path),
        "samples": len(jobs),
        "tokens": n_tokens,
        "seconds": seconds,
        "tokens_per_s": n_tokens / seconds if seconds > 0 else float("nan"),
    }


def write_rows(out_path: Path, rows, results, cfg, tok, provenance, settings, mixed: bool) -> None:
    """The JSONL of generated rows, written beside and renamed into place; a failed write (a full disk) leaves no
    temporary, and one a killed run left is removed first."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_path.parent.glob(f".{out_path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_jsonl(tmp, rows, results, cfg, tok, provenance, settings, mixed)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_jsonl(tmp, rows, results, cfg, tok, provenance, settings, mixed) -> None:
    with open(tmp, "w") as f:
        for i in range(len(rows)):
            base = dict(rows[i])
            for j in range(cfg.samples_per_prompt):
                r = results[(i, j)]
                row = {
                    **base,
                    cfg.response_field: tok.decode(r["ids"], skip_special_tokens=True).strip(),
                    "response_token_ids": r["ids"],
                    "behavior_logprobs": r["behavior"],
                    "student_logprobs": r["student"],
                    "finished": r["finished"],
                    "prompt_index": i,
                    "sample": j,
                    "round": cfg.round,
                    "generator": provenance,
                    "sampling": settings,
                }
                if mixed:
                    row["teacher_logprobs"] = r["teacher"]
                f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
