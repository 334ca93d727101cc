"""The cache's encodings are pure numpy encode/decode pairs: round trips, ragged and empty rows, V = 2 and 151936."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from synthetic import log_softmax

from storage import codecs
from storage import part as part_io

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def naive_unpack(data, bits, n):
    """FORMAT.md's definition: stream bit j is bit (j mod 8) of byte j div 8; value i is stream bits [i·b, (i+1)·b)."""
    stream = np.unpackbits(np.asarray(data, np.uint8), bitorder="little")[: n * bits].reshape(n, bits)
    return (stream.astype(np.uint64) << np.arange(bits, dtype=np.uint64)).sum(1)


@st.composite
def packable(draw):
    bits = draw(st.integers(1, 32))
    values = draw(hnp.arrays(np.uint64, st.integers(0, 200), elements=st.integers(0, (1 << bits) - 1)))
    return bits, values


@st.composite
def ragged_rows(draw, max_k=12):
    """Teacher-sorted log-prob rows with exact tails, as a flat array and offsets (widths may be 0)."""
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(0, 20))
    vocab = draw(st.integers(k + 1, 60))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    lp = log_softmax(rng.standard_normal((n, vocab)) * draw(st.floats(0.1, 8)))
    lp = -np.sort(-lp, axis=1)
    widths = np.array([draw(st.integers(0, k)) for _ in range(n)], np.int64)
    keep = np.arange(vocab)[None, :] < widths[:, None]
    tail = np.log(np.where(keep, 0.0, np.exp(lp)).sum(1)).astype(np.float32)
    return lp[keep].astype(np.float32), codecs.offsets_of(widths), tail


# -- bit packing


@SETTINGS
@given(packable())
def test_bitpack_round_trips_and_follows_the_spec(case):
    bits, values = case
    data = codecs.pack_bits(values, bits)
    assert data.dtype == np.uint8 and data.size == -(-values.size * bits // 8)
    np.testing.assert_array_equal(codecs.unpack_bits(data, bits, values.size), values)
    np.testing.assert_array_equal(naive_unpack(data, bits, values.size), values)


@pytest.mark.parametrize("vocab", [2, 151936])
@pytest.mark.parametrize("codec", ["plain", "bitpack"])
def test_id_codecs_round_trip_at_the_extreme_vocabularies(vocab, codec):
    enc = part_io.make_encoding(k=1, vocab_size=vocab, ids=codec)["ids"]
    ids = np.random.default_rng(0).integers(0, vocab, 1001)
    ids[:2] = [0, vocab - 1]
    data = codecs.encode_ids(ids, enc)
    np.testing.assert_array_equal(codecs.decode_ids(data, enc, ids.size), ids)
    assert (enc["bits"] if codec == "bitpack" else np.dtype(enc["dtype"]).itemsize * 8) == {
        (2, "bitpack"): 1,
        (151936, "bitpack"): 18,
        (2, "plain"): 8,
        (151936, "plain"): 32,
    }[(vocab, codec)]


def test_a_truncated_bit_stream_is_refused():
    with pytest.raises(ValueError, match="cannot hold exactly"):
        codecs.unpack_bits(codecs.pack_bits(np.arange(10), 5)[:-1], 5, 10)


# -- widths and truncation


@SETTINGS
@given(st.integers(0, 2**31), st.floats(0.0, 1.0), st.integers(0, 6))
def test_top_p_width_is_the_smallest_prefix_reaching_the_mass(seed, top_p, min_k):
    rng = np.random.default_rng(seed)
    lp = -np.sort(-log_softmax(rng.standard_normal((30, 40)) * 3), axis=1)[:, :8]
    w = codecs.top_p_widths(lp, top_p, min_k)
    mass = np.cumsum(np.exp(lp.astype(np.float64)), 1)
    for r in range(30):
        assert min(min_k, 8) <= w[r] <= 8
        if top_p == 0:
            assert w[r] == min_k
            continue
        if w[r] > max(min_k, 1) and w[r] < 8:
            assert mass[r, w[r] - 1] >= top_p > mass[r, w[r] - 2]
        if w[r] == 8 and min_k < 8:
            assert mass[r, 6] < top_p


@SETTINGS
@given(st.integers(0, 2**31))
def test_truncation_moves_the_dropped_mass_into_the_tail(seed):
    rng = np.random.default_rng(seed)
    full = log_softmax(rng.standard_normal((12, 30)) * 4)
    lp = -np.sort(-full, axis=1)
    tail = np.log(np.exp(lp[:, 8:]).sum(1)).astype(np.float32)
    widths = rng.integers(0, 9, 12)
    flat, new_tail = codecs.truncate(lp[:, :8].astype(np.float32), tail, widths)
    total = np.bincount(np.repeat(np.arange(12), widths), np.exp(flat.astype(np.float64)), minlength=12)
    np.testing.assert_allclose(total + np.exp(new_tail.astype(np.float64)), 1, atol=1e-6)
    assert (new_tail >= tail - 1e-7).all()


@SETTINGS
@given(st.integers(0, 2**31), st.floats(0.05, 1.0))
def test_rows_padded_with_minus_inf_past_the_first_columns_get_the_widths_and_tails_of_whole_rows(seed, top_p):
    """Wider than codecs.PREFIX: rows −inf past a random column (a narrow top-k padded) and full rows, one by one."""
    rng = np.random.default_rng(seed)
    n, k = 24, codecs.PREFIX + 40
    lp = -np.sort(-log_softmax(rng.standard_normal((n, 400)) * rng.uniform(0.5, 5)), axis=1)[:, :k]
    tail = np.log1p(-np.minimum(np.exp(lp).sum(1), 1 - 1e-9)).astype(np.float32)
    for r in np.nonzero(rng.random(n) < 0.6)[0]:
        lp[r, rng.integers(1, k) :] = -np.inf
    lp = lp.astype(np.float32)
    widths = codecs.top_p_widths(lp, top_p, 1)
    flat, new_tail = codecs.truncate(lp, tail, widths)
    for r in range(n):
        mass = np.cumsum(np.exp(lp[r].astype(np.float64)))
        assert widths[r] == (np.argmax(mass >= top_p) + 1 if mass[-1] >= top_p else k)
        dropped = np.exp(lp[r, widths[r] :].astype(np.float64)).sum()
        want = tail[r] if widths[r] == k else np.log(np.exp(np.float64(tail[r])) + dropped)
        np.testing.assert_allclose(new_tail[r], min(want, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(flat, np.concatenate([lp[r, : widths[r]] for r in range(n)]))


# -- log-probabilities


@SETTINGS
@given(ragged_rows(), st.sampled_from(["float32", "float16", "q8", "q6", "q4", "q2"]))
def test_logprob_codecs_keep_rows_sorted_and_summing_to_one(rows, name):
    flat, offsets, tail = rows
    codec = part_io.LOGPROB_CODECS[name]
    data = codecs.encode_logprobs(flat, offsets, codec)
    got = codecs.decode_logprobs(data, offsets, tail, codec)
    assert got.shape == flat.shape and got.dtype == np.float32
    rows_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    assert (np.diff(got)[rows_of[1:] == rows_of[:-1]] <= 0).all(), "sorted within each row"
    total = np.bincount(rows_of, np.exp(got.astype(np.float64)), minlength=len(offsets) - 1) + np.exp(tail)
    nonempty = np.diff(offsets) > 0
    np.testing.assert_allclose(total[nonempty], 1, atol={"float16": 5e-3}.get(name, 1e-5))
    if name == "q8" and flat.size:
        assert codecs.bins_kl(flat, tail, got, tail, offsets).max() < 2e-3


def test_eight_bit_decode_error_is_small_on_lm_like_rows():
    """The figure FORMAT.md quotes: mean KL(exact ‖ decoded) of the 65 bins stays near 2·10⁻⁵ nats."""
    rng = np.random.default_rng(0)
    z = -1.1 * np.log(np.arange(1, 5001)) + rng.gumbel(size=(500, 5000)) * 1.5
    lp = -np.sort(-log_softmax(z), axis=1)
    tail = np.log(np.exp(lp[:, 64:]).sum(1)).astype(np.float32)
    flat, offsets = lp[:, :64].ravel().astype(np.float32), codecs.offsets_of(np.full(500, 64))
    got = codecs.decode_logprobs(
        codecs.encode_logprobs(flat, offsets, part_io.LOGPROB_CODECS["q8"]), offsets, tail, part_io.LOGPROB_CODECS["q8"]
    )
    kl = codecs.bins_kl(flat, tail, got, tail, offsets)
    assert kl.mean() < 5e-5 and kl.max() < 2e-4


def test_quantized_top1_is_exact_up_to_the_head_mass():
    flat = np.log(np.array([0.5, 0.2, 0.1], np.float32))
    tail = np.log(np.array([0.2], np.float32))
    offsets = codecs.offsets_of([3])
    got = codecs.decode_logprobs(
        codecs.encode_logprobs(flat, offsets, part_io.LOGPROB_CODECS["q8"]), offsets, tail, part_io.LOGPROB_CODECS["q8"]
    )
    np.testing.assert_allclose(np.exp(got), [0.5, 0.2, 0.1], rtol=0.02)


# -- drawn tail tokens


@SETTINGS
@given(hnp.arrays(np.int64, st.tuples(st.integers(0, 8), st.integers(1, 30)), elements=st.integers(-1, 9)))
def test_draw_counts_round_trip(draws):
    draws = np.where((draws < 0).any(1, keepdims=True), -1, draws)  # a row draws everything or nothing
    widths, ids, counts = codecs.count_draws(draws)
    off = codecs.offsets_of(widths)
    for r in range(len(draws)):
        got = np.repeat(ids[off[r] : off[r + 1]], counts[off[r] : off[r + 1]])
        want = np.sort(draws[r][draws[r] >= 0])
        np.testing.assert_array_equal(got, want)
        assert (np.diff(ids[off[r] : off[r + 1]]) > 0).all()


def test_drawn_estimate_is_unbiased():
    """E[P_R · count_j / N] = p_j for every tail token j (Random-Sampling KD's estimator)."""
    rng = np.random.default_rng(0)
    p_tail = np.array([0.05, 0.03, 0.015, 0.005])  # the teacher's tail tokens; P_R = 0.1
    draws = rng.choice(4, size=(20000, 10), p=p_tail / p_tail.sum())
    widths, ids, counts = codecs.count_draws(draws)
    est = np.exp(codecs.drawn_logprobs(counts, codecs.offsets_of(widths), np.full(20000, np.log(0.1)), 10))
    mean = np.bincount(ids, est.astype(np.float64), minlength=4) / 20000
    np.testing.assert_allclose(mean, p_tail, rtol=0.03)


# -- ragged → padded


@SETTINGS
@given(st.lists(st.integers(0, 5), max_size=10), st.data())
def test_padded_rows_hold_each_row_then_the_pad(widths, data):
    widths = np.array(widths, np.int64)
    off = codecs.offsets_of(widths)
    flat = np.arange(off[-1], dtype=np.int32)
    start = data.draw(st.integers(0, len(widths)))
    stop = data.draw(st.integers(start, len(widths)))
    got = codecs.padded(flat, off, start, stop, -1)
    assert got.shape == (stop - start, int(widths[start:stop].max()) if stop > start else 0)
    for r in range(start, stop):
        np.testing.assert_array_equal(got[r - start, : widths[r]], flat[off[r] : off[r + 1]])
        assert (got[r - start, widths[r] :] == -1).all()
