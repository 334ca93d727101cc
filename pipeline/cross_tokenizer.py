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
"""

from __future__ import annotations

import numpy as np

from pipeline import alignment, data
from pipeline.errors import OptionError
from pipeline.sources import CacheSource, Source
from storage import CorruptCache

ROW_KEYS = ("topk_ids", "topk_logprobs", "tail_logmass")


class CrossTokenizerSource(Source):
    """The samples of one cache, re-tokenized for a student tokenizer, with the teacher's fields per chunk."""

    def __init__(self, cache: CacheSource, tokenizer, max_length: int, pieces: list[bytes] | None = None):
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
        self.rows = student_rows(tokenizer, pieces, cache.cache.texts(), plain, max_length)
        self.lengths = np.array([len(r["input_ids"]) for r in self.rows], np.int64)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def caches(self) -> list:
        return self.inner.caches()

    def __getitem__(self, i):
        return aligned_sample(self.inner[i], self.rows[int(i)])


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


def aligned_sample(teacher: dict, student: dict) -> dict:
    """A training sample of the student's tokens with the teacher's fields per chunk (module docstring)."""
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
    out.update({k: np.asarray(teacher[k])[first_row] for k in ROW_KEYS})
    return out


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
