"""The two on-disk forms of a part's flat arrays: a Zarr v3 group with the sharding codec, or an Arrow IPC stream.

A backend only turns a dict of 1-D arrays into files in a folder and back; what the arrays mean is part.py's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

ZSTD_LEVEL = 3
CHUNK_BYTES = 1 << 22


class ZarrBackend:
    name = "zarr"
    data_name = "data.zarr"

    @staticmethod
    def write(folder: Path, arrays: dict) -> None:
        import zarr
        from zarr.codecs import BloscCodec

        group = zarr.open_group(folder / ZarrBackend.data_name, mode="w", zarr_format=3)
        for name, arr in arrays.items():
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

        group = zarr.open_group(folder / ZarrBackend.data_name, mode="r")
        return {name: group[name][...] for name in names}


class ArrowBackend:
    """One row; every array is a column of type large_list<dtype> whose single value is the array."""
    name = "arrow"
    data_name = "data.arrow"

    @staticmethod
    def write(folder: Path, arrays: dict) -> None:
        cols = {name: pa.LargeListArray.from_arrays(pa.array([0, len(a)], pa.int64()), pa.array(a))
                for name, a in arrays.items()}
        table = pa.table(cols)
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        with pa.OSFile(str(folder / ArrowBackend.data_name), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema, options=options) as w:
            w.write_table(table)

    @staticmethod
    def read(folder: Path, names: list[str]) -> dict:
        with pa.memory_map(str(folder / ArrowBackend.data_name)) as source:
            table = pa.ipc.open_stream(source).read_all()
        return {n: table[n].chunk(0).values.to_numpy(zero_copy_only=False) for n in names}


BACKENDS = {"zarr": ZarrBackend, "arrow": ArrowBackend}


def get(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown cache format {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
