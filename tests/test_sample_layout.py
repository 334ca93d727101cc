"""The Arrow samples layout: a part is a table of one row per sample whose columns hold each sample's own entries (its
bit-packed ones decodable alone), read by datasets, Polars and DuckDB without this project; Arrow caches of one row
per part keep reading, resuming and converting."""

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from synthetic import plan, samples, write_cache

import storage
from storage import codecs, part, sample_layout
from storage.writer import CacheWriter

ENCODINGS = {
    "plain f16": {},
    "bitpack q8 top-p draws": {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.7, "draws": 12},
    "bitpack q5 sketch": {"ids": "bitpack", "logprob_dtype": "q5", "top_p": 0.6, "min_k": 0, "sketch_rank": 5},
}


def data_file(cache, p=0):
    return cache / "parts" / f"part-{p:06d}" / "data.arrow"


# -- the property: row i holds sample i's entries, bit-packed ones decodable alone


@pytest.mark.parametrize("name", ENCODINGS)
def test_each_row_holds_its_samples_entries_and_they_decode_alone(tmp_path, name):
    write_cache(tmp_path / "c", "arrow", num_rows=9, part_size=5, temperatures=(1.0, 2.0), **ENCODINGS[name])
    cache = storage.open_cache(tmp_path / "c")
    enc, arrays = cache.encoding, cache.read_encoded(0)
    table = pa.ipc.open_file(pa.memory_map(str(data_file(tmp_path / "c")))).read_all()
    assert table.num_rows == len(arrays["sample_index"]) == 5
    for col in set(table.column_names) - {"sample_index"}:
        offsets = sample_layout.entry_offsets(col, arrays, enc)
        bits = sample_layout.packed_bits(col, enc)
        flat = codecs.unpack_bits(arrays[col], bits, int(offsets[-1])) if bits else arrays[col]
        for i, row in enumerate(table[col].to_pylist()):
            own = flat[offsets[i] : offsets[i + 1]]
            n = len(own)
            got = codecs.unpack_bits(np.array(row, np.uint8), bits, -(-n // 8) * 8)[:n] if bits else np.array(row)
            np.testing.assert_array_equal(got, own, err_msg=col)
    assert any(sample_layout.packed_bits(c, enc) for c in table.column_names) == (name != "plain f16")


def test_datasets_polars_and_duckdb_count_samples_and_tokens_without_this_project(tmp_path):
    from datasets import load_dataset

    duckdb, pl = pytest.importorskip("duckdb"), pytest.importorskip("polars")
    m, _ = write_cache(tmp_path / "c", "arrow", num_rows=11, part_size=4, **ENCODINGS["bitpack q8 top-p draws"])
    files = sorted(str(f) for f in (tmp_path / "c/parts").glob("part-*/data.arrow"))
    samples_, tokens = m["counts"]["samples"], m["counts"]["tokens"]
    ds = load_dataset("arrow", data_files=files, split="train")
    assert len(ds) == samples_ and sum(len(x) for x in ds["input_ids"]) == tokens
    frame = pl.scan_ipc(files).select(pl.len(), pl.col("input_ids").list.len().sum()).collect()
    assert frame.row(0) == (samples_, tokens)
    con = duckdb.connect()  # DuckDB reads no float16 column: the scan selects what the query needs
    con.register("parts", pads.dataset(files, format="ipc").scanner(columns=["input_ids"]).to_reader())
    assert con.sql("select count(*), sum(len(input_ids)) from parts").fetchall()[0] == (samples_, tokens)


# -- the layout without "layout" (one row per part) keeps reading, resuming and converting


def test_a_one_row_arrow_cache_resumes_in_its_layout_and_converts_to_samples(tmp_path):
    old = plan("arrow", num_rows=10, part_size=4)
    del old["layout"]
    data = samples(10)
    w = CacheWriter(tmp_path / "c", old)
    w.write_part(0, [data[i] for i in w.part_rows(0)])
    w = CacheWriter(tmp_path / "c", plan("arrow", num_rows=10, part_size=4))  # today's plan: same cache
    for p in w.missing_parts():
        w.write_part(p, [data[i] for i in w.part_rows(p)])
    assert "layout" not in w.finalize()
    for p in range(3):
        pa.ipc.open_stream(pa.memory_map(str(data_file(tmp_path / "c", p)))).read_all()  # one row per part, all
    storage.verify(tmp_path / "c")
    m = storage.convert(tmp_path / "c", tmp_path / "d", "arrow")
    assert m["layout"] == "samples" and storage.verify(tmp_path / "d")["parts"].keys() == m["parts"].keys()
    a, b = storage.open_cache(tmp_path / "c"), storage.open_cache(tmp_path / "d")
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["topk_logprobs"], b[i]["topk_logprobs"])


# -- edge cases: lists that disagree with the samples are corruption, not misread rows


@pytest.mark.parametrize(
    "column,damage",
    [("tail_logmass_0", "shifted"), ("topk_ids", "shifted"), ("tail_logmass_0", "null"), ("drawn_ids_0", "flat")],
)
def test_a_table_whose_lists_disagree_with_the_samples_is_refused(tmp_path, column, damage):
    write_cache(tmp_path / "c", "arrow", num_rows=6, part_size=6, **ENCODINGS["bitpack q8 top-p draws"])
    cache = storage.open_cache(tmp_path / "c")
    table = sample_layout.to_table(cache.read_encoded(0), cache.encoding)
    col = table[column].combine_chunks()
    offsets, values = col.offsets.to_numpy().copy(), col.values
    if damage == "shifted":  # a sample's entries moved into its neighbour's list
        offsets[1] += 1
        col = pa.LargeListArray.from_arrays(pa.array(offsets), values)
    elif damage == "null":
        col = pa.LargeListArray.from_arrays(pa.array(offsets), values, mask=pa.array([True] + [False] * 5))
    else:  # the one-row layout's flat array where a list per sample belongs
        col = pa.array([values.to_numpy()] * 6, pa.large_list(values.type))
    table = table.set_column(table.schema.get_field_index(column), column, col)
    with pytest.raises(storage.CorruptCache, match=column):
        sample_layout.from_table(table, part.array_names(cache.encoding, 1), cache.encoding)
