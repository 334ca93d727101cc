"""Stage 1: run the teacher over a dataset and store, per distilled token, its top-k log-probs, exact tail mass,
the log-prob of the actual next token and, optionally, tokens drawn from its tail."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import storage
from pipeline import __version__, alignment, batches, data, models, parallel, teachers
from pipeline.config import CacheTeacherConfig
from pipeline.errors import InputError
from storage.codecs import top_p_widths


class NonFiniteLogits(InputError):
    pass


def shard_of(cfg: CacheTeacherConfig, group: parallel.TeacherGroup) -> tuple[int, int]:
    """This TP group's shard: the torchrun groups split `--shard I/N` (or the whole cache) further."""
    i, n = cfg.shard or (0, 1)
    return i * group.groups + group.group, n * group.groups


def run(cfg: CacheTeacherConfig) -> dict:
    """Returns {status: hit|complete|partial, path, manifest?, samples, tokens, seconds, parts_written}."""
    group = parallel.teacher_group(cfg.tp)
    teacher_cfg = models.load_config(cfg.teacher, cfg.trust_remote_code)
    width = getattr(teacher_cfg.get_text_config(), "hidden_size", None)
    if width and cfg.sketch_rank > width:
        raise InputError(
            f"--sketch-rank {cfg.sketch_rank} exceeds the teacher's hidden size {width}; use at most {width}"
        )
    if cfg.tp > 1:
        models.check_tensor_parallel(teacher_cfg, cfg.tp, cfg.teacher)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parallel.init()
    tok = models.load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    ds = data.tokenized(cfg.data, tok, cfg.num_proc, progress=cfg.progress)
    vocab = len(tok)
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    identity = cache_identity(cfg, teacher_cfg, tok, ds, dtype)
    cfg, plan = existing_encoding(cfg, identity, vocab, len(ds), records_text(cfg, tok))
    out = out_path(cfg, plan)
    done = storage.complete_manifest(out, plan["cache_key"])
    if done is not None and not cfg.overwrite:
        return {"status": "hit", "path": str(out), "manifest": done}
    writer = None
    if int(os.environ.get("RANK", "0")) == 0:  # prepares the folder (and any --overwrite) before the others
        writer = storage.CacheWriter(out, plan, overwrite=cfg.overwrite)
    parallel.barrier()
    if group.writer and writer is None:
        writer = storage.CacheWriter(out, plan, overwrite=cfg.overwrite)
    shard, num_shards = shard_of(cfg, group)
    missing = parallel.broadcast_in_group(writer.missing_parts(shard, num_shards) if group.writer else [], group)
    t0 = time.perf_counter()
    stats = {"samples": 0, "tokens": 0, "parts_written": 0}
    if missing:
        stats = _compute(cfg, writer, plan, missing, ds, tok, vocab, device, dtype, group)
    manifest = writer.finalize() if writer else None
    parallel.barrier()
    if manifest is None:
        manifest = storage.complete_manifest(out, plan["cache_key"])
    return {
        "status": "complete" if manifest else "partial",
        "path": str(out),
        "manifest": manifest,
        "seconds": time.perf_counter() - t0,
        "writer": group.writer,
        **stats,
    }


def records_text(cfg: CacheTeacherConfig, tok) -> bool:
    """Whether the cache records its samples' text and alignment: rows not generated, a tokenizer whose token bytes
    can be told."""
    return not cfg.data.response_ids_field and alignment.byte_scheme(tok) is not None


def out_path(cfg: CacheTeacherConfig, plan: dict) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.cache_root) / plan["cache_key"][:16]


NO_TEXT = "was written before caches recorded their text (0.3): it keeps serving students of the teacher's tokenizer"


def existing_encoding(cfg: CacheTeacherConfig, identity: dict, vocab: int, rows: int, text: bool) -> tuple:
    """(cfg, plan) with the options' encoding (recording the text when `text`); or, when a cache written before
    stands at its path, that one's, to resume or hit: one without the text (before 0.3), or one of an earlier
    default encoding (config.EARLIER_DEFAULT_ENCODINGS) for the options the command leaves at their default."""
    given, cfg = cfg, dataclasses.replace(cfg, top_k=cfg.width(vocab))
    plan = cache_plan(cfg, identity, vocab, rows, text)
    if cfg.overwrite or storage.cache_key_at(out_path(cfg, plan)) == plan["cache_key"]:
        return cfg, plan  # --overwrite asks for this encoding whatever stands there
    earlier = [(cfg, False, NO_TEXT)] if text else []
    for when, old in given.earlier_defaults().items():
        old = dataclasses.replace(old, top_k=old.width(vocab))
        why = (
            f"was written with the default encoding {when}: it keeps that encoding (new caches default to "
            f"{given.default_flags()})"
        )
        earlier += [(old, text, why), (old, False, why)][: 1 + text]
    for c, with_text, why in earlier:
        p = cache_plan(c, identity, vocab, rows, with_text)
        if storage.cache_key_at(out_path(c, p)) == p["cache_key"]:
            warnings.warn(f"{out_path(c, p)} {why}")
            return c, p
    return cfg, plan


def cache_identity(cfg: CacheTeacherConfig, teacher_cfg, tok, ds, dtype) -> dict:
    """What the cache's key hashes beside its encoding: the teacher, tokenizer, dataset (and sketch's source)."""
    identity = {
        "teacher": {
            "name_or_path": cfg.teacher,
            "config_sha256": models.config_sha256(teacher_cfg),
            "weights_fingerprint": models.weights_fingerprint(cfg.teacher),
            "dtype": str(dtype).split(".")[-1],
        },
        "tokenizer": {"fingerprint": models.tokenizer_fingerprint(tok), "size": len(tok)},
        "dataset": data.fingerprint(ds, tok, cfg.data),
    }
    if cfg.sketch_rank:  # what the sketch's directions were fitted on
        source = cfg.sketch_from and storage.open_cache(cfg.sketch_from).manifest["cache_key"]
        identity["sketch"] = {"from_cache": source} if source else {"positions": cfg.sketch_positions}
    return identity


def cache_plan(cfg: CacheTeacherConfig, identity: dict, vocab: int, rows: int, text: bool) -> dict:
    """The cache's plan: its encoding (with the samples' text and alignment when `text`), layout and identity."""
    return storage.make_plan(
        backend=cfg.format,
        k=cfg.top_k,
        temperatures=cfg.temperatures,
        vocab_size=vocab,
        num_rows=rows,
        part_size=cfg.part_size,
        identity=identity,
        logprob_dtype=cfg.logprob_dtype,
        top_p=cfg.top_p,
        min_k=cfg.min_k,
        ids=cfg.ids,
        draws=cfg.tail_draws,
        sketch_rank=cfg.sketch_rank,
        sketch_bits=cfg.sketch_bits,
        behavior_logprob=bool(cfg.data.behavior_field),
        text=text,
        package_version=__version__,
    )


def _compute(cfg, writer, plan, parts, ds, tok, vocab, device, dtype, group) -> dict:
    """Teacher rows for every part of `parts` this process claims (the group writer claims; its TP peers follow)."""
    model = models.load_teacher(
        cfg.teacher,
        dtype,
        device,
        tp=cfg.tp,
        device_map=cfg.device_map,
        max_memory=cfg.max_memory,
        trust_remote_code=cfg.trust_remote_code,
    )
    models.check_vocab(model, tok, "teacher")
    head = models.PositionLogits(model, vocab)
    sketch = _sketch(cfg, writer, ds, head, tok, device, group) if cfg.sketch_rank else None
    chunk = chunk_rows(cfg, vocab, device)
    lengths = ds.data.column("length").to_numpy()
    rows_of = lambda p: storage.part_rows(plan, p)
    total = int(sum(lengths[rows_of(p).start : rows_of(p).stop].sum() for p in parts))
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="cache-teacher", disable=not (cfg.progress and writer))
    out_writer = storage.BackgroundWriter(writer) if writer is not None else None
    claims = writer.claims(parts) if writer is not None else None
    n_samples = n_parts = 0
    try:
        while True:
            claim = next(claims, None) if claims is not None else None
            p = parallel.broadcast_in_group([claim.p if claim else -1], group)[0]
            if p < 0:
                break
            r = rows_of(p)
            kept, counts = _part_rows(cfg, head, data.rows_of(ds, r.start, r.stop), tok, device, chunk, bar, sketch)
            n_samples, n_parts = n_samples + len(kept), n_parts + 1
            bar.set_postfix(samples=n_samples)
            if out_writer is not None:
                out_writer.put(p, kept, counts, claim)
    finally:
        if out_writer is not None:
            out_writer.close()
        bar.close()
    return {"samples": n_samples, "tokens": total, "parts_written": n_parts}


def chunk_rows(cfg: CacheTeacherConfig, vocab: int, device="cpu") -> int:
    """Positions whose float32 logits and their working copies (the tail weights, with draws) fit cfg.chunk_bytes;
    on CPU the working copies are a slice's (slice_rows), so the logits and their float32 copy."""
    copies = 2 if torch.device(device).type == "cpu" else 6 if cfg.tail_draws else 3
    return max(1, cfg.chunk_bytes // (vocab * 4 * copies))


# on CPU the rows of a chunk's logits are computed in slices whose [positions, V] float32 temporaries stay below
# glibc's largest mmap threshold (32 MiB): a larger block is mapped fresh on every allocation and faults in page by
# page (a third of cache-teacher's time beyond the forward, at 455 positions per slice and V = 49152); smaller freed
# blocks are reused. The lm_head runs over the whole chunk, where a matmul is most efficient.
CPU_SLICE_BYTES = 24 << 20


def slice_rows(logits: torch.Tensor) -> int:
    """How many rows of a chunk's logits position_fields takes at a time: on CPU those of CPU_SLICE_BYTES, else all."""
    rows = CPU_SLICE_BYTES // (4 * logits.shape[-1]) if logits.device.type == "cpu" else len(logits)
    return max(1, rows)


def _sketch(cfg, writer, ds, head, tok, device, group) -> dict | None:
    """The cache's teacher sketch (storage.sketch): the stored one, or fitted on the hidden states of the dataset's
    first --sketch-positions distilled positions and stored (the group writer's; its TP peers take part in the
    forward passes and get None)."""
    stored = writer.sketch() if group.writer else None
    if parallel.broadcast_in_group([stored is not None], group)[0]:
        return stored
    if cfg.sketch_from:
        return writer.store_sketch(_borrowed_sketch(cfg, writer.plan)) if group.writer else None
    rows, positions = [], 0
    for a in range(0, len(ds), cfg.batch_size):  # the first rows that hold --sketch-positions distilled positions
        if positions >= cfg.sketch_positions:
            break
        rows += data.rows_of(ds, a, min(a + cfg.batch_size, len(ds)))
        positions = sum(int(s["loss_mask"].sum()) for s in rows)
    hidden = [
        _hidden(head, rows[a : a + cfg.batch_size], tok.pad_token_id, device)
        for a in range(0, len(rows), cfg.batch_size)
    ]
    if not head.fast:
        raise InputError(
            "--sketch-rank needs a teacher whose logits are its output layer on the final hidden state, and this "
            "one processes its logits further (soft-capping or scaling); use --sketch-rank 0"
        )
    if not group.writer:
        return None
    out = head.model.get_output_embeddings()
    weight = models.full_tensor(out.weight)[: head.vocab_size]
    bias = None if getattr(out, "bias", None) is None else models.full_tensor(out.bias)[: head.vocab_size]
    return writer.store_sketch(teachers.fit_sketch(torch.cat(hidden), weight, bias, cfg.sketch_rank))


def _borrowed_sketch(cfg, plan) -> dict:
    """--sketch-from's sketch, refused in one line unless it is one of this teacher at this rank."""
    source = storage.open_cache(cfg.sketch_from)
    sketch, theirs = source.sketch(), source.manifest["identity"]["teacher"]
    ours = plan["identity"]["teacher"]
    if sketch is None or source.encoding["sketch"]["rank"] != cfg.sketch_rank:
        raise InputError(f"--sketch-from {cfg.sketch_from} holds no sketch of rank {cfg.sketch_rank}")
    if (
        theirs.get("weights_fingerprint") != ours.get("weights_fingerprint")
        or source.manifest["vocab_size"] != plan["vocab_size"]
    ):
        raise InputError(
            f"--sketch-from {cfg.sketch_from} was written by another teacher; its sketch fits that one only"
        )
    return {k: v.ravel() for k, v in sketch.items()}


@torch.inference_mode()
def _hidden(head, samples, pad_id, device) -> torch.Tensor:
    c = batches.collate(samples, pad_id)
    return head.hidden_rows(*(c[k].to(device) for k in ("input_ids", "attention_mask", "row_index", "col_index")))


def _part_rows(cfg, head, part, tok, device, chunk, bar, sketch=None) -> tuple[list[dict], dict]:
    """A part's samples with their teacher rows, and its extra counts; samples with non-finite logits are skipped
    (or abort the run with --strict)."""
    results = [None] * len(part)
    lengths = np.array([len(s["input_ids"]) for s in part])
    longest_first = np.argsort(-lengths, kind="stable")  # each batch pads little
    for batch in batches.micro_batches(longest_first, lengths, cfg.batch_size, cfg.batch_tokens):
        fields = teacher_fields(cfg, head, [part[i] for i in batch], tok.pad_token_id, device, chunk, sketch)
        for i, res in zip(batch, fields):
            results[i] = res
        bar.update(sum(len(part[i]["input_ids"]) for i in batch))
    for s, res in zip(part, results):
        if res is None:
            msg = f"non-finite teacher logits in sample {s['sample_index']}"
            if cfg.strict:
                raise NonFiniteLogits(msg + " (--strict)")
            warnings.warn(msg + "; skipped")
    kept = [{**s, **res} for s, res in zip(part, results) if res is not None]
    return kept, {"truncated_samples": sum(int(s["truncated"]) for s in kept), "skipped_samples": len(part) - len(kept)}


def draw_uniforms(seed: int, batch: list[dict], n_temps: int, n: int) -> np.ndarray:
    """[T, P, n] uniforms for the tail draws of a batch's rows: each sample's from a generator seeded by (seed, its
    index), so a sample draws the same tokens whatever batch, shard or resumed run computes it."""
    per_sample = [
        np.random.default_rng([seed, int(s["sample_index"])]).random((n_temps, int(s["loss_mask"].sum()), n))
        for s in batch
    ]
    return np.concatenate(per_sample, axis=1) if per_sample else np.zeros((n_temps, 0, n))


@torch.inference_mode()
def teacher_fields(cfg: CacheTeacherConfig, head, samples: list[dict], pad_id: int, device, chunk: int, sketch=None):
    """Each sample's cached fields (top-k ids and log-probs, tail mass, target log-prob, row widths, tail draws and
    their log-probs, sketch coefficients), or None for a sample with non-finite teacher logits. The lm_head runs over
    `chunk` positions at a time."""
    c = batches.collate(samples, pad_id)
    hidden = head.hidden_rows(*(c[k].to(device) for k in ("input_ids", "attention_mask", "row_index", "col_index")))
    uniforms = (
        torch.from_numpy(draw_uniforms(cfg.seed, samples, len(cfg.temperatures), cfg.tail_draws))
        if cfg.tail_draws
        else None
    )
    pieces, sketches = [], []
    for a in range(0, len(hidden), chunk):
        logits = head.logits(hidden[a : a + chunk]).float()
        step = slice_rows(logits)
        for b in range(0, len(logits), step):
            at = slice(a + b, a + min(b + step, len(logits)))  # the slice's positions in the batch
            u = uniforms[:, at] if uniforms is not None else None
            pieces.append(position_fields(cfg, logits[b : b + step], c["targets"][at], u))
        if sketch:
            sketches.append(teachers.sketch_coeffs(hidden[a : a + chunk], sketch).cpu().numpy())
    empty = _no_positions(cfg)
    fields = {
        key: np.concatenate([p[key] for p in pieces], axis=POSITION_AXIS.get(key, 0)) if pieces else empty[key]
        for key in empty
        if key != "sketch"
    }
    if sketch:
        fields["sketch"] = np.concatenate(sketches) if sketches else empty["sketch"]
    out, start = [], 0
    for s in samples:
        at = slice(start, start + int(s["loss_mask"].sum()))
        start = at.stop
        if not fields["finite"][at].all():
            out.append(None)
            continue
        out.append(
            {
                key: v[:, at] if key in POSITION_AXIS else v[at]
                for key, v in fields.items()
                if key != "finite" and (key not in ("draws", "draw_logprobs") or cfg.tail_draws)
            }
        )
    return out


POSITION_AXIS = {"topk_logprobs": 1, "tail_logmass": 1, "target_logprob": 1, "draws": 1, "draw_logprobs": 1}


FIRST_WIDTH = 64  # top-p rows are sorted this wide first; only rows whose prefix needs more are sorted wider


def _rows(cfg: CacheTeacherConfig, logits: torch.Tensor, targets: torch.Tensor) -> tuple[dict, np.ndarray]:
    """teachers.topk_rows at cfg.top_k, [P, top_k] with ids −1 and log-probs −inf past what a row keeps, and each
    row's kept width (codecs.top_p_widths): a top-p row whose prefix ends within FIRST_WIDTH entries is sorted that
    wide only (a top-k over the whole vocabulary costs with its k), and its tail is the mass outside those entries."""
    k, first, draws = cfg.top_k, min(cfg.top_k, FIRST_WIDTH), bool(cfg.tail_draws)
    if cfg.top_p is None or first == k or cfg.min_k >= first:
        r = teachers.topk_rows(logits, k, cfg.temperatures, targets, weights=draws)
        return r, top_p_widths(r["logprobs"][0].cpu().numpy(), cfg.top_p, cfg.min_k)
    r = teachers.topk_rows(logits, first, cfg.temperatures, targets, weights=draws)
    widths = top_p_widths(r["logprobs"][0].cpu().numpy(), cfg.top_p, cfg.min_k)
    pad = (0, k - first)
    r["ids"] = torch.nn.functional.pad(r["ids"], pad, value=-1)
    r["logprobs"] = torch.nn.functional.pad(r["logprobs"], pad, value=float("-inf"))
    wider = np.nonzero(widths >= first)[0]
    if len(wider):
        rows = torch.from_numpy(wider).to(logits.device)
        full = teachers.topk_rows(logits[rows], k, cfg.temperatures, targets[rows], weights=draws)
        r["ids"][rows], r["logprobs"][:, rows], r["tail"][:, rows] = full["ids"], full["logprobs"], full["tail"]
        for key in ("weights", "sums") if draws else ():
            for mine, wide in zip(r[key], full[key]):
                mine[rows] = wide
        widths[wider] = top_p_widths(full["logprobs"][0].cpu().numpy(), cfg.top_p, cfg.min_k)
    return r, widths


def position_fields(cfg: CacheTeacherConfig, logits: torch.Tensor, targets: torch.Tensor, uniforms) -> dict:
    """The cached fields of a chunk of positions, as numpy, from their float32 logits."""
    r, widths = _rows(cfg, logits, targets.to(logits.device))
    lp = r["logprobs"].cpu().numpy()
    out = {
        "topk_ids": r["ids"].cpu().numpy(),
        "topk_logprobs": lp,
        "tail_logmass": r["tail"].cpu().numpy(),
        "target_logprob": r["target"].cpu().numpy(),
        "widths": widths,
        "finite": r["finite"].cpu().numpy(),
        "draws": _no_positions(cfg)["draws"],
        "draw_logprobs": _no_positions(cfg)["draw_logprobs"],
    }
    if cfg.tail_draws:
        widths_t = torch.from_numpy(widths).to(logits.device)
        draws = teachers.draw_tail(logits, r, widths_t, cfg.temperatures, uniforms.to(logits.device))
        out["draw_logprobs"] = teachers.drawn_logprobs(logits, draws, cfg.temperatures, r).cpu().numpy()
        out["draws"] = draws.cpu().numpy()
    return out


def _no_positions(cfg: CacheTeacherConfig) -> dict:
    k, nt = cfg.top_k, len(cfg.temperatures)
    return {
        "topk_ids": np.zeros((0, k), np.int64),
        "topk_logprobs": np.zeros((nt, 0, k), np.float32),
        "tail_logmass": np.zeros((nt, 0), np.float32),
        "target_logprob": np.zeros((nt, 0), np.float32),
        "widths": np.zeros(0, np.int64),
        "draws": np.zeros((nt, 0, cfg.tail_draws), np.int64),
        "draw_logprobs": np.zeros((nt, 0, cfg.tail_draws), np.float32),
        "sketch": np.zeros((0, cfg.sketch_rank), np.float32),
        "finite": np.zeros(0, bool),
    }
