"""Stage 3: held-out response NLL and perplexity, ROUGE-L and exact match of greedy generations, and KL to the
teacher: from a cache of the evaluation split (top-k + tail bucket), or exact over the full vocabulary with the
teacher model itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import batches, data, losses, models, scoring, sources, teachers
from pipeline.config import EvalConfig
from pipeline.errors import extra
from pipeline.scoring import score


def normalize(text: str) -> str:
    return "".join(text.split()).lower()


def answer_correct(prediction: str, reference: str, answer: str) -> bool:
    """The reference is a template around its answer (prefix + answer + suffix, compared without spaces or case):
    the prediction is correct when what it holds between that prefix and suffix (each stripped where present) is
    the answer. "j appears 1 times" and a bare "1" answer 1; "j appears 11 times" does not."""
    p, r, a = normalize(prediction), normalize(reference), normalize(answer)
    at = r.rfind(a)
    prefix, suffix = (r[:at], r[at + len(a) :]) if at >= 0 else ("", "")
    if prefix and p.startswith(prefix):
        p = p[len(prefix) :]
    if suffix and p.endswith(suffix):
        p = p[: -len(suffix)]
    return p == a


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, device, progress=True):
    """Greedy continuations of prompts rendered with the training template, batched with left padding: the texts and
    the samples (prompt ids + generated ids up to EOS, the generated ones marked for scoring)."""
    texts, samples = [], []
    for a in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        enc = data.encode_instructions(tok, prompts[a : a + batch_size], [""] * len(prompts[a : a + batch_size]))[0]
        width = max(map(len, enc))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in enc], device=device)
        attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[:, width:].tolist()
        for e, g in zip(enc, gen):
            g = g[: g.index(tok.eos_token_id) + 1] if tok.eos_token_id in g else g
            texts.append(tok.decode(g, skip_special_tokens=True).strip())
            samples.append(
                {"input_ids": np.array(e + g, np.int64), "loss_mask": np.array([0] * len(e) + [1] * len(g), np.uint8)}
            )
    return texts, samples


def rouge_l(predictions: list[str], references: list[str]) -> float:
    rouge_scorer = extra("rouge_score.rouge_scorer", "ROUGE-L (or pass --no-generate)")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return 100 * sum(scores) / max(1, len(scores))


def cached_kl(cfg: EvalConfig, head, model, tok, device) -> dict:
    """KL to the teacher from a cache of the split: top-k + tail bucket with the teacher's tokenizer; with another
    one, on the chunks both tokenizations agree on, ALM's chunk-likelihood divergence and ULD."""
    cached = teachers.cached([cfg.teacher_cache])
    fingerprint = teachers.cache_vocabulary(cached.source.cache.manifest)["fingerprint"]
    if fingerprint == models.tokenizer_fingerprint(tok):
        teachers.check_caches_readable(cached.source, tok, model, what="teacher cache")
        kl = score(head, model, cached, tok.pad_token_id, device, ("fkl", "rkl"), batch_size=cfg.batch_size)
        return {"fkl_to_teacher": kl["fkl"], "rkl_to_teacher": kl["rkl"]}
    cross = teachers.cross_tokenizer([cfg.teacher_cache], (), None, tok, cfg.data.max_length)
    kl = score(head, model, cross, tok.pad_token_id, device, ("alm", "uld"), batch_size=cfg.batch_size)
    return {"chunk_alm_to_teacher": kl["alm"], "chunk_uld_to_teacher": kl["uld"]}


def exact_kl(cfg: EvalConfig, head, model, tok, source, own, dtype, device) -> dict:
    """KL to the teacher run online, over the full vocabulary: on the split, and on the model's own greedy responses
    (the state distribution it acts in) when it generated."""
    t_tok = models.load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    t_model = models.load_teacher(cfg.teacher, dtype, device, trust_remote_code=cfg.trust_remote_code)
    models.check_vocab(t_model, t_tok, "teacher")
    teachers.check_compatible(teachers.model_vocabulary(t_tok), tok, model, what="teacher")
    out = {}
    for prefix, samples in (("exact", source), ("own", sources.SampleList(own) if own else None)):
        if samples is not None:
            teacher = teachers.OnlineTeacher(samples, t_model, len(tok))
            kl = score(head, model, teacher, tok.pad_token_id, device, ("fkl", "rkl"), batch_size=cfg.batch_size)
            out.update({f"{prefix}_fkl_to_teacher": kl["fkl"], f"{prefix}_rkl_to_teacher": kl["rkl"]})
    return out


@torch.no_grad()
def nll_and_bits_per_byte(head, model, source, pad_id, device, batch_size: int) -> tuple[float, float | None]:
    """One pass over the split: the mean NLL per distilled token, and the bits per byte of the distilled text: the
    NLL of the distilled tokens that spell it (a metaspace dummy prefix of no bytes included; not a template's, not
    EOS), in bits, over the bytes they span. Comparable across tokenizers; None without recorded text."""
    text = len(source) > 0 and "text_end" in source[0]
    was_training, nats, positions, bits, nbytes = model.training, 0.0, 0, 0.0, 0
    model.eval()
    for a in range(0, len(source), batch_size):
        samples = [source[i] for i in range(a, min(len(source), a + batch_size))]
        b = scoring.to_device(batches.collate(samples, pad_id), device)
        nll = -losses.token_logprob(scoring.forward(head, b), b["targets"])
        nats, positions = nats + float(nll.sum()), positions + len(nll)
        if text:
            ends = np.concatenate([np.asarray(s["text_end"])[np.asarray(s["loss_mask"]).astype(bool)] for s in samples])
            bits += float(nll.double()[torch.from_numpy(ends >= 0).to(device)].sum()) / math.log(2)
            nbytes += int(sum(_spans(np.asarray(s["text_end"]))[np.asarray(s["loss_mask"]).astype(bool)].sum()
                              for s in samples))  # fmt: skip
    model.train(was_training)
    return nats / max(1, positions), (bits / max(1, nbytes) if text else None)


def _spans(ends: np.ndarray) -> np.ndarray:
    """Bytes each token spans (0 for a token outside the text)."""
    text = ends >= 0
    prev = np.maximum.accumulate(np.where(text, ends, 0))
    return np.where(text, ends - np.concatenate([[0], prev[:-1]]), 0)


def run(cfg: EvalConfig) -> dict:
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    tok = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    model = models.load_model(cfg.model, dtype, device, cfg.trust_remote_code).eval()
    head = models.PositionLogits(model, models.check_vocab(model, tok, "evaluated"))
    source = sources.TokenizedSource(data.tokenized(cfg.data, tok, progress=cfg.progress))
    nll, bpb = nll_and_bits_per_byte(head, model, source, tok.pad_token_id, device, cfg.batch_size)
    metrics = {"model": cfg.model, "samples": len(source), "nll": nll, "ppl": math.exp(min(nll, 50))}
    if bpb is not None:
        metrics["bits_per_byte"] = bpb
    own = None
    if cfg.generate and cfg.data.prompt_field:
        rows = data.load_rows(cfg.data)
        preds, own = generate(
            model,
            tok,
            [str(r[cfg.data.prompt_field]) for r in rows],
            cfg.max_new_tokens,
            cfg.batch_size,
            device,
            cfg.progress,
        )
        refs = [str(r[cfg.data.response_field]) for r in rows]
        metrics["rougeL"] = rouge_l(preds, refs)
        metrics["exact_match"] = 100 * sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / len(refs)
        if cfg.answer_field and cfg.answer_field in rows.column_names:
            answers = [str(r[cfg.answer_field]) for r in rows]
            metrics["answer_accuracy"] = 100 * sum(map(answer_correct, preds, refs, answers)) / len(answers)
        metrics["examples"] = [
            {"prompt": r[cfg.data.prompt_field], "reference": ref, "prediction": p}
            for r, ref, p in list(zip(rows, refs, preds))[:5]
        ]
    if cfg.teacher_cache:
        metrics.update(cached_kl(cfg, head, model, tok, device))
    if cfg.teacher:
        metrics.update(exact_kl(cfg, head, model, tok, source, own, dtype, device))
    metrics.update({k: v for k, v in (("label", cfg.label), ("run", cfg.run), ("round", cfg.round)) if v is not None})
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(metrics, indent=1))
    return metrics
