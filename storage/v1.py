"""Reading format version 1: fixed-width [P, k] teacher rows, Arrow parts with one row per sample, no target
log-probabilities. A v1 part is returned in the version-2 encoded form (plain codecs), so one decoder serves both."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import backends


def encoding(manifest: dict) -> dict:
    k = manifest["k"]
    return {
        "top_k": k,
        "top_p": None,
        "min_k": k,
        "ids": {"codec": "plain", "dtype": manifest["dtypes"]["topk_ids"]},
        "logprobs": {"codec": manifest["dtypes"]["topk_logprobs"], "name": manifest["dtypes"]["topk_logprobs"]},
        "draws": None,
        "target_logprob": False,
        "behavior_logprob": False,
    }


def _names(n_temps: int) -> list[str]:
    names = ["sample_index", "token_offsets", "input_ids", "loss_mask", "position_offsets", "topk_ids"]
    return names + [n for t in range(n_temps) for n in (f"topk_logprobs_{t}", f"tail_logmass_{t}")]


def decode(backend: str, files: dict[str, bytes], manifest: dict) -> dict:
    """A v1 part's files (already checked against their checksums) in the v2 encoded form."""
    n_temps = len(manifest["temperatures"])
    if backend == "zarr":
        raw = backends.ZarrBackend.decode(files, _names(n_temps), {})
    else:
        raw = _read_arrow(files, n_temps)
    k = manifest["k"]
    out = {n: raw[n] for n in ("sample_index", "token_offsets", "input_ids", "loss_mask", "position_offsets")}
    n_pos = int(raw["position_offsets"][-1])
    out["topk_width"] = np.full(n_pos, k, np.uint32)
    out["topk_ids"] = raw["topk_ids"].reshape(-1)
    for t in range(n_temps):
        out[f"topk_logprobs_{t}"] = raw[f"topk_logprobs_{t}"].reshape(-1)
        out[f"tail_logmass_{t}"] = raw[f"tail_logmass_{t}"]
    return out


def _read_arrow(files: dict[str, bytes], n_temps: int) -> dict:
    """v1 Arrow: one row per sample; the list columns' flat values are the arrays, their offsets the offsets."""
    table = backends.read_arrow_table(files, "data.arrow").combine_chunks()
    out = {"sample_index": table["sample_index"].to_numpy()}
    for name in table.column_names[1:]:
        list_type = table.schema.field(name).type
        inner = list_type.value_type
        width = inner.list_size if pa.types.is_fixed_size_list(inner) else None
        dtype = (inner.value_type if width else inner).to_pandas_dtype()
        if table.num_rows == 0:
            values, offsets = np.zeros((0, width) if width else (0,), dtype), np.zeros(1, np.int64)
        else:
            col = table[name].chunk(0)
            offsets = col.offsets.to_numpy().astype(np.int64)
            flat = col.values.values if width else col.values
            values = flat.to_numpy(zero_copy_only=False)
            values = values.reshape(-1, width) if width else values
            values, offsets = values[offsets[0] : offsets[-1]], offsets - offsets[0]
        out[name] = values
        if name == "input_ids":
            out["token_offsets"] = offsets
        elif name == "topk_ids":
            out["position_offsets"] = offsets
    return out
