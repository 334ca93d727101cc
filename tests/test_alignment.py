"""Aligning two tokenizations of one text: each token's bytes, where it ends in the text, and the chunks both
tokenizations agree on. The property first: every chunk is the same bytes of the text on both sides, in order;
then the tricky cases one by one."""

import numpy as np
import pytest

from pipeline import alignment
from pipeline.errors import OptionError
from stages.prepare_demo import save_tokenizer

TEXTS = [
    "hello world  two spaces and\ttabs\n\nnew lines",
    "naïve café ünïcode 日本語 emoji 🙂 ok ß",
    "The quick brown fox jumps over the lazy dog. 1234567890",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "byte-level": save_tokenizer(root / "bl", TEXTS * 20, 330, "byte-level"),
        "byte-level-small": save_tokenizer(root / "bls", TEXTS * 20, 270, "byte-level"),
        "metaspace": save_tokenizer(root / "ms", TEXTS * 20, 330, "metaspace"),
    }


def ends_of(tok, text: str, eos: bool = True, bos: bool = False):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = ([tok.bos_token_id] if bos else []) + ids + ([tok.eos_token_id] if eos else [])
    pieces = alignment.token_bytes(tok)
    return ids, pieces, alignment.text_ends(ids, pieces, text.encode(), tok.all_special_ids, tok.eos_token_id)


def chunk_bytes(ids, pieces, chunk, n):
    return [b"".join(pieces[ids[i]] for i in np.nonzero(chunk == c)[0]) for c in range(n)]


SAMPLES = [
    "hello world",
    "  two  spaces\t\tand tabs",
    "日本語 é🙂 ß naïve",
    "fox  jumps\nover\n\nthe dog",
    "unseen wörds: ǅ ₿ 𝄞 zebra-quokka",
]


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("pair", [("byte-level", "metaspace"), ("byte-level", "byte-level-small")])
def test_every_chunk_is_the_same_bytes_of_the_text_on_both_sides(tokenizers, pair, text):
    a, b = (tokenizers[p] for p in pair)
    ia, pa, ea = ends_of(a, text)
    ib, pb, eb = ends_of(b, text)
    assert ea[-2] == eb[-2] == len(text.encode())  # each side's tokens cover the whole text
    ca, cb, n = alignment.chunks(ea, eb)
    assert n >= 2 and ca[-1] == cb[-1] == n - 1  # the two EOS tokens close the last chunk
    text_a, text_b = chunk_bytes(ia, pa, ca, n - 1), chunk_bytes(ib, pb, cb, n - 1)
    for x, y in zip(text_a, text_b):
        assert x.lstrip(b" ") == y.lstrip(b" ") or x == y  # a metaspace dummy prefix is the only difference
    assert b"".join(text_a) == text.encode()
    for c in (ca, cb):  # chunks are consecutive tokens, numbered in text order
        kept = c[c >= 0]
        assert (np.diff(kept) >= 0).all() and (np.diff(np.nonzero(c >= 0)[0]) == 1).all()


def test_a_multibyte_character_split_inside_by_one_side_stays_inside_one_chunk(tokenizers):
    ia, pa, ea = ends_of(tokenizers["byte-level-small"], "🙂")  # four bytes, cut into pieces by byte-level BPE
    ib, pb, eb = ends_of(tokenizers["metaspace"], "🙂")
    ca, cb, n = alignment.chunks(ea, eb)
    assert n == 2 and chunk_bytes(ia, pa, ca, 1) == ["🙂".encode()]


def test_bos_on_one_side_only_is_outside_the_text(tokenizers):
    ia, _, ea = ends_of(tokenizers["byte-level"], "hello world", bos=True)
    assert ea[0] == alignment.NOT_TEXT and ea[-2] == len("hello world")
    _, _, eb = ends_of(tokenizers["metaspace"], "hello world")
    ca, cb, n = alignment.chunks(ea, eb)
    assert ca[0] == -1 and ca[1] == 0 and cb[0] == 0


def test_eos_on_one_side_only_adds_no_chunk(tokenizers):
    _, _, ea = ends_of(tokenizers["byte-level"], "hello world", eos=False)
    _, _, eb = ends_of(tokenizers["metaspace"], "hello world")
    ca, cb, n = alignment.chunks(ea, eb)
    assert cb[-1] == -1 and ca.max() == n - 1


def test_truncation_on_one_side_keeps_the_chunks_before_it(tokenizers):
    text = "fox  jumps\nover\n\nthe dog"
    _, _, ea = ends_of(tokenizers["byte-level"], text)
    _, _, eb = ends_of(tokenizers["metaspace"], text)
    full = alignment.chunks(ea, eb)
    cut = alignment.chunks(ea[:4], eb)
    assert 0 < cut[2] < full[2]
    assert (cut[0] == full[0][:4]).all() and (cut[1] == np.where(full[1] < cut[2], full[1], -1)).all()


def test_a_token_that_does_not_match_ends_the_walk():
    pieces = [b"ab", b"c", b"X", b"d"]
    ends = alignment.text_ends([0, 1, 2, 3], pieces, b"abcd")
    assert ends.tolist() == [2, 3, -1, -1]


def test_a_special_token_inside_the_text_that_does_not_match_is_outside_it():
    pieces = [b"ab", b"<sep>", b"cd"]
    ends = alignment.text_ends([0, 1, 2], pieces, b"abcd", special_ids=[1])
    assert ends.tolist() == [2, -1, 4]
    ca, cb, n = alignment.chunks(ends, np.array([4], np.int32))  # the other side: one token "abcd"
    assert n == 0  # the run across the special token is no chunk


def test_the_byte_level_alphabet_is_a_bijection_onto_bytes():
    table = alignment.byte_level_alphabet()
    assert sorted(table.values()) == list(range(256)) and len(table) == 256
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n")


def test_a_tokenizer_of_unknown_byte_scheme_is_refused_in_one_line(tokenizers):
    from tokenizers import decoders

    tok = tokenizers["byte-level"]
    backend = tok.backend_tokenizer
    saved = backend.decoder
    backend.decoder = decoders.WordPiece()
    try:
        with pytest.raises(OptionError, match="byte-level or metaspace"):
            alignment.token_bytes(tok)
    finally:
        backend.decoder = saved
