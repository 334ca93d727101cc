import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import storage
from synthetic import plan, samples, write_cache

BACKENDS = ["zarr", "arrow"]


def assert_same_sample(a, b):
    for key in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logmass"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


# -- round trip: what is written is what is read, in both backends

@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip(tmp_path, backend):
    manifest, data = write_cache(tmp_path / "c", backend, num_rows=10, temperatures=(1.0, 2.0))
    cache = storage.open_cache(tmp_path / "c")
    assert len(cache) == 10 and manifest["complete"] and manifest["counts"]["samples"] == 10
    for i in range(10):
        got = cache[i]
        assert got["topk_ids"].dtype == np.uint16 and got["topk_logprobs"].dtype == np.float16
        assert got["tail_logmass"].dtype == np.float32
        want = {**data[i], "topk_logprobs": data[i]["topk_logprobs"][0].astype(np.float16),
                "tail_logmass": data[i]["tail_logmass"][0]}
        assert_same_sample(got, want)
    hot = cache.at_temperature(2.0)
    np.testing.assert_array_equal(hot[3]["topk_logprobs"], data[3]["topk_logprobs"][1].astype(np.float16))
    storage.verify(tmp_path / "c")


def test_ids_use_the_narrowest_type(tmp_path):
    write_cache(tmp_path / "c", vocab=200)
    assert storage.open_cache(tmp_path / "c").manifest["dtypes"]["topk_ids"] == "uint8"
    assert storage.make_plan(backend="zarr", k=4, temperatures=[1], vocab_size=151936, num_rows=1, part_size=1,
                             identity={})["dtypes"]["topk_ids"] == "uint32"


@pytest.mark.parametrize("src,dst", [("zarr", "arrow"), ("arrow", "zarr")])
def test_convert_keeps_contents(tmp_path, src, dst):
    write_cache(tmp_path / "a", src, temperatures=(1.0, 0.5))
    m = storage.convert(tmp_path / "a", tmp_path / "b", dst)
    a, b = storage.open_cache(tmp_path / "a"), storage.open_cache(tmp_path / "b")
    assert m["backend"] == dst and m["cache_key"] == a.manifest["cache_key"] and len(a) == len(b)
    for t in (1.0, 0.5):
        for i in range(len(a)):
            assert_same_sample(a.at_temperature(t)[i], b.at_temperature(t)[i])
    storage.verify(tmp_path / "b")


def test_arrow_part_loads_in_datasets(tmp_path):
    import datasets
    _, data = write_cache(tmp_path / "c", "arrow")
    ds = datasets.Dataset.from_file(str(tmp_path / "c/parts/part-000001/data.arrow"))
    assert len(ds) == 4 and ds[0]["sample_index"] == 4
    np.testing.assert_array_equal(np.array(ds[0]["topk_ids"]), data[4]["topk_ids"])


# -- streaming, random access and splits

def test_streaming_split_covers_every_sample_once(tmp_path):
    write_cache(tmp_path / "c", num_rows=23, part_size=3)
    cache = storage.open_cache(tmp_path / "c", max_parts_in_memory=1)
    seen = [s["sample_index"] for rank in range(2) for w in range(2)
            for s in cache.stream(rank=rank, world_size=2, worker=w, num_workers=2)]
    assert sorted(seen) == list(range(23))
    assert [s["sample_index"] for s in cache.stream()] == list(range(23))


def test_block_shuffle_is_a_fresh_permutation_per_epoch():
    sizes = [5, 5, 3, 7, 1]
    a, b = storage.block_shuffle(sizes, 0, 0, 2), storage.block_shuffle(sizes, 0, 1, 2)
    assert sorted(a.tolist()) == list(range(21)) and sorted(b.tolist()) == list(range(21))
    assert a.tolist() != b.tolist()
    assert storage.block_shuffle(sizes, 0, 0, 2).tolist() == a.tolist()


def test_a_part_size_below_one_is_refused():
    with pytest.raises(ValueError, match="part size 0 must be at least 1 sample"):
        storage.make_plan(backend="zarr", k=4, temperatures=[1], vocab_size=100, num_rows=5, part_size=0, identity={})


def test_temperature_not_cached_is_refused(tmp_path):
    write_cache(tmp_path / "c")
    with pytest.raises(ValueError, match="temperature 2.0 is not in this cache; cached temperatures: 1.0"):
        storage.open_cache(tmp_path / "c", temperature=2.0)


# -- parts, resume, manifest

def test_incomplete_cache_has_no_manifest_and_cannot_be_opened(tmp_path):
    w = storage.CacheWriter(tmp_path / "c", plan(num_rows=10, part_size=4))
    w.write_part(0, samples(4))
    assert w.finalize() is None and not (tmp_path / "c/manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        storage.open_cache(tmp_path / "c")
    assert w.missing_parts() == [1, 2]
    assert w.missing_parts(shard=1, num_shards=2) == [1]


def test_disjoint_writers_fill_one_cache(tmp_path):
    data = samples(10)
    for shard in (1, 0):
        w = storage.CacheWriter(tmp_path / "c", plan(num_rows=10, part_size=4))
        for p in w.missing_parts(shard, 2):
            w.write_part(p, [data[i] for i in w.part_rows(p)])
        w.finalize()
    m, _ = write_cache(tmp_path / "ref")
    got = json.loads((tmp_path / "c/manifest.json").read_text())
    assert got["parts"] == m["parts"] and got["cache_key"] == m["cache_key"]


def test_other_contents_at_the_same_path_are_refused(tmp_path):
    write_cache(tmp_path / "c")
    with pytest.raises(storage.CacheMismatch, match="differs in k"):
        storage.CacheWriter(tmp_path / "c", plan(k=4))
    assert storage.open_cache(tmp_path / "c").k == 8
    storage.CacheWriter(tmp_path / "c", plan(k=4), overwrite=True)
    assert not (tmp_path / "c/manifest.json").exists()


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from synthetic import plan, samples
import storage
w = storage.CacheWriter(sys.argv[1], plan(sys.argv[2], num_rows=30, part_size=2))
data = samples(30)
for p in w.missing_parts():
    time.sleep(float(sys.argv[3]))
    w.write_part(p, [data[i] for i in w.part_rows(p)])
w.finalize()
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_at_any_instant_then_resume_equals_one_run(tmp_path, backend):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    ref, _ = write_cache(tmp_path / "ref", backend, num_rows=30, part_size=2)
    out = tmp_path / "c"
    rng = np.random.default_rng(0)
    interrupted = 0
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(out), backend, "0.04"], env=env)
        time.sleep(float(rng.uniform(0.3, 0.8)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "manifest.json").exists():
            break
        interrupted += 1
        with pytest.raises(FileNotFoundError):
            storage.verify(out)
        for d in (out / "parts").glob("part-*"):
            assert (d / "part.json").exists()
    assert interrupted, "no kill landed before the writer finished"
    subprocess.run([sys.executable, str(script), str(out), backend, "0"], env=env, check=True)
    got = storage.verify(out)
    assert got["parts"] == ref["parts"]
    assert not list((out / "parts").glob(".tmp-*"))


# -- verify

@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_catches_a_flipped_byte_in_any_part_file(tmp_path, backend):
    write_cache(tmp_path / "c", backend)
    files = sorted(p for p in (tmp_path / "c/parts/part-000002").rglob("*") if p.is_file())
    for f in files:
        raw = bytearray(f.read_bytes())
        pos = len(raw) // 2
        raw[pos] ^= 0x01
        f.write_bytes(bytes(raw))
        with pytest.raises(storage.VerifyError, match="part-000002"):
            storage.verify(tmp_path / "c")
        raw[pos] ^= 0x01
        f.write_bytes(bytes(raw))
    storage.verify(tmp_path / "c")


def test_verify_checks_values_not_only_checksums(tmp_path):
    """A writer that stored unsorted log-probs is caught even with matching checksums."""
    from storage.writer import write_manifest
    w = storage.CacheWriter(tmp_path / "c", plan(num_rows=4, part_size=4))
    bad = samples(4)
    bad[1]["topk_logprobs"] = bad[1]["topk_logprobs"][..., ::-1].copy()
    w.write_part(0, bad)
    write_manifest(w.path, w.plan)
    with pytest.raises(storage.VerifyError, match="part-000000: temperature 0: top-k log-probabilities are not sorted"):
        storage.verify(tmp_path / "c")


def test_statistics_report_size_and_tail(tmp_path):
    write_cache(tmp_path / "c", num_rows=8)
    s = storage.statistics(tmp_path / "c")
    assert s["bytes_per_distilled_position"] > 0 and 0 < s["mean_tail_mass"] < 1
    assert sum(s["top1_mass_histogram"]["counts"]) == s["distilled_positions"]
    assert "B per distilled position" in storage.describe(tmp_path / "c")
