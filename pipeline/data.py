"""Datasets to token sequences with a loss mask: instruction pairs (response tokens distilled, EOS included)
or plain text (every token after the first)."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


class DataError(ValueError):
    pass


@dataclass
class DataConfig:
    source: str
    split: str = "train"
    prompt_field: str | None = None
    response_field: str | None = None
    text_field: str | None = None
    max_length: int = 1024
    limit: int | None = None

    def __post_init__(self):
        instruction = self.prompt_field is not None or self.response_field is not None
        if instruction == (self.text_field is not None):
            raise DataError("give either --prompt-field and --response-field (instruction data) or --text-field "
                            "(plain text)")
        if instruction and (self.prompt_field is None or self.response_field is None):
            raise DataError("instruction data needs both --prompt-field and --response-field")
        if self.max_length < 2:
            raise DataError(f"--max-length {self.max_length} is too short; it must be at least 2")


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
    fields = [f for f in (cfg.prompt_field, cfg.response_field, cfg.text_field) if f]
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(f"column {missing[0]!r} not in {cfg.source} (columns: {', '.join(ds.column_names)}); "
                        "pass the right --prompt-field/--response-field/--text-field")
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
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(prompt=prompt)


def encode_instruction(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids ending in EOS)."""
    eos = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        head = prompt_text(tokenizer, prompt)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the "
                            "conversation; this template is not supported for distillation")
        p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(full[len(head):].rstrip("\n"), add_special_tokens=False)["input_ids"]
    else:
        p_ids = tokenizer(PLAIN_TEMPLATE.format(prompt=prompt))["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if eos is not None and (not r_ids or r_ids[-1] != eos):
        r_ids = r_ids + [eos]
    return p_ids, r_ids


def tokenize(rows, tokenizer, cfg: DataConfig) -> list[dict]:
    """Rows → [{sample_index, input_ids, loss_mask, truncated}] with token j distilled iff loss_mask[j] = 1."""
    out = []
    for i, row in enumerate(rows):
        if cfg.text_field:
            ids = tokenizer(str(row[cfg.text_field]))["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            mask = [0] + [1] * (len(ids) - 1)
        else:
            p_ids, r_ids = encode_instruction(tokenizer, str(row[cfg.prompt_field]), str(row[cfg.response_field]))
            ids = p_ids + r_ids
            mask = [0] * len(p_ids) + [1] * len(r_ids)
        truncated = len(ids) > cfg.max_length
        ids, mask = ids[:cfg.max_length], mask[:cfg.max_length]
        mask[0] = 0
        out.append({"sample_index": i, "input_ids": np.asarray(ids, np.int64),
                    "loss_mask": np.asarray(mask, np.uint8), "truncated": truncated})
    return out


def fingerprint(samples: list[dict], tokenizer, cfg: DataConfig) -> dict:
    h = hashlib.sha256()
    for s in samples:
        h.update(s["input_ids"].astype(np.int64).tobytes())
        h.update(s["loss_mask"].tobytes())
        h.update(b"|")
    fields = {k: v for k, v in asdict(cfg).items() if k.endswith("_field") and v}
    return {"source": cfg.source, "split": cfg.split, "fields": fields, "template": template_name(tokenizer, cfg),
            "max_length": cfg.max_length, "limit": cfg.limit, "content_sha256": h.hexdigest(),
            "num_rows": len(samples)}
