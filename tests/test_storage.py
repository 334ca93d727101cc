import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import plan, samples, write_cache

import storage

BACKENDS = ["zarr", "arrow"]


def assert_same_sample(a, b):
    for key in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logmass", "target_logprob"):
        if key in a or key in b:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def written(sample, t=0):
    """What a float16 cache returns for a synthetic sample written at full width."""
    return {
        **sample,
        "topk_logprobs": sample["topk_logprobs"][t].astype(np.float16).astype(np.float32),
        "tail_logmass": sample["tail_logmass"][t],
        "target_logprob": sample["target_logprob"][t].astype(np.float16).astype(np.float32),
    }


# -- round trip: what is written is what is read, in both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip(tmp_path, backend):
    manifest, data = write_cache(tmp_path / "c", backend, num_rows=10, temperatures=(1.0, 2.0))
    cache = storage.open_cache(tmp_path / "c")
    assert len(cache) == 10 and manifest["complete"] and manifest["counts"]["samples"] == 10
    assert manifest["format_version"] == 2 and manifest["encoding"]["ids"] == {"codec": "plain", "dtype": "uint16"}
    for i in range(10):
        got = cache[i]
        assert got["topk_ids"].dtype == np.int32 and got["topk_logprobs"].dtype == np.float32
        assert got["topk_ids"].shape == (int(data[i]["loss_mask"].sum()), 8)
        assert_same_sample(got, written(data[i]))
    hot = cache.at_temperature(2.0)
    assert_same_sample(hot[3], written(data[3], 1))
    storage.verify(tmp_path / "c")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_rows_are_padded_per_sample(tmp_path, backend):
    """With --top-p each row keeps its own prefix: ids −1 and log-probs −inf past it, the tail exact for it."""
    _, data = write_cache(tmp_path / "c", backend, num_rows=6, top_p=0.5, min_k=1, ids="bitpack")
    cache = storage.open_cache(tmp_path / "c")
    for i in range(6):
        got, want = cache[i], data[i]
        kept = got["topk_ids"] >= 0
        assert kept[:, 0].all() and (np.isneginf(got["topk_logprobs"]) == ~kept).all()
        for r, w in enumerate(kept.sum(1)):
            np.testing.assert_array_equal(got["topk_ids"][r, :w], want["topk_ids"][r, :w])
            mass = np.exp(want["topk_logprobs"][0, r, :w].astype(np.float64))
            assert w == 1 or mass[:-1].sum() < 0.5 <= mass.sum() or w == 8
            np.testing.assert_allclose(np.exp(got["tail_logmass"][r]), 1 - mass.sum(), atol=1e-5)
    storage.verify(tmp_path / "c")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logprobs", ["float32", "q8"])
def test_drawn_tail_tokens_come_back_with_exact_logprobs_and_inclusion_weights(tmp_path, backend, logprobs):
    """Each distinct drawn token once, with its exact log-prob (to the codec's precision) and the Horvitz–Thompson
    weight p / (1 − (1 − p / P_R)^N) of the teacher-linear terms."""
    _, data = write_cache(tmp_path / "c", backend, num_rows=5, draws=24, top_p=0.7, min_k=0, logprob_dtype=logprobs)
    cache = storage.open_cache(tmp_path / "c")
    assert cache.draws == 24
    for i in range(5):
        got = cache[i]
        for r in range(len(got["tail_logmass"])):
            ids = got["drawn_ids"][r][got["drawn_ids"][r] >= 0]
            assert not set(ids) & set(got["topk_ids"][r][got["topk_ids"][r] >= 0])
            d = data[i]["draws"][0, r]
            np.testing.assert_array_equal(ids, np.unique(d[d >= 0]))
            p = np.exp(data[i]["full_logprobs"][0, r, ids].astype(np.float64))
            lp = got["drawn_logprobs"][r][: len(ids)].astype(np.float64)
            np.testing.assert_allclose(np.exp(lp), p, rtol=1e-5 if logprobs == "float32" else 0.1)  # half a q8 code
            pi = 1 - (1 - np.exp(lp) / np.exp(got["tail_logmass"][r].astype(np.float64))) ** 24
            np.testing.assert_allclose(np.exp(got["drawn_logweights"][r][: len(ids)]), np.exp(lp) / pi, rtol=1e-4)
    storage.verify(tmp_path / "c")


@pytest.mark.parametrize("backend", BACKENDS)
def test_counted_draws_of_earlier_caches_come_back_as_estimates(tmp_path, backend):
    _, data = write_cache(tmp_path / "c", backend, num_rows=5, draws=24, top_p=0.7, min_k=0, exact_draws=False)
    cache = storage.open_cache(tmp_path / "c")
    for i in range(5):
        got = cache[i]
        assert "drawn_logweights" not in got
        for r in range(len(got["tail_logmass"])):
            ids = got["drawn_ids"][r][got["drawn_ids"][r] >= 0]
            d = data[i]["draws"][0, r]
            want_ids, want_counts = np.unique(d[d >= 0], return_counts=True)
            np.testing.assert_array_equal(ids, want_ids)
            est = np.exp(got["drawn_logprobs"][r][: len(ids)].astype(np.float64))
            np.testing.assert_allclose(est, np.exp(got["tail_logmass"][r]) * want_counts / 24, rtol=1e-5)
    storage.verify(tmp_path / "c")


def test_empty_samples_and_parts_round_trip(tmp_path):
    from storage import CacheWriter

    w = CacheWriter(tmp_path / "c", plan(num_rows=3, part_size=2))
    empty = {
        "sample_index": 1,
        "input_ids": np.arange(4),
        "loss_mask": np.zeros(4, np.uint8),
        "topk_ids": np.zeros((0, 8), np.int64),
        "topk_logprobs": np.zeros((1, 0, 8), np.float32),
        "tail_logmass": np.zeros((1, 0), np.float32),
        "target_logprob": np.zeros((1, 0), np.float32),
    }
    w.write_part(0, [samples(1)[0], empty])
    w.write_part(1, [])
    m = w.finalize()
    cache = storage.open_cache(tmp_path / "c")
    assert len(cache) == 2 and cache[1]["topk_ids"].shape == (0, 0) and m["counts"]["samples"] == 2
    storage.verify(tmp_path / "c")


def test_ids_use_the_narrowest_type(tmp_path):
    write_cache(tmp_path / "c", vocab=200)
    assert storage.open_cache(tmp_path / "c").encoding["ids"]["dtype"] == "uint8"
    assert (
        storage.make_plan(
            backend="zarr", k=4, temperatures=[1], vocab_size=151936, num_rows=1, part_size=1, identity={}
        )["encoding"]["ids"]["dtype"]
        == "uint32"
    )


@pytest.mark.parametrize("src,dst", [("zarr", "arrow"), ("arrow", "zarr")])
def test_convert_between_backends_copies_the_encoded_arrays(tmp_path, src, dst):
    write_cache(tmp_path / "a", src, temperatures=(1.0, 0.5), ids="bitpack", logprob_dtype="q6", top_p=0.8)
    m = storage.convert(tmp_path / "a", tmp_path / "b", dst)
    a, b = storage.open_cache(tmp_path / "a"), storage.open_cache(tmp_path / "b")
    assert m["backend"] == dst and m["cache_key"] == a.manifest["cache_key"] and len(a) == len(b)
    for p in range(a.num_parts):
        ea, eb = a.read_encoded(p), b.read_encoded(p)
        assert all(np.array_equal(ea[n], eb[n]) for n in ea)
    storage.verify(tmp_path / "b")


@pytest.mark.parametrize("change", [{"backend": "arrow"}, {"ids": "bitpack", "logprobs": "q8"}])
def test_convert_keeps_exact_draws_and_the_teacher_sketch(tmp_path, change):
    """Copied or re-encoded, a cache keeps its drawn tokens, their log-probs, the sketch coefficients and its basis."""
    write_cache(tmp_path / "a", top_p=0.5, draws=8, sketch_rank=3, logprob_dtype="float32")
    storage.convert(tmp_path / "a", tmp_path / "b", **change)
    a, b = storage.open_cache(tmp_path / "a"), storage.open_cache(tmp_path / "b")
    np.testing.assert_array_equal(a.sketch()["basis"], b.sketch()["basis"])
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["drawn_ids"], b[i]["drawn_ids"])
        np.testing.assert_allclose(a[i]["drawn_logprobs"], b[i]["drawn_logprobs"], rtol=0.1)
        np.testing.assert_allclose(a[i]["sketch_coeffs"], b[i]["sketch_coeffs"], rtol=1e-6)
    storage.verify(tmp_path / "b")


def test_convert_to_a_compact_encoding_records_its_decode_error(tmp_path):
    write_cache(tmp_path / "a", num_rows=12, temperatures=(1.0, 2.0))
    m = storage.convert(tmp_path / "a", tmp_path / "b", top_p=0.9, ids="bitpack", logprobs="q8")
    assert (
        m["encoding"]["logprobs"]["name"] == "q8"
        and m["cache_key"] != storage.open_cache(tmp_path / "a").manifest["cache_key"]
    )
    stats = storage.statistics(tmp_path / "b")
    assert 0 < stats["decode_kl_mean"] < 1e-3 and stats["mean_width"] < 8
    a, b = storage.open_cache(tmp_path / "a"), storage.open_cache(tmp_path / "b")
    for i in range(len(a)):
        np.testing.assert_allclose(a[i]["target_logprob"], b[i]["target_logprob"])
        w = (b[i]["topk_ids"] >= 0).sum(1)
        for r in range(len(w)):
            np.testing.assert_array_equal(a[i]["topk_ids"][r, : w[r]], b[i]["topk_ids"][r, : w[r]])
    storage.verify(tmp_path / "b")


def test_convert_to_fewer_entries_keeps_the_tail_exact(tmp_path):
    _, data = write_cache(tmp_path / "a", num_rows=6, logprob_dtype="float32")
    storage.convert(tmp_path / "a", tmp_path / "b", top_k=3)
    b = storage.open_cache(tmp_path / "b")
    assert b.k == 3
    for i in range(6):
        np.testing.assert_array_equal(b[i]["topk_ids"], data[i]["topk_ids"][:, :3])
        dropped = np.exp(data[i]["topk_logprobs"][0, :, 3:].astype(np.float64)).sum(1)
        np.testing.assert_allclose(
            np.exp(b[i]["tail_logmass"]), np.exp(data[i]["tail_logmass"][0]) + dropped, rtol=1e-6
        )
    with pytest.raises(ValueError, match="wider than the source"):
        storage.convert(tmp_path / "a", tmp_path / "c", top_k=9)


def test_draws_refuse_a_narrower_conversion(tmp_path):
    write_cache(tmp_path / "a", draws=8)
    with pytest.raises(ValueError, match="drawn tail tokens"):
        storage.convert(tmp_path / "a", tmp_path / "b", top_p=0.5)


# -- format version 1 keeps reading

V1 = Path(__file__).parent / "data"


@pytest.mark.parametrize("backend", BACKENDS)
def test_version_1_caches_still_read_verify_and_convert(tmp_path, backend):
    """tests/data/v1-* were written by the version-1 writer (commit 6f6e31c) and are kept as they were."""
    expected = json.loads((V1 / f"v1-{backend}.expected.json").read_text())
    cache = storage.open_cache(V1 / f"v1-{backend}")
    assert cache.manifest["format_version"] == 1 and not cache.has_target_logprob
    storage.verify(V1 / f"v1-{backend}")
    for t, temp in enumerate((1.0, 2.0)):
        c = cache.at_temperature(temp)
        for i, want in enumerate(expected):
            got = c[i]
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
            np.testing.assert_array_equal(got["topk_ids"], np.array(want["topk_ids"]).reshape(-1, 4))
            np.testing.assert_array_equal(
                got["topk_logprobs"], np.array(want["topk_logprobs"][t], np.float32).reshape(-1, 4)
            )
            np.testing.assert_array_equal(got["tail_logmass"], np.array(want["tail_logmass"][t], np.float32))
    storage.convert(V1 / f"v1-{backend}", tmp_path / "v2", "arrow")
    new = storage.open_cache(tmp_path / "v2", temperature=2.0)
    assert new.manifest["format_version"] == 2
    for i in range(len(new)):
        assert_same_sample(new[i], cache.at_temperature(2.0)[i])
    storage.verify(tmp_path / "v2")


# -- streaming, random access and splits


def test_streaming_split_covers_every_sample_once(tmp_path):
    write_cache(tmp_path / "c", num_rows=23, part_size=3)
    cache = storage.open_cache(tmp_path / "c", max_parts_in_memory=1)
    seen = [
        s["sample_index"]
        for rank in range(2)
        for w in range(2)
        for s in cache.stream(rank=rank, world_size=2, worker=w, num_workers=2)
    ]
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
    with pytest.raises(storage.IncompleteCache, match="incomplete"):
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
    with pytest.raises(storage.CacheMismatch, match="differs in encoding.top_k, k"):
        storage.CacheWriter(tmp_path / "c", plan(k=4))
    assert storage.open_cache(tmp_path / "c").k == 8
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(storage.CacheMismatch, match="not a teacher cache"):
            storage.CacheWriter(tmp_path / "notes", plan(), overwrite=overwrite)
    assert (tmp_path / "notes/todo.txt").read_text() == "mine"


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_whole(tmp_path):
    write_cache(tmp_path / "c")
    w = storage.CacheWriter(tmp_path / "c", plan(k=4), overwrite=True)
    data = samples(10, k=4)
    *first, last = w.missing_parts()
    for p in first:
        w.write_part(p, [data[i] for i in w.part_rows(p)])
    assert w.finalize() is None
    assert storage.open_cache(tmp_path / "c").k == 8 and storage.verify(tmp_path / "c")
    w.write_part(last, [data[i] for i in w.part_rows(last)])
    m = w.finalize()
    assert storage.open_cache(tmp_path / "c").k == 4 and storage.verify(tmp_path / "c")["cache_key"] == m["cache_key"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging or replaced folder left
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".locks", "manifest.json", "parts", "plan.json"]


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
        with pytest.raises(storage.IncompleteCache):
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
    bad[1]["topk_logprobs"] = bad[1]["topk_logprobs"][..., ::-1].copy()  # stored as float16, as given
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


def test_block_shuffle_plans_mix_caches_per_micro_batch(tmp_path):
    """A mixture's plan draws whole micro-batches from each cache in the given shares, deterministically."""
    from pipeline import sources

    write_cache(tmp_path / "a", num_rows=40, part_size=8)
    write_cache(tmp_path / "b", num_rows=24, part_size=8, seed=1)
    mix = sources.MixtureSource(
        [sources.CacheSource(tmp_path / "a"), sources.CacheSource(tmp_path / "b")], [0.25, 0.75]
    )
    plans = [mix.plan(0, e, 2, None, 4, 1) for e in range(30)]
    assert plans[3] == mix.plan(0, 3, 2, None, 4, 1) and plans[3] != plans[4]
    source_of = [[int(i >= 40) for i in b] for p in plans for b in p]
    assert all(len(set(s)) == 1 for s in source_of), "each micro-batch from one cache"
    share_b = sum(s[0] for s in source_of) / len(source_of)
    assert abs(share_b - 0.75) < 0.04, share_b
    assert mix[45]["sample_index"] == storage.open_cache(tmp_path / "b")[5]["sample_index"]
    with pytest.raises(ValueError, match="summing to 1"):
        sources.MixtureSource(mix.sources, [0.5, 0.6])
