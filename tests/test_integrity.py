"""Nothing lost, nothing silently wrong: a cache is replaced only by a whole one, writers of one cache never undo
each other's parts, a part is sealed only as it was written, and every read checks the bytes it reads."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from synthetic import plan, samples, write_cache

import storage
from pipeline.cli import main

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{Path(__file__).parent}"}


def flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at % len(raw)] ^= 0x10
    path.write_bytes(bytes(raw))


def one_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# -- convert never deletes its source, and replaces a destination only with a whole cache


def test_convert_refuses_a_destination_that_is_holds_or_lies_in_its_source(tmp_path):
    write_cache(tmp_path / "c")
    before = storage.verify(tmp_path / "c")
    for dst in (tmp_path / "c", tmp_path / "c/sub", tmp_path / "c/parts/x", tmp_path):
        res = CliRunner().invoke(
            main, ["convert", str(tmp_path / "c"), str(dst), "--logprob-dtype", "q8", "--overwrite"]
        )
        assert res.exit_code == 1 and "outside the source" in one_error_line(res.output)
    assert storage.verify(tmp_path / "c") == before


def test_a_failed_convert_leaves_the_old_destination_whole(tmp_path):
    write_cache(tmp_path / "a", num_rows=12)
    old = storage.convert(tmp_path / "a", tmp_path / "b", "arrow")
    flip(next((tmp_path / "a/parts/part-000002").rglob("c/*")), 3)
    with pytest.raises(storage.CorruptCache, match="part-000002"):
        storage.convert(tmp_path / "a", tmp_path / "b", overwrite=True, logprobs="q8")
    assert storage.verify(tmp_path / "b")["cache_key"] == old["cache_key"]
    flip(next((tmp_path / "a/parts/part-000002").rglob("c/*")), 3)
    new = storage.convert(tmp_path / "a", tmp_path / "b", overwrite=True, logprobs="q8")
    assert storage.verify(tmp_path / "b")["cache_key"] == new["cache_key"] != old["cache_key"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# -- writers of one cache: one per part, none clears another's work, all finish

WRITER = """
import json, sys, time
from synthetic import plan, samples
import storage
w = storage.CacheWriter(sys.argv[1], plan(num_rows=24, part_size=2))
data, wrote = samples(24), []
for claim in w.claims(w.missing_parts()):
    time.sleep(float(sys.argv[2]))
    w.write_part(claim.p, [data[i] for i in w.part_rows(claim.p)], claim=claim)
    wrote.append(claim.p)
print(json.dumps({"wrote": wrote, "complete": w.finalize() is not None}))
"""


def start_writer(tmp_path, out, delay):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(delay)], env=ENV, stdout=subprocess.PIPE, text=True
    )


def test_two_writers_of_one_cache_split_its_parts_and_both_finish(tmp_path):
    ref, _ = write_cache(tmp_path / "ref", num_rows=24, part_size=2)
    a = start_writer(tmp_path, tmp_path / "c", 0.05)
    time.sleep(0.3)
    b = start_writer(tmp_path, tmp_path / "c", 0.05)
    got = [json.loads(p.communicate(timeout=120)[0]) for p in (a, b)]
    assert a.returncode == b.returncode == 0 and all(g["complete"] for g in got)
    assert sorted(got[0]["wrote"] + got[1]["wrote"]) == list(range(12)) and got[1]["wrote"], got
    assert storage.verify(tmp_path / "c")["parts"] == ref["parts"]


def test_a_live_writers_part_is_neither_cleared_nor_taken_and_its_peer_waits_for_it(tmp_path):
    w = storage.CacheWriter(tmp_path / "c", plan(num_rows=24, part_size=2))
    claim = w.claim(0)
    live = tmp_path / "c/parts/.tmp-part-000000-live0000"
    live.mkdir()
    (live / "half-written").write_bytes(b"x")
    peer = start_writer(tmp_path, tmp_path / "c", 0)
    deadline = time.time() + 60
    while len(w.done_parts()) < 11 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert w.done_parts() == set(range(1, 12)) and live.exists() and peer.poll() is None
    w.write_part(0, samples(2), claim=claim)
    out = json.loads(peer.communicate(timeout=60)[0])
    assert peer.returncode == 0 and out == {"wrote": list(range(1, 12)), "complete": True}
    storage.verify(tmp_path / "c")


# -- a part is sealed only as it was written


def test_a_part_damaged_before_the_manifest_is_never_sealed(tmp_path):
    w = storage.CacheWriter(tmp_path / "c", plan(num_rows=10, part_size=4))
    data = samples(10)
    for p in w.missing_parts():
        w.write_part(p, [data[i] for i in w.part_rows(p)])
    flip(tmp_path / "c/parts/part-000001/part.json", 40)
    with pytest.raises(storage.CorruptCache, match="part-000001.*rerun cache-teacher"):
        w.finalize()
    assert not (tmp_path / "c/manifest.json").exists() and w.missing_parts() == [1]
    assert len(list((tmp_path / "c/parts").glob(".corrupt-part-000001-*"))) == 1
    w.write_part(1, [data[i] for i in w.part_rows(1)])
    assert w.finalize() and storage.verify(tmp_path / "c")


# -- every read checks the bytes it reads: a flipped, truncated or missing file is an error, never other values


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_every_read_checks_the_bytes_it_reads(tmp_path, backend):
    write_cache(tmp_path / "c", backend, ids="bitpack", logprob_dtype="q8", top_p=0.8, draws=4)
    files = sorted(p for p in (tmp_path / "c/parts/part-000001").rglob("*") if p.is_file())
    for f in files:
        raw = f.read_bytes()
        damages = [
            lambda: flip(f, 0),
            lambda: flip(f, len(raw) // 2),
            lambda: flip(f, -1),
            lambda: f.write_bytes(raw[:-1]),
            lambda: f.unlink(),
        ]
        for damage in damages:
            damage()
            with pytest.raises(storage.CorruptCache, match="part-000001"):
                storage.open_cache(tmp_path / "c")[5]
            f.write_bytes(raw)
    assert storage.open_cache(tmp_path / "c")[5] is not None and storage.verify(tmp_path / "c")


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_a_damaged_or_missing_teacher_sketch_is_corruption(tmp_path, backend):
    """The sketch's basis turns every row's coefficients into logits: its files are checked like a part's, and
    verify and every reader of the sketch refuse it damaged or gone."""
    write_cache(tmp_path / "c", backend, top_p=0.5, draws=4, sketch_rank=3)
    files = sorted(p for p in (tmp_path / "c/sketch").rglob("*") if p.is_file())
    for f in files:
        raw = f.read_bytes()
        flip(f, len(raw) // 2)
        for read in (lambda: storage.open_cache(tmp_path / "c").sketch(), lambda: storage.verify(tmp_path / "c")):
            with pytest.raises(storage.CorruptCache, match="sketch"):
                read()
        f.write_bytes(raw)
    (tmp_path / "c/sketch").rename(tmp_path / "gone")
    with pytest.raises(storage.CorruptCache, match="sketch"):
        storage.verify(tmp_path / "c")


def test_a_stray_link_in_a_part_is_corruption(tmp_path):
    write_cache(tmp_path / "c")
    (tmp_path / "c/parts/part-000000/data.zarr/extra").symlink_to("/dev/zero")
    with pytest.raises(storage.CorruptCache, match="not a regular file"):
        storage.open_cache(tmp_path / "c")[0]


CRAFTED_ARROW = """
import json, sys
from pathlib import Path
import storage
from storage import part_folder
cache = Path(sys.argv[1])
part = cache / "parts/part-000000"
raw = (part / "data.arrow").read_bytes()
manifest = json.loads((cache / "manifest.json").read_text())
errors = 0
for at in range(0, len(raw), max(1, len(raw) // 200)):
    crafted = bytearray(raw)
    crafted[at] ^= 0xFF
    (part / "data.arrow").write_bytes(bytes(crafted))
    record = json.loads((part / "part.json").read_text())
    record["files"]["data.arrow"] = part_folder.sha256(bytes(crafted))
    record["xxh3_128"]["data.arrow"] = part_folder.fast_hash(bytes(crafted))
    text = json.dumps(record).encode()
    (part / "part.json").write_bytes(text)
    manifest["parts"]["part-000000"]["sha256"] = part_folder.record_sha256(text, record)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    try:
        c = storage.open_cache(cache)
        [c[i] for i in range(len(c))]
        storage.verify(cache)
    except storage.CacheError:
        errors += 1
print(errors)
"""


def test_a_crafted_arrow_part_with_valid_checksums_is_an_error_never_a_crash(tmp_path):
    """Bytes flipped all over an Arrow part, its checksums recomputed so only the format checks stand: each read
    ends in CacheError or in values that verify accepts, and the process never dies of an out-of-bounds read."""
    write_cache(tmp_path / "c", "arrow", num_rows=4, part_size=4)
    (tmp_path / "crafted.py").write_text(CRAFTED_ARROW)
    res = subprocess.run(
        [sys.executable, str(tmp_path / "crafted.py"), str(tmp_path / "c")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout) > 100, res.stdout


def test_a_swap_cut_short_between_its_renames_is_finished_by_the_next_run(tmp_path):
    write_cache(tmp_path / "c")
    w = storage.CacheWriter(tmp_path / "c", plan(k=4), overwrite=True)
    data = samples(10, k=4)
    for p in w.missing_parts():
        w.write_part(p, [data[i] for i in w.part_rows(p)])
    storage.writer.write_manifest(w.path, w.plan)
    os.rename(tmp_path / "c", tmp_path / ".c.replaced-killed0")  # killed between the two renames
    again = storage.CacheWriter(tmp_path / "c", plan(k=4), overwrite=True)
    assert again.missing_parts() == [] and again.finalize()["cache_key"] == w.plan["cache_key"]
    assert storage.verify(tmp_path / "c")["encoding"]["top_k"] == 4
