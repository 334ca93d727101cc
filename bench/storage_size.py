"""Bytes on disk per distilled position for each backend at k = 16, 64, 128, and streaming read throughput.

Teacher rows are synthetic but shaped like an LM's: logits = Zipf prior over token ids (frequent tokens have
low ids, as in BPE vocabularies) + Gumbel noise + a boosted 'right' token, at V = 32000. Real caches compress
differently; `pipeline inspect` reports the figure for yours. Writes JSON to bench/out/storage.json.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))
import storage  # noqa: E402

ANCHORS = {"DistillKit k=128 (REFERENCE.md)": 300, "Megatron-LM K=128 before zstd": 640,
           "axolotl k=64 uncompressed": 1500}


def lm_like_rows(rng, n, vocab, k, chunk=500):
    prior = -1.1 * np.log(np.arange(1, vocab + 1, dtype=np.float32))
    ids_out, lp_out, tail_out = [], [], []
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        z = prior + rng.gumbel(size=(m, vocab)).astype(np.float32) * 1.5
        z[np.arange(m), rng.integers(0, 2000, m)] += rng.uniform(2, 12, m).astype(np.float32)
        z -= z.max(1, keepdims=True)
        logz = np.log(np.exp(z).sum(1, keepdims=True))
        ids = np.argpartition(-z, k, axis=1)[:, :k]
        top = np.take_along_axis(z, ids, 1)
        order = np.argsort(-top, axis=1)
        ids, top = np.take_along_axis(ids, order, 1), np.take_along_axis(top, order, 1)
        lp = top - logz
        tail = np.log1p(-np.minimum(np.exp(lp).sum(1), 1 - 1e-7))
        ids_out.append(ids)
        lp_out.append(lp)
        tail_out.append(tail.astype(np.float32))
    return np.concatenate(ids_out), np.concatenate(lp_out), np.concatenate(tail_out)


def build(path, backend, rows, k, vocab, seq=512, distilled=0.5):
    ids, lp, tail = rows
    rng = np.random.default_rng(1)
    per_sample = int(seq * distilled)
    n_samples = len(ids) // per_sample
    plan = storage.make_plan(backend=backend, k=k, temperatures=[1.0], vocab_size=vocab, num_rows=n_samples,
                             part_size=256, identity={"bench": True})
    w = storage.CacheWriter(path, plan)
    for p in w.missing_parts():
        samples = []
        for i in w.part_rows(p):
            mask = np.zeros(seq, np.uint8)
            mask[seq - per_sample:] = 1
            sl = slice(i * per_sample, (i + 1) * per_sample)
            samples.append({"sample_index": i, "input_ids": rng.integers(0, vocab, seq), "loss_mask": mask,
                            "topk_ids": ids[sl], "topk_logprobs": lp[None, sl], "tail_logmass": tail[None, sl]})
        w.write_part(p, samples)
    return w.finalize()


def read_throughput(path, repeats=3):
    times = []
    for _ in range(repeats):
        cache = storage.open_cache(path, max_parts_in_memory=1)
        t = time.perf_counter()
        n = sum(len(s["topk_ids"]) for s in cache.stream())
        times.append(time.perf_counter() - t)
    return n / float(np.median(times))


def main(positions=32768, vocab=32000):
    rng = np.random.default_rng(0)
    results = {"vocab": vocab, "positions": positions, "rows": [], "anchors_bytes_per_position": ANCHORS}
    for k in (16, 64, 128):
        rows = lm_like_rows(rng, positions, vocab, k)
        raw = k * (2 + 2) + 4
        for backend in ("zarr", "arrow"):
            with tempfile.TemporaryDirectory() as d:
                m = build(Path(d) / "c", backend, rows, k, vocab)
                stats = storage.statistics(Path(d) / "c")
                n = m["counts"]["distilled_positions"]
                token_bytes = m["counts"]["tokens"] * 3 / n
                row = {"k": k, "backend": backend, "bytes_per_position": stats["bytes_per_distilled_position"],
                       "raw_bytes_per_position": raw, "raw_with_tokens": raw + token_bytes,
                       "read_positions_per_s": read_throughput(Path(d) / "c"), "mean_tail_mass": stats["mean_tail_mass"]}
            results["rows"].append(row)
            print(f"k={k:4d} {backend:6s} {row['bytes_per_position']:7.1f} B/pos (raw {raw} B + tokens "
                  f"{token_bytes:.1f} B)  read {row['read_positions_per_s'] / 1e6:.2f} M pos/s  tail {row['mean_tail_mass']:.3f}")
    return results


if __name__ == "__main__":
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    res = main()
    (out / "storage.json").write_text(json.dumps(res, indent=1))
