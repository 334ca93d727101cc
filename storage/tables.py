"""A decoded part as Arrow tables of one row per sample, for the ecosystem's tools (datasets, Polars, DuckDB, axolotl).

The rows are built from the part's flat arrays and their offsets alone (list arrays over the same buffers), never by a
Python loop over samples or positions.

- `sample_table`: every field the cache decodes, named as `storage.part.sample` names them: per sample its tokens
  and loss mask (one entry per token), and per distilled position its head ids and log-probs (a list each: ragged where
  the encoding is), its tail log-mass, target log-prob, drawn ids, log-probs and inclusion log-weights, sketch.
- `axolotl_table`: axolotl's KD dataset layout (its plugin's collator consumes these columns): `input_ids`,
  `attention_mask`, `labels` (−100 where not distilled) and one row per token j, `target_token_ids[j]`,
  `target_logprobs[j]` and `target_mask[j]`, the teacher's head for token j + 1; empty where j + 1 is not distilled
  (its collator pads them with mask 0). The tail mass and the draws have no place there: axolotl renormalizes the head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from . import codecs
from . import manifest as manifest_io
from .errors import CacheMismatch, CorruptCache
from .reader import open_cache

PER_POSITION = ("tail_logmass", "target_logprob", "behavior_logprob")  # one value per distilled position
PER_DRAW = ("drawn_ids", "drawn_logprobs", "drawn_logweights", "drawn_counts")  # a list per distilled position


def lists(offsets: np.ndarray, values) -> pa.Array:
    """values (an array or an Arrow array) cut at offsets into one list each."""
    if offsets[-1] >= 2**31:
        raise CorruptCache(f"a part holds {offsets[-1]} values in one column; more than an Arrow list can address")
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _column(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.int32) if values.dtype.kind in "ui" and values.dtype.itemsize > 4 else values)


def sample_table(part: dict, t: int) -> pa.Table:
    """One row per sample of a decoded part (storage.part.decode) at temperature index t."""
    tokens, positions = part["token_offsets"], part["position_offsets"]
    cols = {
        "sample_index": pa.array(part["sample_index"].astype(np.int64)),
        "input_ids": lists(tokens, _column(part["input_ids"])),
        "loss_mask": lists(tokens, pa.array(part["loss_mask"].astype(np.uint8))),
        "topk_ids": lists(positions, lists(part["topk_offsets"], _column(part["topk_ids"]))),
        "topk_logprobs": lists(positions, lists(part["topk_offsets"], part[f"topk_logprobs_{t}"])),
    }
    for name in PER_POSITION:
        key = name if name == "behavior_logprob" else f"{name}_{t}"
        if key in part:
            cols[name] = lists(positions, pa.array(part[key]))
    for name in PER_DRAW:
        if f"{name}_{t}" in part:
            cols[name] = lists(positions, lists(part[f"drawn_offsets_{t}"], _column(part[f"{name}_{t}"])))
    if "sketch_coeffs" in part:
        sketch = part["sketch_coeffs"]
        rows = pa.FixedSizeListArray.from_arrays(pa.array(sketch.reshape(-1)), sketch.shape[1])
        cols["sketch_coeffs"] = lists(positions, rows)
    return pa.table(cols)


def axolotl_table(part: dict, t: int) -> pa.Table:
    """One row per sample in axolotl's KD layout: row j of a sample's targets is the teacher's head for token j + 1."""
    tokens, mask = part["token_offsets"], part["loss_mask"].astype(bool)
    predicts = np.append(mask[1:], False)  # token j's row describes token j + 1 ...
    predicts[tokens[1:] - 1] = False  # ... of the same sample
    if predicts.sum() != part["position_offsets"][-1]:
        raise CorruptCache(
            f"{predicts.sum()} distilled tokens follow a token; the part holds {part['position_offsets'][-1]} rows"
        )
    widths = np.zeros(len(mask), np.int64)
    widths[predicts] = np.diff(part["topk_offsets"])
    rows = codecs.offsets_of(widths)
    ids = part["input_ids"].astype(np.int64)
    return pa.table(
        {
            "input_ids": lists(tokens, pa.array(ids)),
            "attention_mask": lists(tokens, pa.array(np.ones(len(ids), np.int8))),
            "labels": lists(tokens, pa.array(np.where(mask, ids, -100))),
            "target_token_ids": lists(tokens, lists(rows, pa.array(part["topk_ids"].astype(np.int64)))),
            "target_logprobs": lists(tokens, lists(rows, pa.array(part[f"topk_logprobs_{t}"]))),
            "target_mask": lists(tokens, lists(rows, pa.array(np.ones(rows[-1], np.int8)))),
        }
    )


def padded_sample(row: dict) -> dict:
    """A row of the parquet layout (as datasets gives it: lists) as Cache[i] gives the sample: numpy arrays, each
    sample's teacher rows padded to its widest (ids −1, log-probs −inf)."""
    out = {}
    for name, value in row.items():
        if name in ("topk_ids", "topk_logprobs") or name in PER_DRAW:
            pad = -1 if name.endswith("_ids") else (0 if name == "drawn_counts" else -np.inf)
            dtype = np.int64 if name.endswith(("_ids", "_counts")) else np.float32
            flat = np.fromiter((x for r in value for x in r), dtype)
            offsets = codecs.offsets_of(np.fromiter(map(len, value), np.int64, len(value)))
            out[name] = codecs.padded_rows([(flat, pad)], offsets, 0, len(value))[0]
        else:
            out[name] = np.asarray(value)
    return out


TABLES = {"parquet": sample_table, "axolotl": axolotl_table}
INFO = "export.json"
DROPPED = {"parquet": [], "axolotl": ["tail_logmass", "target_logprob", "drawn tokens", "sketch"]}


def part_file(p: int) -> str:
    return f"part-{p:06d}.parquet"


def export(src, dst, layout: str = "parquet", temperature: float | None = None, progress: bool = True) -> dict:
    """The cache at src as one Parquet file of `layout` per part in dst, streamed part by part (one decoded part in
    memory), each file written whole and renamed into place: an interrupted export resumes with the parts it lacks.
    dst/export.json says what the folder holds (source cache key, layout, temperature, what the layout drops) and
    `complete` once every part is there."""
    cache = open_cache(src, temperature)
    out, t = Path(dst), cache.temperature_index
    info = {
        "source_cache_key": cache.manifest["cache_key"],
        "layout": layout,
        "temperature": cache.temperatures[t],
        "num_parts": cache.num_parts,
        "dropped": DROPPED[layout],
        "complete": False,
    }
    _claim(out, info)
    todo = [p for p in range(cache.num_parts) if not (out / part_file(p)).exists()]
    tokens = [cache.manifest["parts"][manifest_io.part_name(p)]["counts"]["tokens"] for p in todo]
    bar = tqdm(total=sum(tokens), unit="tok", unit_scale=True, desc=f"export {layout}", disable=not progress)
    rows = 0
    for p, n in zip(todo, tokens):
        table = TABLES[layout](cache.decode(p), t)
        manifest_io.write_atomic(out / part_file(p), _parquet(table))
        rows += table.num_rows
        bar.update(n)
    bar.close()
    manifest_io.write_json_atomic(out / INFO, {**info, "complete": True})
    return {"path": str(out), "parts_written": len(todo), "rows": rows, "num_parts": cache.num_parts}


def _claim(out: Path, info: dict) -> None:
    """The folder for this export: new, or holding an unfinished or finished export of the same cache and layout."""
    if (out / INFO).exists():
        old = manifest_io.read_json(out / INFO)
        if any(old.get(k) != info[k] for k in ("source_cache_key", "layout", "temperature")):
            raise CacheMismatch(
                f"{out} holds an export of another cache, layout or temperature ({old.get('layout')}); choose a "
                "new folder (nothing there is replaced)"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CacheMismatch(
            f"{out} already exists and is not an export; choose a new folder (nothing there is replaced)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for p in range(info["num_parts"]):
        manifest_io.remove_temporaries(out, part_file(p))
    if not (out / INFO).exists():
        manifest_io.write_json_atomic(out / INFO, info)


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
