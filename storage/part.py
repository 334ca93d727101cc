"""The columnar part: one part of a cache as flat numpy arrays (names as in FORMAT.md), encoded for disk or decoded
for reading. Samples are ragged (token_offsets, position_offsets) and so are teacher rows (topk_width).

A decoded part holds flat arrays plus offsets: topk_offsets/topk_ids, and per temperature index t
topk_logprobs_{t} (float32), tail_logmass_{t}, target_logprob_{t}, drawn_offsets_{t}/drawn_ids_{t}/drawn_logprobs_{t}
(and drawn_logweights_{t} for exact draws), and sketch_coeffs [P, r] with a teacher sketch.
`sample` turns one sample into padded [rows, width] arrays (ids −1 and log-probs −inf where a row is shorter).
"""

from __future__ import annotations

import numpy as np

from . import codecs
from .errors import CacheError

LOGPROB_CODECS = {
    "float32": {"codec": "float32"},
    "float16": {"codec": "float16"},
    **{f"q{b}": {"codec": "power", "bits": b, "gamma": codecs.POWER_GAMMA} for b in (8, 6, 5, 4, 3, 2)},
}
ID_CODECS = ("plain", "bitpack")


MAX_TOP_K = 1 << 20
MAX_DRAWS = 65535
MAX_SKETCH_RANK = 1024


def check_encoding_options(
    *,
    k,
    top_p=None,
    min_k=1,
    ids="plain",
    logprobs="float16",
    draws=0,
    vocab_size=MAX_TOP_K,
    sketch_rank=0,
    sketch_bits=4,
) -> None:
    """The range checks of every encoding option (the command line's and make_encoding's), in one place."""
    if logprobs not in LOGPROB_CODECS:
        raise CacheError(f"log-prob encoding {logprobs!r} is not supported; choose one of {', '.join(LOGPROB_CODECS)}")
    if ids not in ID_CODECS:
        raise CacheError(f"id encoding {ids!r} is not supported; choose {' or '.join(ID_CODECS)}")
    if not 1 <= k <= min(vocab_size, MAX_TOP_K):
        raise CacheError(f"--top-k {k} must lie between 1 and the vocabulary size {vocab_size}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise CacheError(f"--top-p {top_p} must lie in [0, 1]")
    if not 0 <= min_k <= k:
        raise CacheError(f"--min-k {min_k} must lie between 0 and --top-k {k}")
    if draws < 0 or draws > MAX_DRAWS:
        raise CacheError(f"--tail-draws {draws} must lie between 0 and {MAX_DRAWS}")
    if not 0 <= sketch_rank <= MAX_SKETCH_RANK:
        raise CacheError(f"--sketch-rank {sketch_rank} must lie between 0 and {MAX_SKETCH_RANK}")
    if not 2 <= sketch_bits <= 8:
        raise CacheError(f"--sketch-bits {sketch_bits} must lie between 2 and 8")
    if top_p is not None and top_p == 0 and min_k == 0 and not draws:
        raise CacheError(
            "--top-p 0 --min-k 0 keeps no teacher token and there are no --tail-draws: such a cache "
            "holds no teacher information; add --tail-draws N (RS-KD) or raise --min-k"
        )


def make_encoding(
    *,
    k,
    vocab_size,
    top_p=None,
    min_k=1,
    ids="plain",
    logprobs="float16",
    draws=0,
    target_logprob=True,
    behavior_logprob=False,
    text=False,
    exact_draws=True,
    sketch_rank=0,
    sketch_bits=4,
) -> dict:
    """The encoding block of a plan. Draws are exact (each drawn token's log-prob) unless exact_draws is False (the
    counts of earlier caches)."""
    check_encoding_options(
        k=k,
        top_p=top_p,
        min_k=min_k,
        ids=ids,
        logprobs=logprobs,
        draws=draws,
        vocab_size=vocab_size,
        sketch_rank=sketch_rank,
        sketch_bits=sketch_bits,
    )
    draw = (
        {"n": int(draws), "values": "logprobs"}
        if exact_draws
        else {"n": int(draws), "counts_dtype": str(codecs.uint_dtype(draws))}
    )
    id_codec = (
        {"codec": "bitpack", "bits": codecs.id_bits(vocab_size)}
        if ids == "bitpack"
        else {"codec": "plain", "dtype": str(codecs.uint_dtype(vocab_size - 1))}
    )
    return {
        "top_k": int(k),
        "top_p": None if top_p is None else float(top_p),
        "min_k": int(min_k),
        "ids": id_codec,
        "logprobs": dict(LOGPROB_CODECS[logprobs], name=logprobs),
        "draws": draw if draws else None,
        "target_logprob": bool(target_logprob),
        "behavior_logprob": bool(behavior_logprob),
        "sketch": {"rank": int(sketch_rank), "bits": int(sketch_bits)} if sketch_rank else None,
        **({"text": True} if text else {}),  # absent otherwise: the encoding (and key) of caches before it
    }


def exact_draws(encoding: dict) -> bool:
    return bool(encoding.get("draws")) and encoding["draws"].get("values") == "logprobs"


def encoding_problem(encoding, vocab_size: int) -> str | None:
    """What makes an encoding read from disk unusable (None when it is one make_encoding could have written): every
    width, bit count and dtype a decoder allocates by is checked here."""
    try:
        k, ids, lp = encoding["top_k"], encoding["ids"], encoding["logprobs"]
        if not isinstance(k, int) or not 1 <= k <= min(vocab_size, MAX_TOP_K):
            return f"top_k {k!r} is not in [1, vocab_size]"
        if not isinstance(encoding.get("min_k", 0), int) or not 0 <= encoding.get("min_k", 0) <= k:
            return f"min_k {encoding.get('min_k')!r} is not in [0, top_k]"
        if ids.get("codec") == "bitpack":
            if ids.get("bits") != codecs.id_bits(vocab_size):
                return f"ids.bits {ids.get('bits')!r} is not ceil(log2 {vocab_size})"
        elif ids.get("codec") != "plain" or ids.get("dtype") not in ("uint8", "uint16", "uint32"):
            return f"ids {ids!r} is not a known id codec"
        if lp.get("codec") == "power":
            if (
                lp.get("bits") not in range(2, 9)
                or not isinstance(lp.get("gamma"), (int, float))
                or not 0 < lp["gamma"] < 1e3
            ):
                return f"logprobs {lp!r} is not a power codec of 2 to 8 bits"
        elif lp.get("codec") not in ("float16", "float32"):
            return f"logprobs {lp!r} is not a known log-prob codec"
        draws = encoding.get("draws")
        if draws is not None and (
            not isinstance(draws.get("n"), int)
            or not 1 <= draws["n"] <= MAX_DRAWS
            or (draws.get("counts_dtype") not in ("uint8", "uint16") and draws.get("values") != "logprobs")
        ):
            return f"draws {draws!r} is not 1 to {MAX_DRAWS} draws with counts or log-probs"
        sketch = encoding.get("sketch")
        if sketch is not None and (
            not isinstance(sketch.get("rank"), int)
            or not 1 <= sketch["rank"] <= MAX_SKETCH_RANK
            or sketch.get("bits") not in range(2, 9)
        ):
            return f"sketch {sketch!r} is not a rank of 1 to {MAX_SKETCH_RANK} with 2 to 8 bits"
    except (TypeError, KeyError, AttributeError) as e:
        return f"malformed ({type(e).__name__}: {e})"
    return None


def stored_shapes(counts: dict, encoding: dict, n_temps: int) -> dict:
    """The shape of every stored version-2 array, from the part's counts (None where a count is not recorded)."""
    s, n, p = counts["samples"], counts["tokens"], counts["distilled_positions"]
    h = counts.get("topk_entries")

    def coded(entries, codec):
        if entries is None:
            return None
        packed = codec["codec"] == "bitpack" or (codec["codec"] == "power" and codec["bits"] != 8)
        return (-(-entries * codec["bits"] // 8),) if packed else (entries,)

    out = {
        "sample_index": (s,),
        "token_offsets": (s + 1,),
        "input_ids": (n,),
        "loss_mask": (n,),
        "position_offsets": (s + 1,),
        "topk_width": (p,),
        "topk_ids": coded(h, encoding["ids"]),
        "behavior_logprob": (p,),
        "prompt_length": (s,),
        "text_offsets": (s + 1,),
        "text": None if counts.get("text_bytes") is None else (counts["text_bytes"],),
        "text_end": (n,),
    }
    if encoding.get("sketch"):
        r, b = encoding["sketch"]["rank"], encoding["sketch"]["bits"]
        out["sketch_codes"] = (p * r,) if b == 8 else (-(-p * r * b // 8),)
        out["sketch_scale"] = (p,)
    for t in range(n_temps):
        d = counts.get(f"drawn_entries_{t}")
        out.update(
            {
                f"topk_logprobs_{t}": coded(h, encoding["logprobs"]),
                f"tail_logmass_{t}": (p,),
                f"target_logprob_{t}": (p,),
                f"drawn_width_{t}": (p,),
                f"drawn_ids_{t}": coded(d, encoding["ids"]),
                f"drawn_counts_{t}": None if d is None else (d,),
                f"drawn_logprobs_{t}": coded(d, encoding["logprobs"]),
            }
        )
    return out


def decoded_bytes(counts: dict, encoding: dict, n_temps: int) -> int:
    """An upper bound of what decoding the part allocates (bytes), from its counts."""
    p = counts["distilled_positions"]
    h = counts.get("topk_entries", p * encoding["top_k"])
    d = sum(counts.get(f"drawn_entries_{t}", p * (encoding["draws"] or {}).get("n", 0)) for t in range(n_temps))
    r = (encoding.get("sketch") or {}).get("rank", 0)
    return 16 * (counts["samples"] + counts["tokens"]) + 16 * p * (1 + 2 * n_temps + r) + 16 * (h + d) * (1 + n_temps)


def width_dtype(encoding) -> np.dtype:
    return codecs.uint_dtype(encoding["top_k"])


def array_names(encoding: dict, n_temps: int) -> list[str]:
    names = ["sample_index", "token_offsets", "input_ids", "loss_mask", "position_offsets", "topk_width", "topk_ids"]
    if encoding.get("behavior_logprob"):
        names.append("behavior_logprob")
    if encoding.get("text"):
        names += TEXT_ARRAYS
    if encoding.get("sketch"):
        names += ["sketch_codes", "sketch_scale"]
    for t in range(n_temps):
        names += [f"topk_logprobs_{t}", f"tail_logmass_{t}"] + (
            [f"target_logprob_{t}"] if encoding["target_logprob"] else []
        )
        if encoding["draws"]:
            names += [
                f"drawn_width_{t}",
                f"drawn_ids_{t}",
                f"drawn_logprobs_{t}" if exact_draws(encoding) else f"drawn_counts_{t}",
            ]
    return names


TEXT_ARRAYS = ["prompt_length", "text_offsets", "text", "text_end"]


def target_dtype(encoding) -> str:
    return "float32" if encoding["logprobs"]["codec"] == "float32" else "float16"


# ---------------------------------------------------------------- encode


def encode(samples: list[dict], encoding: dict, n_temps: int, token_dtype) -> tuple[dict, dict]:
    """Samples → (encoded part arrays, counts and decode-error statistics).

    A sample holds sample_index, input_ids, loss_mask, topk_ids [P, K ≥ k] (teacher-sorted; entries past each row's
    width join its tail), topk_logprobs [T, P, K] and tail_logmass [T, P] in float32, target_logprob [T, P], and
    optionally widths [P] (the encoding's top_p_widths at temperature index 0 decide; rows never grow past given
    widths), draws [T, P, N] (tail tokens drawn beyond each row's kept prefix; −1 for none) with, for exact draws,
    draw_logprobs [T, P, N] (each draw's exact log-prob), and sketch [P, r] (the teacher sketch's coefficients)."""
    k = encoding["top_k"]
    _check_rows(samples)
    given = np.asarray(samples[0]["topk_ids"]).shape[1] if samples else k  # rows may be wider than k
    if given < k and samples:
        raise ValueError(f"rows of {given} entries cannot fill an encoding of top-k {k}")
    ids = _cat(samples, "topk_ids", (0, given), np.int64).reshape(-1, given)
    # float32 rounding can put a log-probability a hair above 0 (a tail holding all the mass): probabilities ≤ 1
    lps = _cat(samples, "topk_logprobs", (n_temps, 0, given), axis=1).reshape(n_temps, -1, given)
    lps = np.minimum(lps, 0, dtype=np.float32)
    tails = np.minimum(_cat(samples, "tail_logmass", (n_temps, 0), axis=1).reshape(n_temps, -1), 0).astype(np.float32)
    widths = codecs.top_p_widths(lps[0][:, :k], encoding["top_p"], encoding["min_k"])
    if samples and "widths" in samples[0]:  # rows that hold fewer entries (re-encoding a ragged cache)
        widths = np.minimum(widths, np.concatenate([np.asarray(s["widths"]) for s in samples]).astype(np.int64))
    offsets = codecs.offsets_of(widths)
    keep = np.arange(given)[None, :] < widths[:, None]
    arrays = {
        "sample_index": np.array([s["sample_index"] for s in samples], dtype=np.int64),
        "token_offsets": codecs.offsets_of([len(s["input_ids"]) for s in samples]),
        "input_ids": _cat(samples, "input_ids", (0,), np.int64).astype(token_dtype),
        "loss_mask": _cat(samples, "loss_mask", (0,), np.uint8).astype(np.uint8),
        "position_offsets": codecs.offsets_of([len(s["topk_ids"]) for s in samples]),
        "topk_width": widths.astype(width_dtype(encoding)),
        "topk_ids": codecs.encode_ids(ids[keep], encoding["ids"]),
    }
    if encoding.get("behavior_logprob"):
        arrays["behavior_logprob"] = _cat(samples, "behavior_logprob", (0,)).astype(np.float32)
    if encoding.get("text"):
        arrays.update(encode_text(samples))
    if encoding.get("sketch"):
        arrays.update(_encode_sketch(samples, encoding["sketch"]))
    stats = {"topk_entries": int(offsets[-1]), "max_token_id": int(ids[keep].max()) if offsets[-1] else -1}
    if "text" in arrays:
        stats["text_bytes"] = len(arrays["text"])
    targets = _cat(samples, "target_logprob", (n_temps, 0), axis=1) if encoding["target_logprob"] else None
    n = encoding["draws"]["n"] if encoding["draws"] else 0
    draws = _cat(samples, "draws", (n_temps, 0, n), np.int64, axis=1).reshape(n_temps, -1, n) if n else None
    values = (
        _cat(samples, "draw_logprobs", (n_temps, 0, n), axis=1).reshape(n_temps, -1, n)
        if exact_draws(encoding)
        else None
    )
    for t in range(n_temps):  # per temperature, in the order of FORMAT.md's table
        flat, tail = codecs.truncate(lps[t], tails[t], widths)
        _encode_temperature(arrays, stats, t, flat, tail, offsets, encoding)
        if targets is not None:
            arrays[f"target_logprob_{t}"] = np.minimum(targets.reshape(n_temps, -1)[t], 0).astype(
                target_dtype(encoding)
            )
        if draws is not None:
            _encode_draws(arrays, stats, t, draws[t], encoding, None if values is None else values[t], tail)
    return arrays, stats


def _check_rows(samples: list[dict]) -> None:
    for s in samples:
        if int(np.asarray(s["loss_mask"]).sum()) != len(s["topk_ids"]):
            raise ValueError(
                f"sample {s['sample_index']}: loss_mask has {int(np.asarray(s['loss_mask']).sum())} "
                f"distilled positions but {len(s['topk_ids'])} teacher rows"
            )


def encode_text(samples: list[dict]) -> dict:
    """Each sample's prompt_text and text (bytes) as one byte string, and its tokens' text_end."""
    joined = [bytes(s["prompt_text"]) + bytes(s["text"]) for s in samples]
    return {
        "prompt_length": np.array([len(bytes(s["prompt_text"])) for s in samples], np.int64),
        "text_offsets": codecs.offsets_of([len(b) for b in joined]),
        "text": np.frombuffer(b"".join(joined), np.uint8).copy(),
        "text_end": _cat(samples, "text_end", (0,), np.int32).astype(np.int32),
    }


def _encode_sketch(samples: list[dict], sketch: dict) -> dict:
    coeffs = _cat(samples, "sketch", (0, sketch["rank"])).reshape(-1, sketch["rank"])
    codes, scale = codecs.encode_sketch(coeffs, sketch["bits"])
    return {"sketch_codes": codes, "sketch_scale": scale}


def _cat(samples: list[dict], key: str, empty_shape=(), dtype=np.float32, axis=0) -> np.ndarray:
    arrs = [np.asarray(s[key]) for s in samples]
    return np.concatenate(arrs, axis=axis) if arrs else np.zeros(empty_shape, dtype)


def _encode_temperature(arrays: dict, stats: dict, t: int, flat, tail, offsets, encoding: dict) -> None:
    """One temperature's head log-probs and tail; the decode error of its encoding goes into stats."""
    arrays[f"topk_logprobs_{t}"] = codecs.encode_logprobs(flat, offsets, encoding["logprobs"])
    arrays[f"tail_logmass_{t}"] = tail
    decoded = codecs.decode_logprobs(arrays[f"topk_logprobs_{t}"], offsets, tail, encoding["logprobs"])
    kl = codecs.bins_kl(flat, tail, decoded, tail, offsets)
    stats[f"decode_kl_sum_{t}"] = float(kl.sum())
    stats[f"decode_kl_max_{t}"] = float(kl.max()) if kl.size else 0.0


def _encode_draws(arrays: dict, stats: dict, t: int, draws, encoding: dict, values, tail) -> None:
    """One temperature's tail draws [P, N] as distinct ids per row, with their counts or (values given: the draws'
    exact log-probs [P, N]) their log-probs."""
    if values is None:
        d_widths, d_ids, d_counts = codecs.count_draws(draws)
        arrays[f"drawn_counts_{t}"] = d_counts.astype(encoding["draws"]["counts_dtype"])
    else:
        d_widths, d_ids, _, d_lps = codecs.count_draws(draws, np.minimum(values, 0))
        d_off = codecs.offsets_of(d_widths)
        arrays[f"drawn_logprobs_{t}"] = codecs.encode_drawn_logprobs(d_lps, d_off, tail, encoding["logprobs"])
    arrays[f"drawn_width_{t}"] = d_widths.astype(codecs.uint_dtype(encoding["draws"]["n"]))
    arrays[f"drawn_ids_{t}"] = codecs.encode_ids(d_ids, encoding["ids"])
    stats[f"drawn_entries_{t}"] = int(d_widths.sum())
    if d_ids.size:
        stats["max_token_id"] = max(stats["max_token_id"], int(d_ids.max()))


# ---------------------------------------------------------------- decode


def decode(arrays: dict, encoding: dict, temperatures: list[int]) -> dict:
    """Encoded part arrays → decoded flat arrays for the given temperature indices."""
    widths = arrays["topk_width"].astype(np.int64)
    offsets = codecs.offsets_of(widths)
    out = {
        name: arrays[name] for name in ("sample_index", "token_offsets", "input_ids", "loss_mask", "position_offsets")
    }
    out["topk_offsets"] = offsets
    out["topk_ids"] = codecs.decode_ids(arrays["topk_ids"], encoding["ids"], int(offsets[-1]))
    if "behavior_logprob" in arrays:
        out["behavior_logprob"] = arrays["behavior_logprob"].astype(np.float32)
    out.update({name: arrays[name] for name in TEXT_ARRAYS if name in arrays})
    if encoding.get("sketch"):
        sk = encoding["sketch"]
        out["sketch_coeffs"] = codecs.decode_sketch(
            arrays["sketch_codes"], arrays["sketch_scale"], sk["rank"], sk["bits"]
        )
    for t in temperatures:
        tail = arrays[f"tail_logmass_{t}"].astype(np.float32)
        out[f"tail_logmass_{t}"] = tail
        out[f"topk_logprobs_{t}"] = codecs.decode_logprobs(
            arrays[f"topk_logprobs_{t}"], offsets, tail, encoding["logprobs"]
        )
        if f"target_logprob_{t}" in arrays:
            out[f"target_logprob_{t}"] = arrays[f"target_logprob_{t}"].astype(np.float32)
        if encoding["draws"]:
            out.update(_decode_draws(arrays, encoding, t, tail))
    return out


def _decode_draws(arrays: dict, encoding: dict, t: int, tail) -> dict:
    n = encoding["draws"]["n"]
    d_off = codecs.offsets_of(arrays[f"drawn_width_{t}"].astype(np.int64))
    out = {
        f"drawn_offsets_{t}": d_off,
        f"drawn_ids_{t}": codecs.decode_ids(arrays[f"drawn_ids_{t}"], encoding["ids"], int(d_off[-1])),
    }
    if exact_draws(encoding):
        lps = codecs.decode_drawn_logprobs(arrays[f"drawn_logprobs_{t}"], d_off, tail, encoding["logprobs"])
        out[f"drawn_logprobs_{t}"] = lps
        out[f"drawn_logweights_{t}"] = codecs.inclusion_logweights(lps, d_off, tail, n)
    else:
        out[f"drawn_counts_{t}"] = arrays[f"drawn_counts_{t}"].astype(np.int64)
        out[f"drawn_logprobs_{t}"] = codecs.drawn_logprobs(out[f"drawn_counts_{t}"], d_off, tail, n)
    return out


def samples_for_encoding(part: dict, temperatures: list[int], k: int, n_draws: int) -> list[dict]:
    """A decoded part (every temperature) back into encode()'s input: rows padded to k, draws re-expanded."""
    out = []
    for i in range(n_samples(part)):
        views = [sample(part, i, t) for t in temperatures]
        first = views[0]
        rows, width = first["topk_ids"].shape

        def to_k(a, pad):
            return np.pad(a, ((0, 0), (0, k - width)), constant_values=pad)

        s = {
            "sample_index": first["sample_index"],
            "input_ids": first["input_ids"],
            "loss_mask": first["loss_mask"],
            "topk_ids": to_k(first["topk_ids"], -1),
            "widths": (first["topk_ids"] >= 0).sum(1),
            "topk_logprobs": np.stack([to_k(v["topk_logprobs"], -np.inf) for v in views]),
            "tail_logmass": np.stack([v["tail_logmass"] for v in views]),
        }
        if "target_logprob" in first:
            s["target_logprob"] = np.stack([v["target_logprob"] for v in views])
        for key in ("behavior_logprob", "prompt_text", "text", "text_end"):
            if key in first:
                s[key] = first[key]
        if "sketch_coeffs" in first:
            s["sketch"] = first["sketch_coeffs"]
        if n_draws:
            p0, p1 = part["position_offsets"][i : i + 2]
            expanded = [_expand_draws(part, t, p0, p1, n_draws) for t in temperatures]
            s["draws"] = np.stack([e[0] for e in expanded])
            if f"drawn_counts_{temperatures[0]}" not in part:
                s["draw_logprobs"] = np.stack([e[1] for e in expanded])
        out.append(s)
    return out


def _expand_draws(part, t, p0, p1, n_draws) -> tuple[np.ndarray, np.ndarray]:
    """Rows p0..p1's draws [P, N] again: counted ids repeated by their counts, exact ones once each (−1 after), and
    beside them each draw's log-prob."""
    off, counted = part[f"drawn_offsets_{t}"], f"drawn_counts_{t}" in part
    draws = np.full((p1 - p0, n_draws), -1, np.int64)
    values = np.full((p1 - p0, n_draws), -np.inf, np.float32)
    for r in range(p0, p1):
        a, b = off[r], off[r + 1]
        times = part[f"drawn_counts_{t}"][a:b] if counted else np.ones(b - a, np.int64)
        draws[r - p0, : times.sum()] = np.repeat(part[f"drawn_ids_{t}"][a:b], times)
        values[r - p0, : times.sum()] = np.repeat(part[f"drawn_logprobs_{t}"][a:b], times)
    return draws, values


def n_samples(part) -> int:
    return len(part["sample_index"])


def sample(part: dict, i: int, t: int = 0) -> dict[str, np.ndarray]:
    """Sample i of a decoded part at temperature index t, teacher rows padded to the sample's widest row."""
    t0, t1 = part["token_offsets"][i : i + 2]
    p0, p1 = (int(x) for x in part["position_offsets"][i : i + 2])
    ids, logprobs = codecs.padded_rows(
        [(part["topk_ids"], -1), (part[f"topk_logprobs_{t}"], -np.inf)], part["topk_offsets"], p0, p1
    )
    out = {
        "sample_index": int(part["sample_index"][i]),
        "input_ids": part["input_ids"][t0:t1],
        "loss_mask": part["loss_mask"][t0:t1],
        "topk_ids": ids,
        "topk_logprobs": logprobs,
        "tail_logmass": part[f"tail_logmass_{t}"][p0:p1],
    }
    if f"target_logprob_{t}" in part:
        out["target_logprob"] = part[f"target_logprob_{t}"][p0:p1]
    if "behavior_logprob" in part:
        out["behavior_logprob"] = part["behavior_logprob"][p0:p1]
    if "text" in part:
        out.update(sample_text(part, i))
    if "sketch_coeffs" in part:
        out["sketch_coeffs"] = part["sketch_coeffs"][p0:p1]
    if f"drawn_ids_{t}" in part:
        names = ["drawn_ids", "drawn_logprobs"] + (["drawn_logweights"] if f"drawn_logweights_{t}" in part else [])
        pads = {"drawn_ids": -1}
        rows = codecs.padded_rows(
            [(part[f"{k}_{t}"], pads.get(k, -np.inf)) for k in names], part[f"drawn_offsets_{t}"], p0, p1
        )
        out.update(zip(names, rows))
    return out


def sample_text(part: dict, i: int) -> dict:
    """Sample i's prompt_text and text (UTF-8 bytes) and its tokens' text_end."""
    a, b = (int(x) for x in part["text_offsets"][i : i + 2])
    p = a + int(part["prompt_length"][i])
    t0, t1 = part["token_offsets"][i : i + 2]
    raw = part["text"]
    return {"prompt_text": raw[a:p].tobytes(), "text": raw[p:b].tobytes(), "text_end": part["text_end"][t0:t1]}


def counts(part: dict) -> dict[str, int]:
    return {
        "samples": n_samples(part),
        "tokens": int(part["token_offsets"][-1]),
        "distilled_positions": int(part["position_offsets"][-1]),
        **({"text_bytes": int(part["text_offsets"][-1])} if "text_offsets" in part else {}),
    }


# ---------------------------------------------------------------- invariants


def problems(part: dict, encoding: dict, temperatures: list[int], vocab_size: int, tol: float) -> list[str]:
    """What is wrong with a decoded part (empty when it is sound)."""
    out = []
    s, t_off, p_off = n_samples(part), part["token_offsets"], part["position_offsets"]
    if len(t_off) != s + 1 or len(p_off) != s + 1 or np.any(np.diff(t_off) < 0) or np.any(np.diff(p_off) < 0):
        return ["offsets are not monotone arrays of length samples + 1"]
    n_tok, n_pos = int(t_off[-1]), int(p_off[-1])
    if part["input_ids"].shape != (n_tok,) or part["loss_mask"].shape != (n_tok,):
        return [f"input_ids/loss_mask length {part['input_ids'].shape} differs from token offsets ({n_tok})"]
    mask = part["loss_mask"].astype(np.int64)
    per_sample = np.add.reduceat(mask, t_off[:-1]) if n_tok and s else np.zeros(s, np.int64)
    if not np.array_equal(np.where(np.diff(t_off) > 0, per_sample, 0), np.diff(p_off)):
        out.append("loss_mask counts differ from the number of teacher rows per sample")
    offsets = part["topk_offsets"]
    widths = np.diff(offsets)
    if len(widths) != n_pos:
        return out + [f"{len(widths)} row widths for {n_pos} distilled positions"]
    if widths.size and (widths.max() > encoding["top_k"] or widths.min() < min(encoding["min_k"], encoding["top_k"])):
        out.append(f"row widths outside [{encoding['min_k']}, {encoding['top_k']}]")
    rows = np.repeat(np.arange(n_pos), widths)
    ids = part["topk_ids"]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        out.append(f"token id {int(ids.max())} >= vocab_size {vocab_size}")
    head_keys = rows.astype(np.int64) * vocab_size + ids
    for t in temperatures:
        out += _temperature_problems(part, encoding, t, rows, ids, n_pos, tol)
        if encoding["draws"] and len(part[f"drawn_offsets_{t}"]) == n_pos + 1:
            out += _draw_problems(part, encoding, t, head_keys, n_pos, vocab_size)
    if encoding.get("behavior_logprob"):
        b = part.get("behavior_logprob")
        if b is None or b.shape != (n_pos,) or np.isnan(b).any() or (b > 1e-6).any():
            out.append("behavior log-probabilities are missing, NaN, positive or misshapen")
    if encoding.get("text"):
        out += _text_problems(part, s, t_off)
    if len(np.unique(head_keys)) != len(head_keys):
        out.append("a token id repeats within one row")
    return out


def _text_problems(part: dict, s: int, t_off) -> list[str]:
    o, lengths, ends = part.get("text_offsets"), part.get("prompt_length"), part.get("text_end")
    if o is None or len(o) != s + 1 or np.any(np.diff(o) < 0) or o[0] != 0 or o[-1] != len(part["text"]):
        return ["text offsets are missing, not monotone or disagree with the text's length"]
    if lengths is None or len(lengths) != s or np.any(lengths < 0) or np.any(lengths > np.diff(o)):
        return ["prompt lengths are missing or longer than their sample's text"]
    if ends is None or ends.shape != (int(t_off[-1]),):
        return ["text_end is missing or not one per token"]
    room = np.repeat(np.diff(o) - lengths, np.diff(t_off))
    if ends.size and (ends.min() < -2 or np.any(ends > room)):
        return ["a token's text_end lies outside its sample's text"]
    text = np.asarray(part["text"]).tobytes()
    for i, (a, b, n) in enumerate(zip(o[:-1], o[1:], lengths)):  # the prompt and the text are UTF-8 apart
        try:
            text[a : a + n].decode(), text[a + n : b].decode()
        except UnicodeDecodeError:
            return [f"sample {i}'s prompt or text is not UTF-8"]
    return []


def _temperature_problems(part: dict, encoding: dict, t: int, rows, ids, n_pos: int, tol: float) -> list[str]:
    lp, tail = part[f"topk_logprobs_{t}"].astype(np.float64), part[f"tail_logmass_{t}"].astype(np.float64)
    if tail.shape != (n_pos,) or lp.shape != ids.shape:
        return [f"temperature {t}: {lp.shape[0]} log-probs and {tail.shape[0]} tails for {ids.shape[0]} entries "
                f"and {n_pos} rows"]  # fmt: skip
    out = []
    if np.isnan(lp).any() or np.isnan(tail).any():
        out.append(f"temperature {t}: NaN log-probabilities")
    if (lp > 0).any() or (tail > 0).any():
        out.append(f"temperature {t}: positive log-probabilities")
    same_row = rows[1:] == rows[:-1]
    if (np.diff(lp)[same_row] > 0).any():
        out.append(f"temperature {t}: top-k log-probabilities are not sorted descending")
    if n_pos:
        worst = float(np.abs(np.bincount(rows, np.exp(lp), minlength=n_pos) + np.exp(tail) - 1).max())
        if worst > tol:
            out.append(f"temperature {t}: top-k mass + tail mass is off 1 by {worst:.3g} (tolerance {tol})")
    target = part.get(f"target_logprob_{t}")
    if encoding["target_logprob"] and target is None:
        out.append(f"temperature {t}: target log-probabilities are missing")
    if target is not None and (target.shape != (n_pos,) or np.isnan(target).any() or (target > 0).any()):
        out.append(f"temperature {t}: target log-probabilities are NaN, positive or misshapen")
    if encoding["draws"] and len(part[f"drawn_offsets_{t}"]) != n_pos + 1:
        out.append(f"temperature {t}: {len(part[f'drawn_offsets_{t}']) - 1} drawn-token rows for {n_pos} positions")
    return out


def _draw_problems(part: dict, encoding: dict, t: int, head_keys, n_pos: int, vocab_size: int) -> list[str]:
    out = []
    d_off, d_ids = part[f"drawn_offsets_{t}"], part[f"drawn_ids_{t}"]
    d_rows = np.repeat(np.arange(n_pos), np.diff(d_off))
    if exact_draws(encoding):
        lps, tail = part[f"drawn_logprobs_{t}"], part[f"tail_logmass_{t}"][d_rows]
        if lps.shape != d_ids.shape or np.isnan(lps).any() or (lps > tail + 1e-3).any():
            out.append(f"temperature {t}: drawn log-probabilities are NaN, above their tail mass or misshapen")
    else:
        sums = np.bincount(d_rows, part[f"drawn_counts_{t}"], minlength=n_pos)
        if ((sums != 0) & (sums != encoding["draws"]["n"])).any():
            out.append(f"temperature {t}: drawn counts do not sum to {encoding['draws']['n']} per row")
    if d_ids.size and (d_ids.min() < 0 or d_ids.max() >= vocab_size):
        out.append(f"temperature {t}: drawn token id outside the vocabulary")
    keys = np.concatenate([head_keys, d_rows.astype(np.int64) * vocab_size + d_ids])
    if len(np.unique(keys)) != len(keys):
        out.append(f"temperature {t}: a token appears twice in one row (head and drawn tokens overlap)")
    return out
