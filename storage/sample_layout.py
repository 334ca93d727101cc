"""The Arrow samples layout (`"layout": "samples"` in the plan): a part as an Arrow IPC file of one row per sample, so
that datasets, Polars and DuckDB see samples where the one-row layout shows them a part.

Every array of a part (part.array_names) is a column holding, per sample, the list of the array's entries that belong
to it: its tokens (input_ids, loss_mask), its rows (topk_width, tail_logmass_t, target_logprob_t, behavior_logprob,
drawn_width_t, sketch_scale), its head entries (topk_ids, topk_logprobs_t), its drawn entries (drawn_*_t) or its rows'
sketch codes. A list column's flat values are the array itself, so a reader takes one buffer per column and no loop
over samples. A bit-packed array is packed per sample, each sample's values padded with zeros to a multiple of 8
(8 values of b bits are b whole bytes): a sample's bytes decode alone, and the column's flat bytes are one stream of
the padded values. token_offsets and position_offsets are not stored: they are the list offsets of input_ids and
topk_width. Values stay encoded (bit-packed, power codes, float16), as in the other layouts.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from . import backends, codecs
from .errors import CorruptCache

DATA = "data.arrow"
DERIVED = {"token_offsets": "input_ids", "position_offsets": "topk_width", "text_offsets": "text"}
SCALARS = ("sample_index", "prompt_length")  # one value per sample: a plain column
SPAN = {  # what an array's entries belong to
    "input_ids": "tokens",
    "loss_mask": "tokens",
    "text_end": "tokens",
    "text": "text",
    "topk_width": "rows",
    "tail_logmass": "rows",
    "target_logprob": "rows",
    "behavior_logprob": "rows",
    "drawn_width": "rows",
    "sketch_scale": "rows",
    "topk_ids": "head",
    "topk_logprobs": "head",
    "drawn_ids": "drawn",
    "drawn_logprobs": "drawn",
    "drawn_counts": "drawn",
    "sketch_codes": "sketch",
}


def _split(name: str) -> tuple[str, str]:
    """("topk_logprobs", "1") for topk_logprobs_1; (name, "") for an array without a temperature index."""
    m = re.fullmatch(r"(.+)_(\d+)", name)
    return (m[1], m[2]) if m and m[1] in SPAN else (name, "")


def packed_bits(name: str, encoding: dict) -> int | None:
    """The bit width of an array stored bit-packed, else None."""
    base, _ = _split(name)
    ids, lp, sketch = encoding["ids"], encoding["logprobs"], encoding.get("sketch") or {}
    if base in ("topk_ids", "drawn_ids") and ids["codec"] == "bitpack":
        return ids["bits"]
    if base in ("topk_logprobs", "drawn_logprobs") and lp["codec"] == "power" and lp["bits"] != 8:
        return lp["bits"]
    if base == "sketch_codes" and sketch.get("bits", 8) != 8:
        return sketch["bits"]
    return None


def sample_offsets(structure: dict, encoding: dict) -> dict[str, np.ndarray]:
    """Per span (span_of), the [S + 1] offsets of each sample's entries, from token_offsets, position_offsets and the
    widths: computed once per part, shared by every array of the span."""
    tokens, rows = structure["token_offsets"], structure["position_offsets"]
    out = {"tokens": tokens, "rows": rows, "head": codecs.offsets_of(structure["topk_width"].astype(np.int64))[rows]}
    for name, widths in structure.items():
        base, t = _split(name)
        if base == "drawn_width":
            out[f"drawn_{t}"] = codecs.offsets_of(widths.astype(np.int64))[rows]
    if encoding.get("sketch"):
        out["sketch"] = rows * encoding["sketch"]["rank"]
    if "text_offsets" in structure:
        out["text"] = structure["text_offsets"]
    return out


def span_of(name: str) -> str:
    """Which sample_offsets an array's entries follow: tokens, rows, head, drawn_{t} (a temperature's draws), sketch."""
    base, t = _split(name)
    return f"drawn_{t}" if SPAN[base] == "drawn" else SPAN[base]


def entry_offsets(name: str, structure: dict, encoding: dict) -> np.ndarray:
    """[S + 1] offsets of sample s's entries of array `name`."""
    return sample_offsets(structure, encoding)[span_of(name)]


def _padded(offsets: np.ndarray) -> np.ndarray:
    """Offsets of each sample's entries padded to a multiple of 8."""
    return codecs.offsets_of(-(-np.diff(offsets) // 8) * 8)


def _kept(offsets: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """Which entries of the padded sequence are values: every block of 8 but each sample's last, partial one."""
    keep = np.ones((padded[-1] // 8, 8), bool)
    rest = np.diff(offsets) % 8
    partial = np.nonzero(rest)[0]
    keep[padded[1:][partial] // 8 - 1] = np.arange(8) < rest[partial][:, None]
    return keep.ravel()


def to_table(arrays: dict, encoding: dict) -> pa.Table:
    cols = {name: pa.array(arrays[name]) for name in SCALARS if name in arrays}
    spans = sample_offsets(arrays, encoding)
    for name, a in arrays.items():
        if name in SCALARS or name in DERIVED:
            continue
        offsets, bits = spans[span_of(name)], packed_bits(name, encoding)
        if bits:
            padded = _padded(offsets)
            if padded[-1] != offsets[-1]:  # repacked with padding; without any, the stream is already those bytes
                values = np.zeros(padded[-1], np.uint32)
                values[_kept(offsets, padded)] = codecs.unpack_bits(a, bits, int(offsets[-1]))
                a = codecs.pack_bits(values, bits)
            offsets = padded // 8 * bits
        cols[name] = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(a))
    return pa.table(cols)


def from_table(table: pa.Table, names: list[str], encoding: dict, unpacked: bool = False) -> dict:
    """The part's arrays `names` as the other layouts store them (bit streams continuous again), or with unpacked
    set, bit-packed arrays as their uint32 codes (what decoding takes, without packing them again)."""
    lists = {name: _column(table, name) for name in table.column_names if name not in SCALARS}
    structure = {
        **{d: lists[col].offsets.to_numpy() for d, col in DERIVED.items() if col in lists},
        **{n: lists[n].values.to_numpy() for n in lists if _split(n)[0] in ("topk_width", "drawn_width")},
    }
    out, spans = {}, sample_offsets(structure, encoding)
    for name in names:
        if name in DERIVED or name in SCALARS:
            out[name] = structure.get(name) if name in DERIVED else table[name].to_numpy()
            continue
        if name not in lists:
            raise CorruptCache(f"column {name} is missing")
        out[name] = _values(lists[name], name, spans[span_of(name)], encoding, unpacked)
    return out


def _column(table: pa.Table, name: str) -> pa.Array:
    chunks = table[name]
    col = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
    if not pa.types.is_large_list(col.type):
        raise CorruptCache(f"column {name} is {col.type}, not a list per sample")
    if col.null_count or col.offset or col.values.null_count:
        raise CorruptCache(f"column {name} holds nulls or sliced lists")
    return col


def _values(col: pa.Array, name: str, offsets: np.ndarray, encoding: dict, unpacked: bool) -> np.ndarray:
    bits = packed_bits(name, encoding)
    padded = _padded(offsets) if bits else offsets
    stored = padded // 8 * bits if bits else offsets
    if len(col) != len(offsets) - 1 or not np.array_equal(col.offsets.to_numpy(), stored):
        raise CorruptCache(f"column {name}'s lists disagree with the samples' widths")
    values = col.values.to_numpy(zero_copy_only=False)
    if len(values) != stored[-1]:
        raise CorruptCache(f"column {name} holds {len(values)} values where its lists hold {stored[-1]}")
    if not bits:
        return values
    codes = codecs.unpack_bits(values, bits, int(padded[-1]))
    if padded[-1] != offsets[-1]:  # some sample's count is not a multiple of 8 (as in to_table)
        codes = codes[_kept(offsets, padded)]
    return codes if unpacked else codecs.pack_bits(codes, bits)


class ArrowSamplesBackend:
    """The parts' backend for `"layout": "samples"`: encode/decode as the other backends, with the encoding bound."""

    name = "arrow"
    data_name = DATA

    def __init__(self, encoding: dict):
        self.encoding = encoding

    def encode(self, arrays: dict) -> dict[str, bytes]:
        return {DATA: backends.arrow_bytes(to_table(arrays, self.encoding), ipc_file=True)}

    @staticmethod
    def needs(names: list[str]):
        return None  # one file holds every array

    def decode(self, files: dict[str, bytes], names: list[str], expected: dict, unpacked: bool = False) -> dict:
        table = backends.read_arrow_table(files, DATA, ipc_file=True)
        for col in ("sample_index", "input_ids", "topk_width"):
            if col not in table.column_names:
                raise CorruptCache(f"column {col} is missing")
        out = from_table(table, names, self.encoding, unpacked)
        for name, a in out.items():
            if a.dtype != np.uint32:  # unpacked codes have their count checked where they are unpacked
                backends.check_shape(name, a.shape, expected)
        return out
