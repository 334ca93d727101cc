"""Encodings of a part's teacher rows: pure numpy encode/decode pairs (no torch), property-tested.

Rows are ragged: row r of a part owns entries [offsets[r], offsets[r+1]) of every flat per-entry array.

  widths      top_p_widths: the smallest teacher-sorted prefix whose mass reaches top_p, within [min_k, k]
  truncate    keep each row's prefix; the tail mass grows by the dropped entries, summed term by term
  ids         plain (narrowest unsigned integer) or bitpack (ceil(log2 V) bits per id)
  log-probs   float16 / float32, or power-quantized: u = (p_i / p_top1)^(1/γ) on a uniform grid of 2^bits − 1
              steps; decoding rescales each row to the exact head mass 1 − P_R, so the (k+1) bins sum to 1
              and stay sorted
  draws       N tokens drawn from the teacher's tail (Random-Sampling KD) as unique ids, each with its count
              (decoded as the unbiased estimate P_R · count / N of its probability) or its exact log-prob (float, or
              power-quantized relative to the tail mass: u = (p_j / P_R)^(1/γ)), with the Horvitz–Thompson weight
              p_j / π_j, π_j = 1 − (1 − p_j / P_R)^N, of the teacher-linear terms
  sketch      per position the teacher's final hidden state projected on r principal directions, symmetric
              absmax-quantized per row (codes of b bits around 2^(b−1) − 1, one float16 scale)
"""

from __future__ import annotations

import math

import numpy as np

POWER_GAMMA = 4.0


def uint_dtype(max_value: int) -> np.dtype:
    """Narrowest unsigned integer type holding max_value."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def id_bits(vocab_size: int) -> int:
    """ceil(log2 V) bits, at least 1."""
    return max(1, int(vocab_size - 1).bit_length())


def offsets_of(widths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)]).astype(np.int64)


# ---------------------------------------------------------------- bit packing


def _block(bits: int) -> tuple[int, int]:
    """(values, 64-bit words) in one repeating block: value i starts at bit i·bits of the stream."""
    values = 64 // math.gcd(bits, 64)
    return values, values * bits // 64


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2^bits → the little-endian bit stream as uint8: value i occupies stream bits
    [i·bits, (i+1)·bits), and stream bit j is bit (j mod 8) of byte j div 8."""
    values = np.asarray(values).astype(np.uint64).ravel()
    if not 1 <= bits <= 32:
        raise ValueError(f"bit width {bits} must lie in [1, 32]")
    if values.size and int(values.max()) >> bits:
        raise ValueError(f"value {int(values.max())} does not fit in {bits} bits")
    n_vals, n_words = _block(bits)
    blocks = -(-values.size // n_vals)
    v = np.zeros(blocks * n_vals, np.uint64)
    v[: values.size] = values
    v = v.reshape(blocks, n_vals)
    words = np.zeros((blocks, n_words + 1), np.uint64)
    for j in range(n_vals):
        w, s = divmod(j * bits, 64)
        words[:, w] |= v[:, j] << np.uint64(s)
        if s + bits > 64:
            words[:, w + 1] |= v[:, j] >> np.uint64(64 - s)
    return words[:, :n_words].astype("<u8").view(np.uint8).ravel()[: -(-values.size * bits // 8)].copy()


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_bits: the first n values, as uint32. Every 8 values span exactly `bits` bytes, so value 8q + j
    is read through an unaligned 64-bit window at byte q·bits + ⌊j·bits/8⌋, shifted by (j·bits) mod 8 and masked:
    eight strided column reads, no index arrays. Codes already unpacked (uint32, as the Arrow samples layout hands
    them over) pass through."""
    if isinstance(data, np.ndarray) and data.dtype == np.uint32:
        if data.size != n:
            raise ValueError(f"{data.size} unpacked codes where {n} are expected")
        return data
    data = np.asarray(data, np.uint8).ravel()
    if data.size != -(-n * bits // 8):
        raise ValueError(f"{data.size} packed bytes cannot hold exactly {n} values of {bits} bits")
    blocks = -(-n // 8)
    raw = np.zeros(blocks * bits + 8, np.uint8)
    raw[: data.size] = data
    word = np.uint32 if bits <= 25 else np.uint64  # shift (≤ 7) + bits fits the narrower window: half the work
    windows = np.ndarray((blocks, bits), dtype=np.dtype(word).newbyteorder("<"), buffer=raw, strides=(bits, 1))
    out = np.empty((blocks, 8), np.uint32)
    mask = word((1 << bits) - 1)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        out[:, j] = (windows[:, byte] >> word(shift)) & mask
    return out.ravel()[:n]


def encode_ids(ids: np.ndarray, codec: dict) -> np.ndarray:
    if codec["codec"] == "bitpack":
        return pack_bits(ids, codec["bits"])
    return np.asarray(ids).astype(codec["dtype"])


def decode_ids(data: np.ndarray, codec: dict, n: int) -> np.ndarray:
    if codec["codec"] == "bitpack":
        return unpack_bits(data, codec["bits"], n).view(np.int32)  # ids < 2^31: the same bits
    if np.asarray(data).size != n:
        raise ValueError(f"{np.asarray(data).size} ids stored where the row widths say {n}")
    return np.asarray(data).astype(np.int32)


# ---------------------------------------------------------------- widths and truncation


PREFIX = 64  # top_p_widths and truncate settle the rows that end within this many columns without the rest


def top_p_widths(logprobs: np.ndarray, top_p: float | None, min_k: int = 1) -> np.ndarray:
    """Per row of teacher-sorted log-probs [P, k]: the smallest prefix with mass ≥ top_p, at least min_k and at most
    k (top_p None: k; top_p 0 with min_k 0: empty, for Random-Sampling KD's draws alone). The first PREFIX columns
    settle the rows whose prefix ends there (a cumulative sum's prefix is the prefix's own), the rest see all k."""
    n, k = logprobs.shape
    if top_p is None:
        return np.full(n, k, np.int64)
    if top_p <= 0 or k == 0:  # the empty prefix already has mass 0
        return np.full(n, min(min_k, k), np.int64)
    reached, rows = np.full(n, k, np.int64), np.arange(n)
    for width in sorted({min(PREFIX, k), k}):
        mass = np.cumsum(np.exp(logprobs[rows, :width].astype(np.float64)), axis=1)
        done = mass[:, -1] >= top_p
        reached[rows[done]] = (mass[done] >= top_p).argmax(1) + 1
        rows = rows[~done]
    return np.clip(reached, min(min_k, k), k).astype(np.int64)


def log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 − e^x) for x ≤ 0, stable at both ends."""
    x = np.minimum(np.asarray(x, np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > -0.693, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def truncate(logprobs: np.ndarray, tail: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [P, k] with exact tail log-masses [P] → (the kept prefixes, flat [Σ widths]; the kept set's tail
    log-masses [P]), the dropped entries' probabilities added to the tail one by one (in the first PREFIX columns
    only for rows whose entries past them are all −inf: rows padded from a narrower top-k)."""
    n, k = logprobs.shape
    keep = np.arange(k)[None, :] < widths[:, None]
    c = min(PREFIX, k)
    padded = np.zeros(n, bool) if c == k else logprobs[:, c:].max(1, initial=-np.inf) == -np.inf
    dropped = np.zeros(n)
    for rows, width in ((np.nonzero(padded)[0], c), (np.nonzero(~padded)[0], k)):
        exp = np.exp(logprobs[rows, :width].astype(np.float64))
        dropped[rows] = np.where(keep[rows, :width], 0.0, exp).sum(1)
    with np.errstate(divide="ignore"):
        new_tail = np.log(np.exp(tail.astype(np.float64)) + dropped).astype(np.float32)
    return logprobs[keep], np.minimum(np.where(widths == k, tail, new_tail), 0).astype(np.float32)  # log 1 at most


# ---------------------------------------------------------------- log-probabilities


def _row_index(offsets: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _encode_power(flat, reference, codec: dict, lowest: int = 0) -> np.ndarray:
    """Log-probs (flat) under the log-prob codec: float16/float32 as they are, or power codes
    c = round((p / reference)^(1/γ) · (2^b − 1)) of at least `lowest`, stored uint8 at 8 bits, else bit-packed."""
    if codec["codec"] in ("float16", "float32"):
        return np.asarray(flat).astype(codec["codec"])
    levels = (1 << codec["bits"]) - 1
    with np.errstate(invalid="ignore", over="ignore"):
        u = np.exp(np.minimum(flat.astype(np.float64) - reference, 0.0) / codec["gamma"])
    codes = np.clip(np.rint(np.nan_to_num(u, nan=0.0) * levels), lowest, levels).astype(np.uint32)
    return codes.astype(np.uint8) if codec["bits"] == 8 else pack_bits(codes, codec["bits"])


def _stored(data: np.ndarray, codec: dict, n: int, what: str) -> np.ndarray:
    """n stored values: the floats, or the power codes unpacked; a count other than n is an error."""
    data = np.asarray(data)
    if codec["codec"] in ("float16", "float32") or codec["bits"] == 8:
        if data.size != n:
            raise ValueError(f"{data.size} {what} stored where the row widths say {n}")
        return data
    return unpack_bits(data, codec["bits"], n)


def encode_logprobs(flat: np.ndarray, offsets: np.ndarray, codec: dict) -> np.ndarray:
    """Head log-probs: power codes relative to each row's first (top-1) entry."""
    return _encode_power(flat, flat[offsets[:-1][_row_index(offsets)]].astype(np.float64), codec)


def decode_logprobs(data: np.ndarray, offsets: np.ndarray, tail: np.ndarray, codec: dict) -> np.ndarray:
    """Flat float32 log-probs; quantized rows are rescaled to the exact head mass 1 − exp(tail)."""
    n = int(offsets[-1])
    codes = _stored(data, codec, n, "log-probs" if codec["codec"] != "power" else "log-prob codes")
    if codec["codec"] in ("float16", "float32"):
        return codes.astype(np.float32)
    levels = (1 << codec["bits"]) - 1
    x_of = codec["gamma"] * np.log(np.maximum(np.arange(levels + 1), 0.5) / levels)  # one entry per code
    x = x_of.astype(np.float32)[codes]
    if not n:
        return x
    widths = np.diff(offsets)
    p = np.exp(x_of).astype(np.float32)[codes]
    if (widths == widths[0]).all():  # rectangular rows: reshape instead of reduceat and repeat
        norm = np.log(p.reshape(len(widths), -1).sum(1, dtype=np.float64))
        return (x.reshape(len(widths), -1) + (log1mexp(tail) - norm).astype(np.float32)[:, None]).ravel()
    live = widths > 0
    norm = np.zeros(len(widths))
    norm[live] = np.log(np.add.reduceat(p, offsets[:-1][live], dtype=np.float64))
    return x + np.repeat((log1mexp(tail) - norm).astype(np.float32), widths)


def bins_kl(exact_lp, exact_tail, lp, tail, offsets) -> np.ndarray:
    """Per row KL(exact ‖ decoded) over the (width + 1) bins (0·log 0 = 0)."""
    rows = _row_index(offsets)
    p = np.exp(exact_lp.astype(np.float64))
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (exact_lp.astype(np.float64) - lp.astype(np.float64)), 0.0)
        pt = np.exp(exact_tail.astype(np.float64))
        tail_term = np.where(pt > 0, pt * (exact_tail.astype(np.float64) - tail.astype(np.float64)), 0.0)
    return np.bincount(rows, terms, minlength=len(offsets) - 1) + tail_term


# ---------------------------------------------------------------- drawn tail tokens


def count_draws(draws: np.ndarray, values: np.ndarray | None = None):
    """Draws [P, N] (−1 where the row has no tail to draw from) → (widths [P], unique ids, counts), ids ascending
    within each row; with values [P, N] (one per draw, equal for equal ids) also each unique id's value."""
    order = np.argsort(np.asarray(draws, np.int64), axis=1, kind="stable")
    s = np.take_along_axis(np.asarray(draws, np.int64), order, 1)
    if s.size == 0:
        empty = (np.zeros(len(s), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return empty if values is None else empty + (np.zeros(0, np.float32),)
    new = np.ones_like(s, bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    starts = np.flatnonzero(new.ravel())
    counts = np.diff(np.append(starts, s.size))
    ids = s.ravel()[starts]
    keep = ids >= 0
    widths = (new & (s >= 0)).sum(1).astype(np.int64)
    if values is None:
        return widths, ids[keep], counts[keep]
    vals = np.take_along_axis(np.asarray(values, np.float32), order, 1).ravel()[starts]
    return widths, ids[keep], counts[keep], vals[keep]


def drawn_logprobs(counts: np.ndarray, offsets: np.ndarray, tail: np.ndarray, n_draws: int) -> np.ndarray:
    """log(P_R · count / N): each drawn token's unbiased probability estimate, flat float32."""
    rows = _row_index(offsets)
    with np.errstate(divide="ignore"):
        return (tail.astype(np.float64)[rows] + np.log(counts / n_draws)).astype(np.float32)


def encode_drawn_logprobs(flat: np.ndarray, offsets: np.ndarray, tail: np.ndarray, codec: dict) -> np.ndarray:
    """Exact drawn log-probs (flat, rows by offsets) under the log-prob codec; power codes are relative to the row's
    tail mass and at least 1 (a drawn token has mass)."""
    return _encode_power(flat, tail.astype(np.float64)[_row_index(offsets)], codec, lowest=1)


def decode_drawn_logprobs(data: np.ndarray, offsets: np.ndarray, tail: np.ndarray, codec: dict) -> np.ndarray:
    n = int(offsets[-1])
    codes = _stored(data, codec, n, "drawn log-probs" if codec["codec"] != "power" else "drawn log-prob codes")
    if codec["codec"] in ("float16", "float32"):
        return codes.astype(np.float32)
    levels = (1 << codec["bits"]) - 1
    x = codec["gamma"] * np.log(np.maximum(codes, 0.5) / levels)
    return (tail.astype(np.float64)[_row_index(offsets)] + x).astype(np.float32)


def inclusion_logweights(flat: np.ndarray, offsets: np.ndarray, tail: np.ndarray, n_draws: int) -> np.ndarray:
    """log(p_j / π_j), π_j = 1 − (1 − p_j / P_R)^N: the chance that N draws from the tail include j at all."""
    ratio = np.minimum(np.exp(flat.astype(np.float64) - tail.astype(np.float64)[_row_index(offsets)]), 1.0)
    with np.errstate(divide="ignore"):
        log_pi = log1mexp(n_draws * np.log1p(-np.minimum(ratio, 1 - 1e-16)))
    return (flat.astype(np.float64) - log_pi).astype(np.float32)


# ---------------------------------------------------------------- teacher sketch


def encode_sketch(coeffs: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients [P, r] → (codes, flat: uint8 at 8 bits, else bit-packed; scales [P] float16)."""
    zero = (1 << (bits - 1)) - 1
    c = np.asarray(coeffs, np.float32)
    scale = (np.abs(c).max(1) if c.size else np.zeros(len(c), np.float32)) / zero
    scale = scale.astype(np.float16)
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0)[:, None]
    codes = (np.clip(np.rint(c / safe), -zero, zero) + zero).astype(np.uint32).ravel()
    return (codes.astype(np.uint8) if bits == 8 else pack_bits(codes, bits)), scale


def decode_sketch(codes: np.ndarray, scale: np.ndarray, rank: int, bits: int) -> np.ndarray:
    n = len(scale) * rank
    raw = np.asarray(codes if bits == 8 else unpack_bits(codes, bits, n))[:n]
    if raw.size != n:
        raise ValueError(f"{raw.size} sketch codes stored where {len(scale)} rows of rank {rank} need {n}")
    zero = (1 << (bits - 1)) - 1
    return (raw.astype(np.float32).reshape(len(scale), rank) - zero) * scale.astype(np.float32)[:, None]


# ---------------------------------------------------------------- ragged → padded


def padded(flat: np.ndarray, offsets: np.ndarray, start: int, stop: int, pad) -> np.ndarray:
    """Rows [start, stop) of a ragged array as [stop − start, max width], right-padded with `pad` (a view when the
    rows share one width)."""
    return padded_rows([(flat, pad)], offsets, start, stop)[0]


def padded_rows(arrays: list, offsets: np.ndarray, start: int, stop: int) -> list[np.ndarray]:
    """padded() for several (flat, pad) arrays that share the offsets: the scatter positions are computed once
    (element j of row r goes to r · width + j − offset_r)."""
    o = offsets[start : stop + 1]
    widths = np.diff(o)
    if len(widths) and widths.min() == widths.max():
        return [flat[o[0] : o[-1]].reshape(len(widths), int(widths[0])) for flat, _ in arrays]
    width = int(widths.max()) if widths.size else 0
    where = np.arange(int(o[-1] - o[0])) + np.repeat(np.arange(len(widths)) * width - (o[:-1] - o[0]), widths)
    out = []
    for flat, pad in arrays:
        rows = np.full(len(widths) * width, pad, dtype=np.result_type(flat.dtype, np.min_scalar_type(pad)))
        rows[where] = flat[o[0] : o[-1]]
        out.append(rows.reshape(len(widths), width))
    return out
