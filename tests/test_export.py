"""`pipeline export`: a cache as Parquet tables of one row per sample, equal to what the cache decodes, read by the
ecosystem's tools without this project's code; axolotl's KD layout aligned as its collator expects."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from tiny import build

import storage
from pipeline.cli import main
from pipeline.config import CacheTeacherConfig, DataConfig, ExportConfig
from stages import cache_teacher, export


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Ragged top-p rows, exact draws, a sketch and two temperatures: every field the parquet layout carries."""
    root = tmp_path_factory.mktemp("export")
    paths = build(root / "tiny", archs=("llama",))
    data = DataConfig(paths["train"], prompt_field="prompt", response_field="response")
    cfg = CacheTeacherConfig(
        teacher=paths["llama"], data=data, out=str(root / "c"), top_p=0.8, top_k=32, tail_draws=6, sketch_rank=4,
        temperatures=(1.0, 2.0), part_size=16, progress=False,
    )  # fmt: skip
    cache_teacher.run(cfg)
    return root / "c"


def run(cache, out, **kw):
    return export.run(ExportConfig(cache=str(cache), out=str(out), progress=False, **kw))


def rows(out) -> list[dict]:
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def unpadded(a: np.ndarray, valid: np.ndarray) -> list:
    return [r[v].tolist() for r, v in zip(a, valid)]


# -- the property: one row per sample, equal to the cache's own decoding


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_parquet_export_holds_one_row_per_sample_equal_to_the_cache(cache, tmp_path, temperature):
    r = run(cache, tmp_path / "x", temperature=temperature)
    c = storage.open_cache(cache, temperature)
    table = rows(tmp_path / "x")
    assert r["rows"] == len(table) == len(c) and r["parts_written"] == c.num_parts
    for i in (0, 5, len(c) - 1):
        s, row = c[i], table[i]
        assert row["sample_index"] == s["sample_index"] and row["input_ids"] == s["input_ids"].tolist()
        assert row["loss_mask"] == s["loss_mask"].tolist()
        head, drawn = s["topk_ids"] >= 0, s["drawn_ids"] >= 0
        assert row["topk_ids"] == unpadded(s["topk_ids"], head)
        np.testing.assert_allclose(np.concatenate(row["topk_logprobs"]), s["topk_logprobs"][head], rtol=1e-6)
        assert row["drawn_ids"] == unpadded(s["drawn_ids"], drawn)
        for name in ("drawn_logprobs", "drawn_logweights"):
            np.testing.assert_allclose(np.concatenate(row[name]), s[name][drawn], rtol=1e-6)
        for name in ("tail_logmass", "target_logprob"):
            np.testing.assert_allclose(row[name], s[name], rtol=1e-6)
        np.testing.assert_allclose(np.array(row["sketch_coeffs"]), s["sketch_coeffs"], rtol=1e-6)
    info = json.loads((tmp_path / "x/export.json").read_text())
    assert (
        info["complete"] and info["temperature"] == temperature and info["source_cache_key"] == c.manifest["cache_key"]
    )


def test_the_axolotl_layout_puts_token_j_plus_1s_head_at_row_j(cache, tmp_path):
    """axolotl's KD collator: target row j is the distribution over input_ids[j + 1]; rows it must skip are empty (its
    collator pads them with mask 0); labels are −100 where the token is not distilled."""
    run(cache, tmp_path / "a", to="axolotl")
    c, table = storage.open_cache(cache), rows(tmp_path / "a")
    assert set(table[0]) == {
        "input_ids",
        "attention_mask",
        "labels",
        "target_token_ids",
        "target_logprobs",
        "target_mask",
    }
    for i in (0, 7, len(c) - 1):
        s, row = c[i], table[i]
        n, mask = len(s["input_ids"]), s["loss_mask"].astype(bool)
        assert all(len(row[k]) == n for k in row) and row["attention_mask"] == [1] * n
        assert row["labels"] == np.where(mask, s["input_ids"].astype(np.int64), -100).tolist()
        distilled = np.nonzero(mask)[0]
        head = s["topk_ids"] >= 0
        assert [row["target_token_ids"][j - 1] for j in distilled] == unpadded(s["topk_ids"], head)
        got = np.concatenate([row["target_logprobs"][j - 1] for j in distilled])
        np.testing.assert_allclose(got, s["topk_logprobs"][head], rtol=1e-6)
        assert [sum(row["target_mask"][j - 1]) for j in distilled] == head.sum(1).tolist()
        skipped = set(range(n)) - set(distilled - 1)
        assert all(row["target_token_ids"][j] == [] == row["target_mask"][j] for j in skipped)
    assert json.loads((tmp_path / "a/export.json").read_text())["dropped"][0] == "tail_logmass"


def test_datasets_duckdb_and_polars_read_the_export_without_this_project(cache, tmp_path):
    duckdb, pl = pytest.importorskip("duckdb"), pytest.importorskip("polars")
    from datasets import load_dataset

    run(cache, tmp_path / "x")
    c, files = storage.open_cache(cache), str(tmp_path / "x/part-*.parquet")
    tokens = int(c.manifest["counts"]["tokens"])
    ds = load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == len(c) and ds[3]["input_ids"] == c[3]["input_ids"].tolist()
    n, total = duckdb.sql(f"select count(*), sum(len(input_ids)) from '{files}'").fetchall()[0]
    assert (n, total) == (len(c), tokens)
    frame = pl.scan_parquet(files).select(pl.col("tail_logmass").list.len().sum()).collect()
    assert frame.item() == int(c.manifest["counts"]["distilled_positions"])


# -- edge cases: resume, another export in the folder, a folder that is not an export


def test_an_interrupted_export_writes_only_the_missing_parts(cache, tmp_path):
    run(cache, tmp_path / "x")
    files = sorted((tmp_path / "x").glob("part-*.parquet"))
    files[1].unlink()
    (tmp_path / "x" / f".{files[2].name}.deadbeef.tmp").write_bytes(b"cut short")
    before = {f: f.stat().st_mtime_ns for f in files if f.exists()}
    assert run(cache, tmp_path / "x")["parts_written"] == 1
    assert before == {f: f.stat().st_mtime_ns for f in before} and files[1].exists()
    assert not list((tmp_path / "x").glob(".*.tmp"))


@pytest.mark.parametrize("case", ["other-layout", "not-an-export"])
def test_a_folder_holding_something_else_is_refused_in_one_line(cache, tmp_path, case):
    out = tmp_path / "x"
    if case == "other-layout":
        run(cache, out, to="axolotl")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    res = CliRunner().invoke(main, ["export", str(cache), str(out)])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "choose a new folder" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == before


def test_to_hf_dataset_is_the_memory_mapped_export_and_collates_like_the_cache(cache, tmp_path):
    """CacheDataset.to_hf_dataset(): one row per sample, backed by Arrow files on disk; DistillCollator turns a batch
    of its rows into exactly the batch it makes from the cache's own samples."""
    import datasets
    import torch
    from transformers import AutoTokenizer

    from pipeline.hf import CacheDataset, DistillCollator

    ours = CacheDataset(cache, temperature=2.0)
    ds = ours.to_hf_dataset(str(tmp_path / "x"))
    assert isinstance(ds, datasets.Dataset) and len(ds) == len(ours) and ds.cache_files
    tok = AutoTokenizer.from_pretrained(next(cache.parent.glob("tiny/llama")))
    collate = DistillCollator(tok)
    a, b = collate([ds[i] for i in range(6)]), collate([ours[i] for i in range(6)])
    assert a.keys() == b.keys() and a["labels"].keys() == b["labels"].keys()
    for key in a["labels"]:
        x, y = a["labels"][key], b["labels"][key]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
    assert torch.equal(a["input_ids"], b["input_ids"])
