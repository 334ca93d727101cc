"""Where each token of a text sits in its bytes, and the chunks on which two tokenizations of one text agree.

A tokenizer's tokens are byte strings (`token_bytes`: byte-level BPE maps each character of a token to one byte;
SentencePiece-style metaspace vocabularies write a space as ▁ and raw bytes as <0xAB>). `text_ends` walks a
token sequence over the UTF-8 bytes of the text it came from and gives each token the byte offset where it ends:
−1 for a token that is not part of the text (a template, BOS, an appended EOS) and for every token after the first
one that does not match (a normalizing tokenizer). A metaspace tokenizer's dummy prefix (a ▁ not in the text) is a
token of no bytes, or a leading space the text lacks.

Two tokenizations of one text agree on a *chunk* `[a, b)` when both have token boundaries at `a` and `b` and none
in between on both (ALM's and GOLD's notion): `chunks` finds them, and which tokens of each side form each one.
Everything here is numpy over token ids and offsets; the tokenizer is only read to build `token_bytes`.
"""

from __future__ import annotations

import json

import numpy as np

from pipeline.errors import OptionError

NOT_TEXT = -1  # a token outside the text
END = -2  # the sequence's closing EOS: the end of the text on either side


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte ↔ printable character table, reversed: character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.dumps(json.loads(backend.to_str()).get("decoder")) if backend is not None else ""


def byte_scheme(tokenizer) -> str | None:
    """ "byte-level" or "metaspace", from the fast tokenizer's decoder; None when its tokens' bytes cannot be told."""
    decoder = _decoder(tokenizer)
    if "ByteLevel" in decoder:
        return "byte-level"
    if "Metaspace" in decoder or "\\u2581" in decoder or "▁" in decoder:
        return "metaspace"
    return None


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes (a special token's: its text); a tokenizer of no byte_scheme is refused in one line."""
    family = byte_scheme(tokenizer)
    if family is None:
        raise OptionError(
            f"cannot tell the bytes of {type(tokenizer).__name__}'s tokens (decoder {_decoder(tokenizer) or 'none'}); "
            "cross-tokenizer distillation needs a fast tokenizer with a byte-level or metaspace (SentencePiece-style) "
            "vocabulary"
        )
    alphabet = byte_level_alphabet()
    special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    out = []
    for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        piece = piece or ""
        if family == "metaspace" and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif piece in special:
            out.append(piece.encode())
        elif family == "byte-level":
            out.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode())
        else:
            out.append(piece.replace("▁", " ").encode())
    return out


def text_ends(ids, pieces: list[bytes], text: bytes, special_ids=(), eos_id: int | None = None) -> np.ndarray:
    """Per token of `ids`, the byte offset in `text` where it ends (NOT_TEXT outside the text, END for an EOS right
    after the text's last byte). Tokens match in order from byte 0; a special token that does not match is outside
    the text; the first other mismatch ends the walk."""
    out = np.full(len(ids), NOT_TEXT, np.int32)
    at, special = 0, set(special_ids)
    for i, t in enumerate(np.asarray(ids).tolist()):
        b = pieces[t] if 0 <= t < len(pieces) else b""
        if b and text.startswith(b, at):
            at += len(b)
        elif b[:1] == b" " and text.startswith(b[1:], at) and (at == 0 or text[at - 1 : at] != b" "):
            at += len(b) - 1  # a metaspace dummy prefix
        elif t == eos_id and at == len(text):
            out[i] = END
            continue
        elif t in special:
            continue
        else:
            break
        out[i] = at
    return out


def chunks(ends_a: np.ndarray, ends_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The chunks two tokenizations of one text agree on, in text order: per token of each side its chunk number
    (−1 for none), and the number of chunks. A chunk holds consecutive text tokens of each side (a token of no bytes
    joins the next chunk); a run with a token outside the text inside it is no chunk. Both sides closing with
    END after the text's last byte add a last chunk of their two EOS tokens."""
    ca, cb = np.full(len(ends_a), -1, np.int64), np.full(len(ends_b), -1, np.int64)
    ta, tb = _text_tokens(ends_a), _text_tokens(ends_b)
    common = np.intersect1d(ends_a[ta], ends_b[tb])
    common = common[common > 0]
    n, start = 0, 0
    for stop in common.tolist():
        ia, ib = _members(ends_a, ta, start, stop), _members(ends_b, tb, start, stop)
        if ia is not None and ib is not None:
            ca[ia], cb[ib], n = n, n, n + 1
        start = stop
    last = int(common[-1]) if len(common) else -1
    ea, eb = np.nonzero(ends_a == END)[0], np.nonzero(ends_b == END)[0]
    if len(ea) and len(eb) and last >= 0 and _closes(ends_a, ea[0], last) and _closes(ends_b, eb[0], last):
        ca[ea[0]], cb[eb[0]], n = n, n, n + 1
    return ca, cb, n


def _text_tokens(ends: np.ndarray) -> np.ndarray:
    return np.nonzero(ends >= 0)[0]


def _members(ends: np.ndarray, text: np.ndarray, start: int, stop: int) -> np.ndarray | None:
    """Indices of the tokens spanning bytes [start, stop) (a token of no bytes at `start` included); None when they
    are not consecutive tokens."""
    starts = np.concatenate([[0], ends[text][:-1]])
    inside = text[(starts >= start) & (ends[text] <= stop) & ((starts < stop) | (ends[text] == start))]
    if not len(inside) or inside[-1] - inside[0] + 1 != len(inside) or ends[inside[-1]] != stop:
        return None
    return inside


def _closes(ends: np.ndarray, eos: int, last: int) -> bool:
    """The EOS at `eos` follows the last text token directly, and that token ends at byte `last`."""
    return eos > 0 and ends[eos - 1] == last
