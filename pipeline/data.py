"""Datasets to token sequences with a loss mask: instruction pairs (response tokens distilled, EOS included)
or plain text (every token after the first; each text ends in --text-end: EOS by default).

Tokenization runs through `datasets.map` (batched, `num_proc` workers, fast tokenizers) into an Arrow file in the
datasets cache, memory-mapped: token ids never sit in memory as a Python list of the whole dataset. The file is
named by a fingerprint of the source, the tokenizer and the options, so every process and every shard job reuses
one tokenized copy (a file lock lets the first one write it while the others wait). Each row also gets an 8-byte
digest of its tokens, so the dataset's content hash is one pass over 8 bytes per row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import DataError

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
TOKENIZE_VERSION = "4"  # bump when the tokenization below changes what it produces


def load_rows(cfg: DataConfig):
    """A datasets.Dataset from local files, a saved dataset folder, or a hub name."""
    import datasets

    path = Path(cfg.source)
    try:
        if path.is_file():
            if not path.read_bytes()[:4096].strip():
                raise DataError(f"dataset {cfg.source!r} split {cfg.split!r} is empty")
            if path.suffix == ".arrow":
                ds = datasets.Dataset.from_file(str(path))
            elif path.suffix in FILE_BUILDERS:
                ds = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
            else:
                raise DataError(f"{path}: unknown file type {path.suffix!r}; use json, jsonl, parquet, csv or arrow")
        elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise DataError(f"split {cfg.split!r} not in {path} (splits: {', '.join(ds)}); pass --split")
                ds = ds[cfg.split]
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=cfg.split)
        elif path.exists() or "/" in cfg.source and cfg.source.startswith((".", "/")):
            raise DataError(f"{cfg.source}: not a dataset file or folder")
        else:
            ds = datasets.load_dataset(cfg.source, split=cfg.split)
    except DataError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cause = e.__cause__ or e.__context__
        if cause is not None and str(cause).strip():
            msg += f" ({str(cause).strip().splitlines()[0]})"
        raise DataError(f"cannot read dataset {cfg.source!r} split {cfg.split!r}: {msg}") from e
    fields = [
        f
        for f in (cfg.prompt_field, cfg.response_field, cfg.text_field, cfg.response_ids_field, cfg.behavior_field)
        if f
    ]
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(
            f"column {missing[0]!r} not in {cfg.source} (columns: {', '.join(ds.column_names)}); "
            "pass the right --prompt-field/--response-field/--text-field"
        )
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.source!r} split {cfg.split!r} is empty")
    return ds


def template_name(tokenizer, cfg: DataConfig) -> str:
    if cfg.text_field:
        return "plain-text"
    return "chat-template" if getattr(tokenizer, "chat_template", None) else "plain-instruction"


def prompt_text(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def encode_instructions(tokenizer, prompts: list[str], responses: list[str]) -> tuple[list, list]:
    """Prompt ids and response ids (ending in EOS) for a batch of pairs, tokenized in two batched calls."""
    if getattr(tokenizer, "chat_template", None):
        heads, tails = [], []
        for prompt, response in zip(prompts, responses):
            head = prompt_text(tokenizer, prompt)
            full = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
            )
            if not full.startswith(head):
                raise DataError(
                    "the tokenizer's chat template does not render the prompt as a prefix of the "
                    "conversation; this template is not supported for distillation"
                )
            heads.append(head)
            tails.append(full[len(head) :].rstrip("\n"))
        p_ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(tails, add_special_tokens=False)["input_ids"] if tails else []
    else:
        p_ids = tokenizer([PLAIN_TEMPLATE.format(prompt=p) for p in prompts])["input_ids"]
        r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    eos = tokenizer.eos_token_id
    if eos is not None:
        r_ids = [r if r and r[-1] == eos else r + [eos] for r in r_ids]
    return p_ids, r_ids


def text_end_id(tokenizer, text_end: str) -> int | None:
    """The token appended to each plain text: the tokenizer's EOS, none, or a token of its vocabulary by name."""
    if text_end == "none":
        return None
    if text_end == "eos":
        return tokenizer.eos_token_id
    token_id = tokenizer.convert_tokens_to_ids(text_end)
    if token_id is None or (token_id == tokenizer.unk_token_id and text_end != tokenizer.unk_token):
        raise DataError(f"--text-end {text_end!r} is not a token of the tokenizer; give eos, none or one of its tokens")
    return token_id


def as_texts(values, field: str, indices: list[int]) -> list[str]:
    """A column's values, each checked to be text (a null or a number is refused, never turned into "None")."""
    for v, i in zip(values, indices):
        if not isinstance(v, str):
            raise DataError(f"row {i}: field {field!r} is {v!r} ({type(v).__name__}), not text; fix or drop that row")
    return list(values)


def _generated(batch, response_ids_field, behavior_field, indices, vocab_size) -> tuple[list, list | None]:
    """Generated rows' response ids (each a token of the vocabulary) and behavior log-probs (finite, ≤ 0)."""
    ids = [np.asarray(r if r is not None else [], np.int64) for r in batch[response_ids_field]]
    for r, i in zip(ids, indices):
        if r.size and (r.min() < 0 or r.max() >= vocab_size):
            raise DataError(
                f"row {i}: {response_ids_field!r} holds token id {int(r.min() if r.min() < 0 else r.max())}"
                f", outside the tokenizer's {vocab_size} tokens; were these rows generated with it?"
            )
    if not behavior_field:
        return [r.tolist() for r in ids], None
    behavior = [np.asarray(b if b is not None else [], np.float64) for b in batch[behavior_field]]
    for b, i in zip(behavior, indices):
        if not np.isfinite(b).all() or (b > 1e-6).any():
            raise DataError(f"row {i}: {behavior_field!r} holds a log-probability that is NaN, infinite or above 0")
    return [r.tolist() for r in ids], [b.tolist() for b in behavior]


def _tokenize_batch(
    batch,
    indices,
    tokenizer,
    text_field,
    text_end,
    prompt_field,
    response_field,
    max_length,
    response_ids_field=None,
    behavior_field=None,
    pieces=None,
):
    """datasets.map function: a batch of rows (their indices) → input_ids, loss_mask, truncated, length, digest,
    the text the distilled tokens spell (prompt_text, text) with each token's text_end (alignment.text_ends, from
    the tokenizer's `pieces`), and behavior_logprob (one per distilled token) for generated rows."""
    behavior = None
    if text_field:
        texts = as_texts(batch[text_field], text_field, indices)
        prompts = [""] * len(texts)
        ids = tokenizer(texts)["input_ids"]
        end = text_end_id(tokenizer, text_end)
        ids = [x + [end] if end is not None else x for x in ids]
        masks = [[0] + [1] * (len(x) - 1) for x in ids]
        spans = ids
    else:
        prompts = as_texts(batch[prompt_field], prompt_field, indices)
        if response_ids_field:  # generated rows: no text of their own
            texts = [""] * len(prompts)
            p_ids = encode_instructions(tokenizer, prompts, texts)[0]
            r_ids, behavior = _generated(batch, response_ids_field, behavior_field, indices, len(tokenizer))
        else:
            texts = as_texts(batch[response_field], response_field, indices)
            p_ids, r_ids = encode_instructions(tokenizer, prompts, texts)
        ids = [p + r for p, r in zip(p_ids, r_ids)]
        masks = [[0] * len(p) + [1] * len(r) for p, r in zip(p_ids, r_ids)]
        spans = [[-1] * len(p) + r for p, r in zip(p_ids, r_ids)]  # the response's tokens spell the text
    out = {"input_ids": [], "loss_mask": [], "truncated": [], "length": [], "digest": []}
    out.update(_text_fields(tokenizer, pieces, prompts, texts, spans, max_length))
    if behavior is not None:
        out["behavior_logprob"] = []
    for n, (x, m) in enumerate(zip(ids, masks)):
        out["truncated"].append(len(x) > max_length)
        x, m = np.asarray(x[:max_length], np.int32), np.asarray(m[:max_length], np.uint8)
        m[0] = 0  # token 0 has no prediction
        out["input_ids"].append(x)
        out["loss_mask"].append(m)
        out["length"].append(len(x))
        digest = hashlib.blake2b(x.astype("<i4").tobytes() + b"|" + m.tobytes(), digest_size=8).digest()
        out["digest"].append(int.from_bytes(digest, "little", signed=True))
        if behavior is not None:  # one per distilled response token (the first is lost
            skip = masks[n][0]  # only when the prompt is empty)
            kept = behavior[n][skip : skip + int(m.sum())]
            if len(behavior[n]) != len(r_ids[n]) or len(kept) != int(m.sum()):
                raise DataError(
                    f"row {indices[n]}: {len(behavior[n])} behavior log-probs for {len(r_ids[n])} response tokens"
                )
            out["behavior_logprob"].append(np.asarray(kept, np.float32))
    return out


def _text_fields(tokenizer, pieces, prompts, texts, spans, max_length) -> dict:
    """prompt_text, text and per token text_end (−1 for a token id of −1 in `spans`: not part of the text)."""
    from pipeline import alignment

    ends = []
    for text, tokens in zip(texts, spans):
        tokens = np.asarray(tokens, np.int64)
        e = np.full(len(tokens), alignment.NOT_TEXT, np.int32)
        first = int(np.argmax(tokens >= 0)) if (tokens >= 0).any() else len(tokens)
        if pieces is not None and text:
            e[first:] = alignment.text_ends(
                tokens[first:], pieces, text.encode(), tokenizer.all_special_ids, tokenizer.eos_token_id
            )
        ends.append(e[:max_length])
    return {"prompt_text": list(prompts), "text": list(texts), "text_end": ends}


def tokenize_texts(tokenizer, prompts, texts, plain: bool, max_length: int, pieces) -> dict:
    """(prompt, text) pairs tokenized as `tokenized` does (plain texts ending in EOS): columns input_ids,
    loss_mask, text_end, … (a cache's texts for a student of another tokenizer)."""
    fields = {"text_field": "text"} if plain else {"prompt_field": "prompt", "response_field": "text"}
    batch = {"prompt": list(prompts), "text": list(texts)}
    kwargs = {"text_field": None, "prompt_field": None, "response_field": None, **fields}
    return _tokenize_batch(batch, list(range(len(texts))), tokenizer, text_end="eos", max_length=max_length,
                           pieces=pieces, **kwargs)  # fmt: skip


def text_pieces(tokenizer) -> list[bytes] | None:
    """The tokenizer's token bytes (alignment.token_bytes), or None when they cannot be told: its caches then
    record no alignment."""
    from pipeline import alignment

    return alignment.token_bytes(tokenizer) if alignment.byte_scheme(tokenizer) else None


def tokenized(cfg: DataConfig, tokenizer, num_proc: int = 1, progress: bool = True):
    """The dataset tokenized: a memory-mapped datasets.Dataset (numpy format) with columns input_ids (int32),
    loss_mask (uint8), truncated, length and digest, one row per source row (token j is distilled iff
    loss_mask[j] = 1). Reused from the datasets cache when the source, tokenizer and options are unchanged."""
    import datasets
    from filelock import FileLock

    rows = load_rows(cfg)
    key = hashlib.sha256(
        json.dumps(
            {
                "rows": rows._fingerprint,
                "tokenizer": _tokenizer_fingerprint(tokenizer),
                "version": TOKENIZE_VERSION,
                **{k: v for k, v in asdict(cfg).items() if k not in ("source", "split", "limit")},
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    features = _features(cfg)
    kwargs = dict(
        batched=True,
        with_indices=True,
        batch_size=1000,
        remove_columns=rows.column_names,
        features=features,
        new_fingerprint=f"tok{key}",
        num_proc=num_proc if num_proc > 1 and len(rows) > 1 else None,
        fn_kwargs={
            "tokenizer": tokenizer,
            "text_field": cfg.text_field,
            "text_end": cfg.text_end,
            "prompt_field": cfg.prompt_field,
            "response_field": cfg.response_field,
            "max_length": cfg.max_length,
            "response_ids_field": cfg.response_ids_field,
            "behavior_field": cfg.behavior_field,
            "pieces": text_pieces(tokenizer),
        },
        desc=f"tokenize {Path(cfg.source).name}",
    )
    if not progress:
        datasets.disable_progress_bars()
    try:
        if rows.cache_files:
            lock = Path(rows.cache_files[0]["filename"]).parent / f"tok{key}.lock"
            with FileLock(str(lock)):
                out = rows.map(_tokenize_batch, **kwargs)
        else:
            out = rows.map(_tokenize_batch, **kwargs)
    finally:
        if not progress:
            datasets.enable_progress_bars()
    return out.with_format("numpy")


def _features(cfg: DataConfig):
    import datasets

    columns = {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "loss_mask": datasets.Sequence(datasets.Value("uint8")),
        "truncated": datasets.Value("bool"),
        "length": datasets.Value("int32"),
        "digest": datasets.Value("int64"),
        "prompt_text": datasets.Value("string"),
        "text": datasets.Value("string"),
        "text_end": datasets.Sequence(datasets.Value("int32")),
    }
    if cfg.behavior_field:
        columns["behavior_logprob"] = datasets.Sequence(datasets.Value("float32"))
    return datasets.Features(columns)


def _tokenizer_fingerprint(tok) -> str:
    from pipeline.models import tokenizer_fingerprint

    return tokenizer_fingerprint(tok)


def content_sha256(ds) -> str:
    """sha256 over every row's 8-byte digest, in order: content-sensitive, one pass over 8 bytes per row."""
    h = hashlib.sha256()
    col = ds.data.column("digest")
    for chunk in col.chunks:
        h.update(chunk.to_numpy(zero_copy_only=False).astype("<i8").tobytes())
    return h.hexdigest()


def fingerprint(ds, tokenizer, cfg: DataConfig) -> dict:
    """The dataset's identity in a cache manifest (with the models that generated it, for generated rows)."""
    fields = {k: v for k, v in asdict(cfg).items() if k.endswith("_field") and v}
    out = {
        "source": cfg.source,
        "split": cfg.split,
        "fields": fields,
        "template": template_name(tokenizer, cfg),
        "max_length": cfg.max_length,
        "limit": cfg.limit,
        "content_sha256": content_sha256(ds),
        "num_rows": len(ds),
    }
    rows = load_rows(cfg)
    if "generator" in rows.column_names:
        seen = {json.dumps(g, sort_keys=True) for g in rows.data.column("generator").to_pylist()}
        out["generated_by"] = [json.loads(g) for g in sorted(seen)]
    return out


def rows_of(ds, start: int, stop: int) -> list[dict]:
    """Rows [start, stop) of a tokenized dataset as samples {sample_index, input_ids, loss_mask, truncated} (and
    behavior_logprob for generated rows)."""
    batch = ds[start:stop]
    out = []
    for i in range(stop - start):
        s = {
            "sample_index": start + i,
            "input_ids": np.asarray(batch["input_ids"][i], np.int64),
            "loss_mask": np.asarray(batch["loss_mask"][i], np.uint8),
            "truncated": bool(batch["truncated"][i]),
        }
        if "behavior_logprob" in batch:
            s["behavior_logprob"] = np.asarray(batch["behavior_logprob"][i], np.float32)
        if "text_end" in batch:
            s["prompt_text"], s["text"] = str(batch["prompt_text"][i]).encode(), str(batch["text"][i]).encode()
            s["text_end"] = np.asarray(batch["text_end"][i], np.int32)
        out.append(s)
    return out
