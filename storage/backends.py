"""The two on-disk encodings of a columnar part: a Zarr v3 group with the sharding codec, or an Arrow IPC stream.

A backend only turns a part (dict of flat arrays, see part.py) into files in a folder and back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


ZARR_NAME = "data.zarr"
ARROW_NAME = "data.arrow"
ZSTD_LEVEL = 3
CHUNK_BYTES = 1 << 18


class ZarrBackend:
    name = "zarr"
    data_name = ZARR_NAME

    @staticmethod
    def write(folder: Path, part: dict) -> None:
        import zarr
        from zarr.codecs import BloscCodec

        group = zarr.open_group(folder / ZARR_NAME, mode="w", zarr_format=3)
        for name, arr in part.items():
            row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:])))
            rows = max(1, CHUNK_BYTES // row_bytes)
            shard_rows = max(rows, -(-arr.shape[0] // rows) * rows)
            tail = tuple(arr.shape[1:])
            compressor = BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="shuffle", typesize=arr.itemsize)
            z = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(rows,) + tail,
                                   shards=(shard_rows,) + tail, compressors=compressor, fill_value=0)
            if arr.size:
                z[...] = arr

    @staticmethod
    def read(folder: Path, names: list[str]) -> dict:
        import zarr

        group = zarr.open_group(folder / ZARR_NAME, mode="r")
        return {name: group[name][...] for name in names}


class ArrowBackend:
    """One row per sample: list columns whose flat values and offsets are exactly the part's arrays."""
    name = "arrow"
    data_name = ARROW_NAME

    @staticmethod
    def write(folder: Path, part: dict) -> None:
        def ragged(values, offsets):
            if values.ndim == 2:
                values = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
            else:
                values = pa.array(values)
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)

        cols = {"sample_index": pa.array(part["sample_index"])}
        for name, arr in part.items():
            if name in ("input_ids", "loss_mask"):
                cols[name] = ragged(arr, part["token_offsets"])
            elif name.startswith(("topk_", "tail_")):
                cols[name] = ragged(arr, part["position_offsets"])
        table = pa.table(cols)
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        with pa.OSFile(str(folder / ARROW_NAME), "wb") as sink, pa.ipc.new_stream(sink, table.schema, options=options) as w:
            w.write_table(table)

    @staticmethod
    def read(folder: Path, names: list[str]) -> dict:
        with pa.memory_map(str(folder / ARROW_NAME)) as source:
            table = pa.ipc.open_stream(source).read_all().combine_chunks()
        out = {}
        for col in {OFFSET_OWNER.get(n, n) for n in names}:
            if col == "sample_index":
                out[col] = table[col].to_numpy()
            else:
                out.update(_flatten(col, table[col].chunk(0) if table.num_rows else None, table.schema.field(col).type))
        return {n: out[n] for n in names}


OFFSET_OWNER = {"token_offsets": "input_ids", "position_offsets": "topk_ids"}


def _flatten(name, col, list_type):
    """A list column → its flat values (2-D for fixed-size lists) and its offsets."""
    inner = list_type.value_type
    width = inner.list_size if pa.types.is_fixed_size_list(inner) else None
    dtype = (inner.value_type if width else inner).to_pandas_dtype()
    if col is None:
        values = np.zeros((0, width) if width else (0,), dtype)
        offsets = np.zeros(1, np.int64)
    else:
        offsets = col.offsets.to_numpy().astype(np.int64)
        flat = col.values
        if width:
            flat = flat.values
        values = flat.to_numpy(zero_copy_only=False)
        if width:
            values = values.reshape(-1, width)
        values = values[offsets[0]:offsets[-1]]
        offsets = offsets - offsets[0]
    out = {name: values}
    if name == "input_ids":
        out["token_offsets"] = offsets
    elif name == "topk_ids":
        out["position_offsets"] = offsets
    return out


BACKENDS = {"zarr": ZarrBackend, "arrow": ArrowBackend}


def get(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown cache format {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
