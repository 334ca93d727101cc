"""Bytes on disk per distilled position for each encoding and backend, and decoded streaming throughput.

Teacher rows are synthetic but shaped like an LM's: logits = Zipf prior over token ids (frequent tokens have
low ids, as in BPE vocabularies) + Gumbel noise + a boosted 'right' token, at V = 32000 and V = 151936 (Qwen's).
Real caches compress differently: bench/fidelity.py measures encodings on real teachers, and `pipeline inspect`
gives the figure for any cache. Streaming throughput is decoded positions/s through Cache.stream() (decode and
per-sample views), measured in a child process pinned to one core (taskset) when it can be, on a cache of one
full default part (256 samples × 256 distilled positions: the rows tiled 4×, so that opening a part is amortized
as in a real cache; the bytes come from the untiled rows, since zstd would find the repeats). Three backends side by
side: Zarr, Arrow (one row per sample) and Arrow as written before 0.2 (one row per part), their reads interleaved,
median of 3 rounds. `python bench/storage_size.py [--vocab V] [--only "NAME,NAME"]`; writes bench/out/storage.json
(bench/out/storage-subset.json for a subset).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))
import storage
from storage.codecs import top_p_widths

ANCHORS = {
    "DistillKit k=128, V=151936 (REFERENCE.md)": 344,
    "DistillKit k=50, V=151936": 127,
    "Random-Sampling KD (about 12 unique of 50 draws)": 36,
    "Megatron-LM K=128 before zstd": 640,
    "axolotl k=64 uncompressed": 1500,
}

# name, k, encoding
ENCODINGS = [
    ("k16 fp16 plain", 16, {}),
    ("k64 fp16 plain", 64, {}),
    ("k128 fp16 plain", 128, {}),
    ("k64 fp16 bitpack", 64, {"ids": "bitpack"}),
    ("k64 q8 plain", 64, {"logprob_dtype": "q8"}),
    ("k64 q8 bitpack", 64, {"ids": "bitpack", "logprob_dtype": "q8"}),
    ("k64 q4 bitpack", 64, {"ids": "bitpack", "logprob_dtype": "q4"}),
    ("top-p .95 q8 bitpack", 64, {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.95}),
    ("top-p .90 q8 bitpack + 16 draws", 64, {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.90, "draws": 16}),
    ("top-p .50 q8 bitpack + 24 draws", 64, {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.50, "draws": 24}),
    ("RS-KD 32 draws", 64, {"ids": "bitpack", "logprob_dtype": "q8", "top_p": 0.0, "min_k": 0, "draws": 32}),
]


def lm_like_rows(rng, n, vocab, k, top_p=None, min_k=1, draws=0, chunk=256):
    """ids [n, k], log-probs [1, n, k], exact tails [1, n], target log-probs [1, n], draws [1, n, draws] and their
    exact log-probs."""
    prior = -1.1 * np.log(np.arange(1, vocab + 1, dtype=np.float32))
    out = {
        "topk_ids": [],
        "topk_logprobs": [],
        "tail_logmass": [],
        "target_logprob": [],
        "draws": [],
        "draw_logprobs": [],
    }
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        z = prior + rng.gumbel(size=(m, vocab)).astype(np.float32) * 1.5
        right = rng.integers(0, 2000, m)
        z[np.arange(m), right] += rng.uniform(2, 12, m).astype(np.float32)
        z -= z.max(1, keepdims=True)
        logz = np.log(np.exp(z).sum(1, keepdims=True))
        lp_full = z - logz
        ids = np.argpartition(-z, k, axis=1)[:, :k]
        top = np.take_along_axis(lp_full, ids, 1)
        order = np.argsort(-top, axis=1)
        ids, top = np.take_along_axis(ids, order, 1), np.take_along_axis(top, order, 1)
        rest = lp_full.copy()
        np.put_along_axis(rest, ids, -np.inf, 1)
        out["topk_ids"].append(ids)
        out["topk_logprobs"].append(top)
        out["tail_logmass"].append(np.log(np.exp(rest).sum(1)).astype(np.float32))
        out["target_logprob"].append(lp_full[np.arange(m), right].astype(np.float32))
        if draws:
            widths = top_p_widths(top, top_p, min_k)
            p = np.exp(lp_full)
            kept = np.arange(k)[None, :] < widths[:, None]
            np.put_along_axis(p, np.where(kept, ids, ids[:, :1]), 0.0, 1)
            np.put_along_axis(p, ids[:, :1], np.where(kept[:, :1], 0.0, np.exp(top[:, :1])), 1)
            cdf = np.cumsum(p, 1)
            u = rng.random((m, draws)) * cdf[:, -1:]
            drawn = np.stack([np.searchsorted(cdf[r], u[r]) for r in range(m)])
            out["draws"].append(drawn)
            out["draw_logprobs"].append(np.take_along_axis(lp_full, drawn, 1).astype(np.float32))
    return {key: np.concatenate(v)[None] if key != "topk_ids" else np.concatenate(v) for key, v in out.items() if v}


def tile(rows, times):
    """The same rows repeated along the position axis (axis 0 of ids, 1 of the per-temperature arrays)."""
    return {k: np.concatenate([v] * times, axis=0 if k == "topk_ids" else 1) for k, v in rows.items()}


BACKENDS = {"zarr": "zarr", "arrow": "arrow", "arrow, one row per part": "arrow"}  # the last: Arrow caches before 0.2


def build(path, backend, rows, k, vocab, encoding, seq=512, distilled=0.5):
    rng = np.random.default_rng(1)
    per_sample = int(seq * distilled)
    n_samples = len(rows["topk_ids"]) // per_sample
    plan = storage.make_plan(
        backend=BACKENDS[backend],
        k=k,
        temperatures=[1.0],
        vocab_size=vocab,
        num_rows=n_samples,
        part_size=256,
        identity={"bench": True},
        **encoding,
    )
    if backend.endswith("per part"):
        del plan["layout"]
    w = storage.CacheWriter(path, plan)
    for p in w.missing_parts():
        samples = []
        for i in w.part_rows(p):
            mask = np.zeros(seq, np.uint8)
            mask[seq - per_sample :] = 1
            sl = slice(i * per_sample, (i + 1) * per_sample)
            s = {
                "sample_index": i,
                "input_ids": rng.integers(0, vocab, seq),
                "loss_mask": mask,
                "topk_ids": rows["topk_ids"][sl],
                "topk_logprobs": rows["topk_logprobs"][:, sl],
                "tail_logmass": rows["tail_logmass"][:, sl],
                "target_logprob": rows["target_logprob"][:, sl],
            }
            if "draws" in rows:
                s["draws"], s["draw_logprobs"] = rows["draws"][:, sl], rows["draw_logprobs"][:, sl]
            samples.append(s)
        w.write_part(p, samples)
    return w.finalize()


READ = """
import sys, time, json
sys.path.insert(0, {root!r})
import numpy as np, pyarrow as pa, storage
from storage import part_folder
times = []
for _ in range(3):
    cache = storage.open_cache({path!r}, max_parts_in_memory=1)
    t = time.perf_counter()
    n = sum(len(s["tail_logmass"]) for s in cache.stream(readahead=0))
    times.append(time.perf_counter() - t)
# the integrity checks alone, on the same part: checksums of every file read, and Arrow's full validation
folder = cache.part_folder(0)
record, files = part_folder.read(folder, None)
ipc = pa.ipc.open_file if cache.manifest.get("layout") == "samples" else pa.ipc.open_stream
table = ipc(pa.py_buffer(files["data.arrow"])).read_all() if "data.arrow" in files else None
checks = []
for _ in range(5):
    t = time.perf_counter()
    for data in files.values():
        part_folder.fast_hash(data)
    if table is not None:
        table.validate(full=True)
    checks.append(time.perf_counter() - t)
read = float(np.median(times))
print(json.dumps({{"positions_per_s": n / read, "check_share": cache.num_parts * float(np.median(checks)) / read}}))
"""


def read_throughput(path) -> dict:
    """Decoded positions/s on one core (decode in the reading thread, no read-ahead, pinned when taskset exists),
    and the share of that read time the integrity checks take (checksums; Arrow's full validation)."""
    cmd = [sys.executable, "-c", READ.format(root=str(Path(__file__).parents[1]), path=str(path))]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0"] + cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLOSC_NTHREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(name, k, enc, rows, vocab, rounds=3) -> list[dict]:
    """Bytes per position of each backend, and their decoded reads interleaved round by round (median of rounds)."""
    out, reads = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for backend in BACKENDS:
            build(Path(d) / backend, backend, rows, k, vocab, enc)
            stats = storage.statistics(Path(d) / backend)
            out[backend] = {
                "vocab": vocab,
                "encoding": name,
                "k": k,
                "backend": backend,
                "bytes_per_position": stats["bytes_per_distilled_position"],
                "mean_width": stats["mean_width"],
                "mean_drawn": stats.get("mean_drawn_width", 0.0),
                "decode_kl_mean": stats.get("decode_kl_mean"),
                "mean_tail_mass": stats["mean_tail_mass"],
            }
            build(Path(d) / f"{backend}-tiled", backend, tile(rows, 4), k, vocab, enc)
        for _ in range(rounds):
            for backend in BACKENDS:
                reads.setdefault(backend, []).append(read_throughput(Path(d) / f"{backend}-tiled"))
    for backend, row in out.items():
        row["read_positions_per_s"] = float(np.median([r["positions_per_s"] for r in reads[backend]]))
        row["check_share"] = float(np.median([r["check_share"] for r in reads[backend]]))
        print(
            f"V={vocab:6d} {name:32s} {backend:24s} {row['bytes_per_position']:7.1f} B/pos  width "
            f"{row['mean_width']:5.1f}  read {row['read_positions_per_s'] / 1e6:5.2f} M pos/s/core, "
            f"checks {100 * row['check_share']:4.1f} % of it",
            flush=True,
        )
    return list(out.values())


def main(positions=16384, vocabs=(32000, 151936), only=None):
    results = {
        "positions": positions,
        "rows": [],
        "anchors_bytes_per_position": ANCHORS,
        "pinned_to_one_core": bool(shutil.which("taskset")),
    }
    for vocab in vocabs:
        rng = np.random.default_rng(0)
        base = {k: lm_like_rows(rng, positions, vocab, k) for k in (16, 64, 128)}
        for name, k, enc in [e for e in ENCODINGS if not only or e[0] in only]:
            rows = (
                base[k]
                if not enc.get("draws")
                else lm_like_rows(
                    np.random.default_rng(0), positions, vocab, k, enc.get("top_p"), enc.get("min_k", 1), enc["draws"]
                )
            )
            results["rows"] += measure(name, k, enc, rows, vocab)
    return results


if __name__ == "__main__":
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    flags = dict(zip(sys.argv[1:], sys.argv[2:]))  # --vocab V, --only "NAME,NAME": a subset, written apart
    vocabs = (int(flags["--vocab"]),) if "--vocab" in flags else (32000, 151936)
    res = main(vocabs=vocabs, only=flags["--only"].split(",") if "--only" in flags else None)
    name = "storage.json" if len(flags) == 0 else "storage-subset.json"
    (out / name).write_text(json.dumps(res, indent=1))
