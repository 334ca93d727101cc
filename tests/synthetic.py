"""Teacher-like samples from random logits (numpy only), for storage tests and benchmarks."""
import numpy as np


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def teacher_rows(rng, n, vocab, k, temperatures=(1.0,), sharpness=3.0):
    z = rng.standard_normal((n, vocab)).astype(np.float32) * sharpness
    z[np.arange(n), rng.integers(0, vocab, n)] += 8
    ids = np.argsort(-z, axis=1)[:, :k]
    lps, tails = [], []
    for t in temperatures:
        lp = log_softmax(z / t)
        top = np.take_along_axis(lp, ids, 1)
        rest = lp.copy()
        np.put_along_axis(rest, ids, -np.inf, 1)
        m = rest.max(1, keepdims=True)
        tails.append((np.log(np.exp(rest - m).sum(1)) + m[:, 0]).astype(np.float32) if k < vocab
                     else np.full(n, -np.inf, np.float32))
        lps.append(top)
    return ids, np.stack(lps), np.stack(tails)


def samples(n_samples, vocab=300, k=8, temperatures=(1.0,), seed=0, start=0, min_len=3, max_len=40):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_samples):
        length = int(rng.integers(min_len, max_len))
        mask = (rng.random(length) < 0.6).astype(np.uint8)
        mask[0] = 0
        ids, lp, tail = teacher_rows(rng, int(mask.sum()), vocab, k, temperatures)
        out.append({"sample_index": start + i, "input_ids": rng.integers(0, vocab, length), "loss_mask": mask,
                    "topk_ids": ids, "topk_logprobs": lp, "tail_logmass": tail})
    return out


def plan(backend="zarr", num_rows=10, part_size=4, vocab=300, k=8, temperatures=(1.0,), **kw):
    from storage import make_plan
    return make_plan(backend=backend, k=k, temperatures=temperatures, vocab_size=vocab, num_rows=num_rows,
                     part_size=part_size, identity={"teacher": {"name_or_path": "synthetic"}, **kw})


def write_cache(path, backend="zarr", num_rows=10, part_size=4, vocab=300, k=8, temperatures=(1.0,), seed=0):
    from storage import CacheWriter
    w = CacheWriter(path, plan(backend, num_rows, part_size, vocab, k, temperatures))
    data = samples(num_rows, vocab, k, temperatures, seed)
    for p in w.missing_parts():
        w.write_part(p, [data[i] for i in w.part_rows(p)])
    return w.finalize(), data
