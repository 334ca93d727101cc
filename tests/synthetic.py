"""Teacher-like samples from random logits (numpy only), for storage tests and benchmarks: full distributions, so
every stored quantity (top-k, exact tail, target log-prob, tail draws) has an exact reference."""

import numpy as np


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def teacher_rows(rng, n, vocab, k, temperatures=(1.0,), sharpness=3.0, targets=None, draws=0, top_p=None, min_k=1):
    """Rows of a random teacher: ids [n, k], log-probs [T, n, k], exact tails [T, n], target log-probs [T, n] and,
    with draws > 0, draws [T, n, draws] and their log-probs draw_logprobs, from each row's tail beyond its kept prefix
    (the top_p widths at the first temperature; −1 where that tail is empty)."""
    from storage.codecs import top_p_widths

    z = rng.standard_normal((n, vocab)).astype(np.float32) * sharpness
    z[np.arange(n), rng.integers(0, vocab, n)] += 8
    ids = np.argsort(-z, axis=1)[:, :k]
    widths = top_p_widths(np.take_along_axis(log_softmax(z / temperatures[0]), ids, 1), top_p, min_k)
    targets = rng.integers(0, vocab, n) if targets is None else np.asarray(targets)
    out = {"topk_ids": ids, "topk_logprobs": [], "tail_logmass": [], "target_logprob": [], "full": []}
    if draws:
        out["draws"], out["draw_logprobs"] = [], []
    for t in temperatures:
        lp = log_softmax(z / t)
        rest = lp.copy()
        np.put_along_axis(rest, ids, -np.inf, 1)
        m = np.where(np.isfinite(rest.max(1, keepdims=True)), rest.max(1, keepdims=True), 0)
        with np.errstate(divide="ignore"):
            tail = (np.log(np.exp(rest - m).sum(1)) + m[:, 0]).astype(np.float32)
        out["topk_logprobs"].append(np.take_along_axis(lp, ids, 1))
        out["tail_logmass"].append(tail)
        out["target_logprob"].append(lp[np.arange(n), targets].astype(np.float32))
        out["full"].append(lp)
        if draws:
            kept = np.arange(k)[None, :] < widths[:, None]
            p = np.exp(lp)
            np.put_along_axis(p, np.where(kept, ids, ids[:, :1]), 0.0, 1)
            d = np.full((n, draws), -1, np.int64)
            for r in range(n):
                if p[r].sum() > 0:
                    d[r] = rng.choice(vocab, size=draws, p=p[r] / p[r].sum())
            out["draws"].append(d)
            out["draw_logprobs"].append(np.where(d >= 0, np.take_along_axis(lp, d.clip(0), 1), -np.inf))
    return {key: np.stack(v) if isinstance(v, list) else v for key, v in out.items()}


def samples(
    n_samples,
    vocab=300,
    k=8,
    temperatures=(1.0,),
    seed=0,
    start=0,
    min_len=3,
    max_len=40,
    draws=0,
    keep_full=False,
    top_p=None,
    min_k=1,
):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_samples):
        length = int(rng.integers(min_len, max_len))
        input_ids = rng.integers(0, vocab, length)
        mask = (rng.random(length) < 0.6).astype(np.uint8)
        mask[0] = 0
        rows = teacher_rows(
            rng,
            int(mask.sum()),
            vocab,
            k,
            temperatures,
            targets=input_ids[mask == 1],
            draws=draws,
            top_p=top_p,
            min_k=min_k,
        )
        full = rows.pop("full")
        out.append(
            {
                "sample_index": start + i,
                "input_ids": input_ids,
                "loss_mask": mask,
                **rows,
                **({"full_logprobs": full} if keep_full else {}),
            }
        )
    return out


def plan(backend="zarr", num_rows=10, part_size=4, vocab=300, k=8, temperatures=(1.0,), **encoding):
    from storage import make_plan

    return make_plan(
        backend=backend,
        k=k,
        temperatures=temperatures,
        vocab_size=vocab,
        num_rows=num_rows,
        part_size=part_size,
        identity={"teacher": {"name_or_path": "synthetic"}},
        **encoding,
    )


def write_cache(
    path, backend="zarr", num_rows=10, part_size=4, vocab=300, k=8, temperatures=(1.0,), seed=0, layout=None, **encoding
):
    """A finished synthetic cache and the exact samples it was written from; layout "part": an Arrow cache of one row
    per part, as written before the samples layout."""
    from storage import CacheWriter

    made = plan(backend, num_rows, part_size, vocab, k, temperatures, **encoding)
    if layout == "part":
        del made["layout"]
    w = CacheWriter(path, made)
    data = samples(
        num_rows,
        vocab,
        k,
        temperatures,
        seed,
        draws=encoding.get("draws", 0),
        top_p=encoding.get("top_p"),
        min_k=encoding.get("min_k", 1),
        keep_full=True,
    )
    rank = encoding.get("sketch_rank", 0)
    if rank:  # a random sketch of hidden size 6, and random coefficients per row
        rng = np.random.default_rng(seed + 1)
        w.store_sketch(
            {
                "mean": rng.standard_normal(6).astype(np.float32),
                "components": rng.standard_normal(rank * 6).astype(np.float32),
                "basis": rng.standard_normal((rank + 1) * vocab).astype(np.float32),
            }
        )
        for s in data:
            s["sketch"] = rng.standard_normal((len(s["topk_ids"]), rank)).astype(np.float32)
    if encoding.get("text"):
        add_text(data, np.random.default_rng(seed + 2))
    for p in w.missing_parts():
        w.write_part(p, [data[i] for i in w.part_rows(p)])
    return w.finalize(), data


def add_text(data: list[dict], rng) -> None:
    """A prompt and a text per sample (multi-byte characters among them), and per token where it ends in the text:
    −1 before the first distilled token, increasing ends after (some of no bytes), −2 for a closing EOS."""
    alphabet = list("ab cdé€🙂\n") + ["日本"]
    for s in data:
        n = len(s["input_ids"])
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 3 * n)))).encode()
        first = int(np.argmax(s["loss_mask"])) if s["loss_mask"].any() else n
        ends = np.full(n, -1, np.int32)
        steps = np.sort(rng.integers(0, len(text) + 1, size=max(0, n - first - 1)))
        ends[first : n - 1] = steps[: n - 1 - first]
        if n - 1 >= first:
            ends[n - 1] = -2
        s["prompt_text"] = "".join(rng.choice(alphabet, size=int(rng.integers(0, 20)))).encode()
        s["text"], s["text_end"] = text, ends
