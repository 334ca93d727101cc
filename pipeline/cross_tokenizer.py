"""A cache serving a student whose tokenizer is not the teacher's.

The cache holds each sample's text and where every teacher token ends in it (storage/FORMAT.md, `encoding.text`).
`CrossTokenizerSource` tokenizes those texts with the student's tokenizer (its own chat template on the prompt, the
distilled span is the response), aligns the two tokenizations into chunks (pipeline.alignment), and hands the
training loop the student's tokens with the teacher's fields per chunk:

- `topk_ids`, `topk_logprobs`, `tail_logmass` [C, w]: the teacher's row at each chunk's first teacher token (its
  prediction from the same bytes of context as the student's at the chunk's first student token);
- `chunk_logprob` [C]: the teacher's log-likelihood of the chunk, the sum of its tokens' target_logprob;
- `chunk_first` [C]: which of the student's distilled positions starts each chunk; `chunk_of` [N]: the chunk of each
  student distilled position (−1 for none).

A chunk counts only when every token in it, on both sides, is distilled.

With a `Projection` (--loss pkl) the teacher's rows are instead carried over to every distilled student position, in
the student's vocabulary: a student token starts at byte o, inside (or at the start of) the teacher token whose row
predicts the bytes from its start a; of that row's head and drawn tokens, those whose bytes begin with the bytes
text[a:o] already written and go on are the teacher's continuations, and each continuation's weight (p, or the
Horvitz–Thompson weight of a drawn token) goes to the student token that begins what it adds (the longest student
token whose bytes start it). The row is normalized over them, so the sparse FKL on it is a KL of the teacher's
next-token prediction, conditioned on the bytes written, projected onto the student's tokens. Without draws, a
row at a token boundary (o = a) keeps the tail's mass in its bucket; elsewhere the head's continuations are
renormalized. Approximations: the teacher's one row stands for every way it might have split the written bytes,
and the longest student token for the student's own split. A position with no continuation (or a student token
that is not its own bytes, as a metaspace dummy prefix) gets an empty row: no loss.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline import alignment, data
from pipeline.errors import OptionError
from pipeline.sources import CacheSource, Source
from storage import CorruptCache

ROW_KEYS = ("topk_ids", "topk_logprobs", "tail_logmass")


class CrossTokenizerSource(Source):
    """The samples of one cache, re-tokenized for a student tokenizer, with the teacher's fields per chunk."""

    def __init__(
        self, cache: CacheSource, tokenizer, max_length: int, pieces: list[bytes] | None = None, projection=None
    ):
        if not cache.cache.encoding.get("text"):
            raise OptionError(
                f"{cache.path} records no text (written before 0.3, or from generated rows): it serves only students "
                "of the teacher's tokenizer; write the cache again with this version to distil across tokenizers"
            )
        if not cache.cache.has_target_logprob:
            raise OptionError(f"{cache.path} stores no target log-probs, which cross-tokenizer losses need")
        self.inner, self.part_sizes = cache, cache.part_sizes
        plain = cache.cache.manifest["identity"]["dataset"].get("template") == "plain-text"
        pieces = pieces if pieces is not None else alignment.token_bytes(tokenizer)
        texts = cache.cache.texts()
        self.rows = student_rows(tokenizer, pieces, texts, plain, max_length)
        self.projection, self.texts = projection, [t for _, t in texts] if projection else None
        self.lengths = np.array([len(r["input_ids"]) for r in self.rows], np.int64)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def caches(self) -> list:
        return self.inner.caches()

    def __getitem__(self, i):
        teacher, student = self.inner[i], self.rows[int(i)]
        if self.projection is None:
            return aligned_sample(teacher, student)
        return aligned_sample(teacher, student, projected_rows(teacher, student, self.texts[int(i)], self.projection))


def student_rows(tokenizer, pieces, texts: list[tuple[bytes, bytes]], plain: bool, max_length: int) -> list[dict]:
    """The student's tokens of each (prompt, text): input_ids, loss_mask and text_end (from its token bytes
    `pieces`), as the student's own cache would hold them."""
    out = []
    for a in range(0, len(texts), 1000):
        prompts = [_utf8(p) for p, _ in texts[a : a + 1000]]
        bodies = [_utf8(t) for _, t in texts[a : a + 1000]]
        rows = data.tokenize_texts(tokenizer, prompts, bodies, plain, max_length, pieces)
        out += [
            {"input_ids": np.asarray(x, np.int64), "loss_mask": np.asarray(m, np.uint8), "text_end": np.asarray(e)}
            for x, m, e in zip(rows["input_ids"], rows["loss_mask"], rows["text_end"])
        ]
    return out


def _utf8(text: bytes) -> str:
    try:
        return text.decode()
    except UnicodeDecodeError as e:
        raise CorruptCache(
            f"a cached text is not UTF-8 (byte {e.start}): the cache is damaged; run pipeline verify"
        ) from e


def aligned_sample(teacher: dict, student: dict, rows: dict | None = None) -> dict:
    """A training sample of the student's tokens with the teacher's fields per chunk, or the teacher's `rows` per
    student position (projected_rows) in place of the per-chunk rows (module docstring)."""
    ct, cs, n = alignment.chunks(np.asarray(teacher["text_end"]), student["text_end"])
    t_mask, s_mask = np.asarray(teacher["loss_mask"]).astype(bool), student["loss_mask"].astype(bool)
    whole = np.ones(n, bool)  # chunks every token of which is distilled, on both sides
    for c, mask in ((ct, t_mask), (cs, s_mask)):
        inside = c >= 0
        whole[c[inside & ~mask]] = False
    keep = np.cumsum(whole) - 1  # new chunk numbers
    ct, cs = (np.where((c >= 0) & whole[np.maximum(c, 0)], keep[np.maximum(c, 0)], -1) for c in (ct, cs))
    n = int(whole.sum())
    t_rows, s_pos = ct[t_mask], cs[s_mask]  # per teacher row / student distilled position: its chunk
    first_row = _firsts(t_rows, n)
    out = {
        "sample_index": teacher["sample_index"],
        "input_ids": student["input_ids"],
        "loss_mask": student["loss_mask"],
        "chunk_first": _firsts(s_pos, n),
        "chunk_of": s_pos,
        "chunk_logprob": np.bincount(
            t_rows[t_rows >= 0], np.asarray(teacher["target_logprob"])[t_rows >= 0], minlength=n
        ).astype(np.float32),
    }
    out.update(rows or {k: np.asarray(teacher[k])[first_row] for k in ROW_KEYS})
    return out


def _starts(ends: np.ndarray) -> dict[int, int]:
    """Token index → the byte where it starts, for the tokens in the text."""
    inside = np.nonzero(ends >= 0)[0]
    return dict(zip(inside.tolist(), np.r_[0, ends[inside][:-1]].tolist()))


def projected_rows(teacher: dict, student: dict, text: bytes, projection: Projection) -> dict:
    """Per distilled student position, the teacher's row projected onto the student's vocabulary (module
    docstring): topk_ids (student ids), topk_logprobs and tail_logmass; an empty row (all mass in the bucket, which
    gives no loss) where none applies."""
    t_ends, t_mask = np.asarray(teacher["text_end"]), np.asarray(teacher["loss_mask"]).astype(bool)
    t_row, t_start = np.cumsum(t_mask) - 1, _starts(t_ends)
    t_text = np.nonzero(t_ends >= 0)[0]  # the teacher's tokens in the text, whose ends never decrease
    stops = t_ends[t_text]
    head, head_lp, tail = (np.asarray(teacher[k]) for k in ("topk_ids", "topk_logprobs", "tail_logmass"))
    drawn = teacher.get("drawn_ids")
    drawn_lw = teacher.get("drawn_logweights", teacher.get("drawn_logprobs"))
    s_ends, s_ids, s_start = student["text_end"], student["input_ids"], _starts(student["text_end"])
    rows = []
    for i in np.nonzero(student["loss_mask"])[0].tolist():
        o, row = s_start.get(i), {}
        if o is None or s_ends[i] - o != len(projection.student[s_ids[i]]):  # outside the text, or a dummy prefix
            rows.append((row, -math.inf))
            continue
        k = int(np.searchsorted(stops, o, side="right"))  # the first to end after o covers it
        j = t_text[k] if k < len(t_text) else -1
        if j < 0 or not t_mask[j]:
            rows.append((row, -math.inf))
            continue
        r, written = t_row[j], text[t_start[j] : o]
        projection.continuations(head[r], head_lp[r], written, row)
        if drawn is not None:
            projection.continuations(drawn[r], drawn_lw[r], written, row)
        rows.append((row, float(tail[r]) if drawn is None and not written else -math.inf))
    return _row_arrays(rows)


def _row_arrays(rows: list[tuple[dict, float]]) -> dict:
    """(student id → weight, the bucket's log weight) per position → normalized rows padded with −1 / −inf; an empty
    row is all bucket."""
    width = max([1] + [len(r) for r, _ in rows])  # at least one column, so that a batch of empty rows has rows
    ids = np.full((len(rows), width), -1, np.int64)
    lps = np.full((len(rows), width), -np.inf, np.float32)
    tails = np.zeros(len(rows), np.float32)
    for n, (row, log_tail) in enumerate(rows):
        if not row:
            continue
        w = np.array(list(row.values()))
        total = w.sum() + math.exp(log_tail)
        ids[n, : len(w)], lps[n, : len(w)] = list(row), np.log(w / total)
        tails[n] = log_tail - math.log(total) if log_tail > -math.inf else -np.inf
    return {"topk_ids": ids, "topk_logprobs": lps, "tail_logmass": tails}


def _firsts(chunk_of: np.ndarray, n: int) -> np.ndarray:
    """Index of the first entry of each chunk 0 … n−1 (chunks appear in order)."""
    idx = np.nonzero(chunk_of >= 0)[0]
    starts = idx[np.r_[True, np.diff(chunk_of[idx]) != 0]] if len(idx) else idx
    return starts[:n].astype(np.int64)


def vocabulary_map(teacher_pieces: list[bytes], student_pieces: list[bytes]) -> np.ndarray:
    """[V_T] the student id of each teacher token whose bytes are a student token (GOLD's exact matches), −1 for
    none; one-to-one (a byte string the teacher holds twice maps once). Pieces: alignment.token_bytes."""
    student = {}
    for i, b in enumerate(student_pieces):
        student.setdefault(b, i)
    out, seen = np.full(len(teacher_pieces), -1, np.int64), set()
    for i, b in enumerate(teacher_pieces):
        if b and b not in seen and b in student:
            out[i] = student[b]
        seen.add(b)
    return out


class Projection:
    """Teacher tokens onto the student's vocabulary (module docstring): each side's token bytes (plain_pieces), and
    the student token that begins a byte string, the longest student token whose bytes start it (the same token
    where both vocabularies hold it; a byte-fallback token for a split UTF-8 character). A regular student token
    wins over an added one (`student_added` ids: byte-fallback tokens) of the same bytes."""

    def __init__(self, teacher_pieces: list[bytes], student_pieces: list[bytes], student_added=()):
        self.teacher, self.student = teacher_pieces, student_pieces
        self.ids, added = {}, set(student_added)
        for i, b in sorted(enumerate(student_pieces), key=lambda x: x[0] in added):
            if b:  # of tokens with the same bytes, the first regular one: the student writes "▁", not <0x20>
                self.ids.setdefault(b, i)
        self.longest = max(map(len, self.ids), default=0)
        self.firsts: dict[bytes, int] = {}  # first's answers: the same teacher tokens recur every sample and epoch

    def first(self, b: bytes) -> int:
        """The student token that begins `b`, −1 for none."""
        if b not in self.firsts:
            n = min(len(b), self.longest)
            while n and b[:n] not in self.ids:
                n -= 1
            self.firsts[b] = self.ids[b[:n]] if n else -1
        return self.firsts[b]

    def continuations(self, ids, log_weights, written: bytes, into: dict) -> None:
        """Add the weights of teacher tokens `ids` that begin with `written` and go on to the student token that
        begins what each adds."""
        for t, lw in zip(ids.tolist(), log_weights.tolist()):
            b = self.teacher[t] if t >= 0 else b""
            if len(b) > len(written) and b.startswith(written):
                s = self.first(b[len(written) :])
                if s >= 0:
                    into[s] = into.get(s, 0.0) + math.exp(lw)


def projection(teacher_tokenizer, tokenizer, pieces: list[bytes] | None = None) -> Projection:
    """The Projection of the teacher's tokenizer onto the student's (`pieces`: its alignment.token_bytes)."""
    pieces = pieces if pieces is not None else alignment.token_bytes(tokenizer)
    t_pieces = plain_pieces(teacher_tokenizer, alignment.token_bytes(teacher_tokenizer))
    return Projection(t_pieces, plain_pieces(tokenizer, pieces), getattr(tokenizer, "added_tokens_decoder", {}))


def plain_pieces(tokenizer, pieces: list[bytes]) -> list[bytes]:
    """`pieces` (alignment.token_bytes) with the tokenizer's special tokens emptied: their text is not their bytes
    (byte-fallback tokens such as <0x41>, which token_bytes reads as their byte, stay)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = {i for i, t in added.items() if t.special and pieces[i] == t.content.encode()}
    return [b"" if i in special else b for i, b in enumerate(pieces)]
