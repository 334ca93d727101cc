"""The two on-disk forms of a part's flat arrays: a Zarr v3 group with the sharding codec, or an Arrow IPC stream.

A backend turns a dict of 1-D arrays into the files of a part folder ({relative path: bytes}) and back; it never
touches the disk (part_folder.py does, with the checksums) and knows nothing of what the arrays mean (part.py).
Decoding checks each array's stored shape against the length the caller expects before reading it, so a crafted
shape cannot make it allocate more than the part's counts say.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import CacheError, CorruptCache

ZSTD_LEVEL = 3
CHUNK_BYTES = 1 << 22


def check_shape(name: str, shape: tuple, expected: dict) -> None:
    want = expected.get(name)
    if want is not None and tuple(shape) != tuple(want):
        raise CorruptCache(f"array {name} has shape {tuple(shape)}, the part's counts say {tuple(want)}")


class ZarrBackend:
    name = "zarr"
    data_name = "data.zarr"

    @staticmethod
    def encode(arrays: dict) -> dict[str, bytes]:
        import zarr
        from zarr.codecs import BloscCodec
        from zarr.storage import MemoryStore

        store: dict = {}
        group = zarr.open_group(store=MemoryStore(store), mode="w", zarr_format=3)
        for name, arr in arrays.items():
            row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:])))
            rows = max(1, min(CHUNK_BYTES // row_bytes, arr.shape[0]))  # a chunk never larger than the array:
            # zarr pads a partial chunk to its full size before compressing it
            shard_rows = max(rows, -(-arr.shape[0] // rows) * rows)
            tail = tuple(arr.shape[1:])
            compressor = BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="shuffle", typesize=arr.itemsize)
            z = group.create_array(
                name,
                shape=arr.shape,
                dtype=arr.dtype,
                chunks=(rows,) + tail,
                shards=(shard_rows,) + tail,
                compressors=compressor,
                fill_value=0,
            )
            if arr.size:
                z[...] = arr
        return {f"{ZarrBackend.data_name}/{key}": buf.to_bytes() for key, buf in store.items()}

    @staticmethod
    def needs(names: list[str]):
        """Which of a part's files reading `names` takes: the group's metadata and those arrays' folders."""
        prefixes = tuple(f"{ZarrBackend.data_name}/{n}/" for n in names)
        return lambda rel: rel == f"{ZarrBackend.data_name}/zarr.json" or rel.startswith(prefixes)

    @staticmethod
    def decode(files: dict[str, bytes], names: list[str], expected: dict, unpacked: bool = False) -> dict:
        import zarr
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage import MemoryStore

        prefix = ZarrBackend.data_name + "/"
        make = default_buffer_prototype().buffer.from_bytes
        store = MemoryStore(
            {k[len(prefix) :]: make(v) for k, v in files.items() if k.startswith(prefix)}, read_only=True
        )
        group = zarr.open_group(store=store, mode="r", zarr_format=3)
        out = {}
        for name in names:
            if name not in group:
                raise CorruptCache(f"array {name} is missing")
            z = group[name]
            check_shape(name, z.shape, expected)
            out[name] = z[...]
        return out


class ArrowBackend:
    """One row; every array is a column of type large_list<dtype> whose single value is the array (the layout of Arrow
    caches written before "layout": "samples", and of the sketch folder)."""

    name = "arrow"
    data_name = "data.arrow"

    @staticmethod
    def encode(arrays: dict) -> dict[str, bytes]:
        cols = {
            name: pa.LargeListArray.from_arrays(pa.array([0, len(a)], pa.int64()), pa.array(a))
            for name, a in arrays.items()
        }
        return {ArrowBackend.data_name: arrow_bytes(pa.table(cols))}

    @staticmethod
    def needs(names: list[str]):
        return None  # one file holds every array

    @staticmethod
    def decode(files: dict[str, bytes], names: list[str], expected: dict, unpacked: bool = False) -> dict:
        table = read_arrow_table(files, ArrowBackend.data_name)
        out = {}
        for name in names:
            if name not in table.column_names:
                raise CorruptCache(f"array {name} is missing")
            col = table[name]
            if col.num_chunks != 1 or len(col) != 1:
                raise CorruptCache(f"column {name} holds {len(col)} rows; a version-2 Arrow part holds one")
            values = col.chunk(0).values
            check_shape(name, (len(values),), expected)
            out[name] = values.to_numpy(zero_copy_only=False)
        return out


def arrow_bytes(table: pa.Table, ipc_file: bool = False) -> bytes:
    """The table as an Arrow IPC stream (or file, with its footer), zstd-compressed."""
    sink = pa.BufferOutputStream()
    new = pa.ipc.new_file if ipc_file else pa.ipc.new_stream
    with new(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def read_arrow_table(files: dict[str, bytes], data_name: str, ipc_file: bool = False) -> pa.Table:
    """The IPC stream's (or file's) table, fully validated (offsets in bounds, valid buffers): a crafted file gives an
    error here instead of an out-of-bounds read later."""
    if data_name not in files:
        raise CorruptCache(f"{data_name} is missing")
    kind = "file" if ipc_file else "stream"
    try:
        table = (pa.ipc.open_file if ipc_file else pa.ipc.open_stream)(pa.py_buffer(files[data_name])).read_all()
        table.validate(full=True)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise CorruptCache(f"{data_name} is not a valid Arrow IPC {kind} ({str(e).splitlines()[0][:200]})") from e
    return table


BACKENDS = {"zarr": ZarrBackend, "arrow": ArrowBackend}


def get(name: str):
    if name not in BACKENDS:
        raise CacheError(f"unknown cache format {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def for_parts(plan: dict):
    """The backend of a cache's parts: its format's, or the Arrow samples layout where the plan declares it."""
    layout = plan.get("layout")
    if layout is None:
        return get(plan["backend"])
    if (plan["backend"], layout) != ("arrow", "samples"):
        raise CacheError(f"unknown layout {layout!r} of format {plan['backend']!r}; a newer version wrote this cache")
    from .sample_layout import ArrowSamplesBackend

    return ArrowSamplesBackend(plan["encoding"])
