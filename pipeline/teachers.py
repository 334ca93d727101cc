"""Where a training batch's teacher fields come from: one interface, several implementations.

A teacher gives the training loop its samples (`source`: map-style, with `lengths` and `part_sizes` for the epoch
plan) and, for each collated batch on the device, its teacher fields (`fields(batch)`): the sparse fields of
pipeline.losses (topk_ids, topk_logprobs, tail_logmass, and drawn_ids/drawn_logprobs, target_logprob when
known) or dense `teacher_logits`. Cached fields travel with the samples through the DataLoader; an online teacher
computes them from the batch; SFT has none. Here too: the policy checks of what a cache can serve (which losses a
head-less cache feeds, what `pg` needs, whose token ids a student can read), and the rows themselves computed
from a teacher's logits (`topk_rows`, `draw_tail`), shared by cache-teacher and the online teacher.
"""

from __future__ import annotations

import functools
import warnings

import torch

from pipeline import alignment, losses, models
from pipeline import cross_tokenizer as cross
from pipeline.batches import TEACHER_KEYS
from pipeline.errors import OptionError
from pipeline.sources import CacheSource, MixtureSource, Source


class Teacher:
    """No teacher: plain fine-tuning on the source's tokens."""

    kind = "none"

    def __init__(self, source: Source):
        self.source = source

    def fields(self, batch: dict) -> dict:
        return {}


class CachedTeacher(Teacher):
    """Rows read from teacher caches along with the samples: one cache, or several mixed (sources.MixtureSource).
    Caches with a teacher sketch add its basis (the same for every batch) beside their rows."""

    kind = "cache"

    def __init__(self, source: Source):
        super().__init__(source)
        sketches = [c.manifest.get("sketch", {}).get("sha256") for c in source.caches()]
        if len(set(sketches)) > 1:
            raise OptionError(
                "the mixed caches differ in their teacher sketch (--sketch-rank, or the directions fitted); mix "
                "caches written with one sketch, or all without"
            )
        sketch = source.caches()[0].sketch()
        self.basis = None if sketch is None else torch.from_numpy(sketch["basis"])

    def fields(self, batch: dict) -> dict:
        out = {k: batch[k] for k in TEACHER_KEYS if k in batch}
        if self.basis is not None and "sketch_coeffs" in out:
            self.basis = self.basis.to(out["sketch_coeffs"].device)
            out["sketch_basis"] = self.basis
        return out


def cached(paths, shares=(), temperature=None) -> CachedTeacher:
    """The teacher of one cache, or of several with one share each (two caches and one share: the second's, λ)."""
    return CachedTeacher(_mixed([CacheSource(p, temperature) for p in paths], shares))


def _mixed(sources: list[Source], shares) -> Source:
    if len(sources) == 1:
        return sources[0]
    shares = tuple(shares) if len(shares) == len(sources) else (1 - shares[0], shares[0])
    return MixtureSource(sources, list(shares))


class CrossTokenizerTeacher(CachedTeacher):
    """Rows of caches written with another tokenizer, per chunk of the student's tokens (pipeline.cross_tokenizer),
    with the teacher → student vocabulary map beside them when the loss needs it (gold)."""

    def __init__(self, source: Source, vocab_map: torch.Tensor | None = None):
        super().__init__(source)
        self.vocab_map = vocab_map

    def fields(self, batch: dict) -> dict:
        out = super().fields(batch)
        if self.vocab_map is not None and "chunk_first" in out:
            self.vocab_map = self.vocab_map.to(out["chunk_first"].device)
            out["vocab_map"] = self.vocab_map
        return out


def cross_tokenizer(
    paths, shares, temperature, tok, max_length: int, teacher_tok=None, kind: str = "gold"
) -> CrossTokenizerTeacher:
    """The teacher of caches for a student of tokenizer `tok` (any tokenizer); with the teacher's tokenizer, what the
    loss `kind` needs of it: the vocabulary map of exact matches (gold), or the rows projected onto the student's
    vocabulary at every position (pkl)."""
    plain, pieces = [CacheSource(p, temperature) for p in paths], alignment.token_bytes(tok)
    projection = cross.projection(teacher_tok, tok, pieces) if teacher_tok is not None and kind == "pkl" else None
    source = _mixed([cross.CrossTokenizerSource(s, tok, max_length, pieces, projection) for s in plain], shares)
    if teacher_tok is None:
        return CrossTokenizerTeacher(source)
    fingerprint = models.tokenizer_fingerprint(teacher_tok)
    for s in plain:
        if cache_vocabulary(s.cache.manifest)["fingerprint"] != fingerprint:
            raise OptionError(
                f"{s.path} was written with another tokenizer than --teacher-tokenizer; --loss gold and pkl map one "
                "teacher vocabulary: give the caches' own teacher tokenizer, and mix only caches that share it"
            )
    if projection is not None:
        return CrossTokenizerTeacher(source)
    vocab_map = cross.vocabulary_map(alignment.token_bytes(teacher_tok), pieces)
    return CrossTokenizerTeacher(source, torch.from_numpy(vocab_map))


class OnlineTeacher(Teacher):
    """The teacher model run on every batch: dense full-vocabulary logits (the reference for a cache's fidelity), or
    top-k + exact tail computed on the fly (topk=k), the rows a cache would have stored."""

    kind = "online"

    def __init__(self, source, model, vocab_size: int, topk: int | None = None, temperature: float = 1.0):
        super().__init__(source)
        self.head = models.PositionLogits(model, vocab_size)
        self.topk, self.temperature = topk, temperature

    @torch.no_grad()
    def fields(self, batch: dict) -> dict:
        was_training = self.head.model.training
        self.head.model.eval()
        logits = self.head(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch["row_index"],
            batch["col_index"],
            batch.get("position_ids"),
        ).float()
        self.head.model.train(was_training)
        if not self.topk:
            return {"teacher_logits": logits}
        r = topk_rows(logits, self.topk, [self.temperature], batch["targets"].to(logits.device))
        return {
            "topk_ids": r["ids"],
            "topk_logprobs": r["logprobs"][0],
            "tail_logmass": r["tail"][0],
            "target_logprob": r["target"][0],
        }


def check_serves(source, kind: str, *, beta: float = 0.5, tail: str = "bucket", allow_offpolicy_pg: bool = False):
    """Refuse, in one line, a loss that the source's cached rows cannot feed."""
    caches = source.caches()
    if any(c.encoding.get("top_p") == 0 and c.encoding.get("min_k") == 0 for c in caches):
        if kind in losses.KINDS and not losses.has_teacher_weighted_terms(kind, beta):
            raise OptionError(
                f"--loss {kind}{f' --beta {beta:g}' if kind == 'jsd' else ''} gets its signal from terms "
                "weighted by the student's probabilities, and a cache without a head (--top-p 0 --min-k 0:"
                " tail draws only) gives those none; use fkl, sfkl or jsd with --beta < 1, or a cache "
                "with a head (--top-p 0.5 --tail-draws 16)"
            )
        if tail == "renormalize":
            raise OptionError(
                "--tail renormalize renormalizes the head, and this cache has none (--top-p 0 --min-k 0); "
                "use --tail bucket"
            )
    if tail == "renormalize" and any(c.encoding.get("draws") or c.encoding.get("sketch") for c in caches):
        warnings.warn(
            "--tail renormalize drops the tail, and with it the cache's tail draws and sketch; --tail bucket uses them"
        )
    if kind == "pg":
        if not all(c.has_target_logprob for c in caches):
            raise OptionError(
                "--loss pg needs the teacher's log-prob of each sampled token: a version-2 cache of "
                "generated data (cache-teacher stores target_logprob)"
            )
        own = [c for c in caches if c.manifest["identity"].get("dataset", {}).get("generated_by")]
        if len(own) < len(caches) and not allow_offpolicy_pg:
            raise OptionError(
                "--loss pg is a policy gradient on tokens the student sampled, and a cache here holds data "
                "no model generated (no generated_by in its manifest); cache `pipeline generate` output, "
                "or pass --allow-offpolicy-pg"
            )


def cache_vocabulary(manifest: dict) -> dict:
    """What a cache's ids mean: its tokenizer's fingerprint, softmax size and largest stored id."""
    return {
        "fingerprint": manifest["identity"]["tokenizer"]["fingerprint"],
        "size": manifest["vocab_size"],
        "max_id": manifest["counts"].get("max_token_id", -1),
    }


def model_vocabulary(tok) -> dict:
    return {"fingerprint": models.tokenizer_fingerprint(tok), "size": len(tok), "max_id": len(tok) - 1}


def check_caches_readable(source: Source, tok, model, allow_mismatch: bool = False, what: str = "cache") -> None:
    """check_compatible for every cache behind a source."""
    for c in source.caches():
        check_compatible(cache_vocabulary(c.manifest), tok, model, allow_mismatch, what)


def check_compatible(vocabulary: dict, tok, model, allow_mismatch: bool = False, what: str = "cache") -> int:
    """The softmax size; refuses teacher rows whose token ids the student (model and tok) cannot read as the same
    tokens, with the reason."""
    vocab = models.check_vocab(model, tok, "student")
    size, max_id = vocabulary["size"], vocabulary["max_id"]
    if max_id >= vocab or size > models.output_size(model):
        raise OptionError(
            f"the {what} holds token ids up to {max(max_id, size - 1)} but the student's vocabulary has "
            f"{vocab}; use a student that shares the teacher's tokenizer"
        )
    if models.tokenizer_fingerprint(tok) != vocabulary["fingerprint"]:
        if not allow_mismatch:
            raise OptionError(
                f"the student's tokenizer differs from the {what}'s; pass --allow-tokenizer-mismatch if "
                "the ids really mean the same tokens"
            )
        warnings.warn(f"student tokenizer differs from the {what}'s; continuing (--allow-tokenizer-mismatch)")
    if size != vocab and not allow_mismatch:
        raise OptionError(f"the {what}'s softmax runs over {size} tokens, the student's tokenizer has {vocab}")
    return vocab


# ---------------------------------------------------------------- rows from logits


def topk_rows(
    logits: torch.Tensor, k: int, temperatures, targets: torch.Tensor | None = None, weights: bool = False
) -> dict:
    """Rows of float32 logits [P, V] → ids [P, k] (sorted by p), logprobs [T, P, k], tail [T, P] with
    log P_R = log Σ_{j ∉ top-k} exp(z_j / t) − logsumexp(z / t), summed over the non-top-k terms themselves (by
    blocks), target [T, P] (log p of `targets`, when given), and finite [P]: a NaN or +inf logit makes the row's
    log-normalizer non-finite, which is how rows are checked. One exp and one sum over [P, V] per temperature. With
    `weights`, also the tail's unnormalized weights per temperature, exp((z − z_top1) / t) with the top-k ids at 0,
    and their block sums: what draw_tail draws from, without a second pass."""
    vals, ids = topk(logits, k)
    lps, tails, target_lps, kept, sums = [], [], [], [], []
    for t in temperatures:
        top = vals[:, :1] / t
        e = (logits - top if t == 1 else (logits / t).sub_(top)).exp_().scatter_(-1, ids, 0.0)
        block_sums, head = blocks(e).sum(-1), vals / t - top
        tail = block_sums.sum(-1)
        log_z = (tail + head.exp().sum(-1)).log()
        lps.append(head - log_z[:, None])
        if targets is not None:
            target_lps.append(logits.gather(-1, targets[:, None])[:, 0] / t - top[:, 0] - log_z)
        tails.append(tail.log() - log_z)
        kept.append(e if weights else None)
        sums.append(block_sums if weights else None)
    finite = torch.isfinite(log_z) & torch.isfinite(top[:, 0])
    return {
        "ids": ids,
        "logprobs": torch.stack(lps),
        "tail": torch.stack(tails),
        "target": torch.stack(target_lps) if targets is not None else None,
        "finite": finite,
    } | ({"weights": kept, "sums": sums} if weights else {})


BLOCK = 64  # at most this many tokens per block: the top-k's block maxima, the tail's sums, the draws' first level


@functools.cache
def block_size(vocab: int) -> int:
    """The largest divisor of the vocabulary size up to BLOCK."""
    return max(b for b in range(1, min(BLOCK, vocab) + 1) if vocab % b == 0)


def blocks(x: torch.Tensor) -> torch.Tensor:
    """[P, V] → [P, V / B, B], the row's consecutive blocks of B = block_size(V) tokens."""
    return x.reshape(len(x), -1, block_size(x.shape[-1]))


def topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits.topk(k) (values sorted), found in the k blocks of largest maxima, which hold the k largest values: the
    same values; among exactly tied values the ids may differ. A plain top-k where the blocks would not save work."""
    b = blocks(logits)
    size = b.shape[-1]
    if size == 1 or 4 * k * size > logits.shape[-1]:
        return logits.topk(k, dim=-1)
    chosen = b.amax(-1).topk(k, dim=-1).indices
    vals, at = b[torch.arange(len(b), device=b.device)[:, None], chosen].flatten(1).topk(k, dim=-1)
    return vals, chosen.gather(1, at // size) * size + at % size


def draw_tail(logits: torch.Tensor, rows: dict, widths: torch.Tensor, temperatures, uniforms: torch.Tensor):
    """Tokens drawn with replacement from the teacher's tail at each temperature: softmax(z / t) over every token
    but the row's first `widths` ids, by inverse CDF (inverse_cdf) at the given uniforms [T, P, n] in [0, 1). `rows`
    is topk_rows' output with its weights (ids may be −1 past a row's sorted entries, which the weights keep): the
    entries between a row's width and its top-k return to the weights and their block sums first. The draws are a
    function of the logits and the uniforms alone, whatever the batch. [T, P, n]; −1 where the tail is empty."""
    ids = rows["ids"].clamp_min(0)  # the −1 padding points at id 0, where amax and a zero weight change nothing
    back = (torch.arange(ids.shape[1], device=ids.device)[None, :] >= widths[:, None]) & (rows["ids"] >= 0)
    top, at = logits.gather(-1, ids[:, :1]), logits.gather(-1, ids)
    out = []
    for j, t in enumerate(temperatures):
        w, sums = rows["weights"][j], rows["sums"][j]
        returning = torch.where(back, ((at - top) / t).exp(), 0.0)
        # amax: each entry that returns gets its weight back; kept ids and the −1 padding (written to id 0) stay put
        w.scatter_reduce_(-1, ids, returning, reduce="amax")
        sums.scatter_add_(-1, ids // block_size(w.shape[-1]), returning)
        out.append(inverse_cdf(w, uniforms[j], sums))
    return torch.stack(out) if out else torch.zeros((0, len(logits), uniforms.shape[-1]), dtype=torch.long)


def inverse_cdf(w: torch.Tensor, u: torch.Tensor, sums: torch.Tensor | None = None) -> torch.Tensor:
    """Draws [P, n] from weights w [P, V] ≥ 0 at uniforms u [P, n] in [0, 1): the first token whose cumulative
    weight passes u · total, or −1 where a row's weights are all zero. In two levels, so that nothing runs over
    [P, V] in float64: the float32 sums of the row's blocks (`sums`, when the caller has them) find each draw's
    block, then that block's own cumulative sum (float64) finds the token at the same fraction of the block's
    weight. At either level the search never passes the last entry of positive weight, so a zero-weight token is
    never drawn."""
    b = blocks(w)
    sums = (b.sum(-1) if sums is None else sums).double()  # the second level corrects their rounding per block
    block_cdf = sums.cumsum(-1)
    at = u.to(block_cdf) * block_cdf[:, -1:]
    block = _search(block_cdf, at)
    weight = sums.gather(1, block)
    fraction = ((at - block_cdf.gather(1, block) + weight) / weight.clamp_min(1e-300)).clamp_(0, 1)
    cdf = b[torch.arange(len(b), device=w.device)[:, None], block].cumsum(-1, dtype=torch.float64)
    token = _search(cdf, fraction[..., None] * cdf[..., -1:])[..., 0]
    return torch.where(block_cdf[:, -1:] > 0, block * b.shape[-1] + token, -1)


def _search(cdf: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The first index whose cumulative value passes `at`, capped at the first index that reaches the total (the last
    entry of positive weight; 0 for a row of zeros) and at the last index (a row of NaN, which cache-teacher skips)."""
    last = torch.searchsorted(cdf, cdf[..., -1:].contiguous(), right=False).clamp_max_(cdf.shape[-1] - 1)
    return torch.minimum(torch.searchsorted(cdf, at.contiguous(), right=True), last)


def fit_sketch(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> dict:
    """The teacher sketch's arrays (storage.sketch) from final hidden states [M, d] and the output layer (weight
    [V, d], bias [V] or None): the mean and top `rank` principal directions of the hidden states, and the basis
    [rank + 1, V] with [1, c] · basis = W (mean + componentsᵀ c) + b, all float32 numpy."""
    h = hidden.double()
    mean = h.mean(0)
    weight = weight.to(h.device)
    _, _, vt = torch.linalg.svd(h - mean, full_matrices=False)
    components = torch.zeros(rank, h.shape[1], dtype=torch.float64, device=h.device)
    components[: min(rank, len(vt))] = vt[:rank]
    directions = torch.cat([mean[None], components]).float()
    rows = torch.empty(rank + 1, weight.shape[0], dtype=torch.float32, device=weight.device)
    for a in range(0, weight.shape[0], 8192):  # the output layer in float32 one block of rows at a time
        rows[:, a : a + 8192] = directions @ weight[a : a + 8192].float().T
    if bias is not None:
        rows[0] += bias.float()
    as_np = lambda x: x.float().cpu().numpy().ravel()
    return {"mean": as_np(mean), "components": as_np(components), "basis": as_np(rows)}


def sketch_coeffs(hidden: torch.Tensor, sketch: dict) -> torch.Tensor:
    """Each position's sketch coefficients [P, r]: its hidden state's offset from the mean on the directions."""
    mean = torch.as_tensor(sketch["mean"], device=hidden.device)
    comps = torch.as_tensor(sketch["components"], device=hidden.device)
    return (hidden.float() - mean) @ comps.T


def drawn_logprobs(logits: torch.Tensor, draws: torch.Tensor, temperatures, rows: dict) -> torch.Tensor:
    """The exact log-probs [T, P, n] of draws [T, P, n] (−1: none, −inf there) from float32 logits [P, V] and their
    topk_rows: log p_j = (z_j − z_top1) / t + log p_top1, with no further pass over the vocabulary."""
    out = []
    top_logit = logits.gather(-1, rows["ids"][:, :1])
    for j, t in enumerate(temperatures):
        lp = (logits.gather(-1, draws[j].clamp_min(0)) - top_logit) / t + rows["logprobs"][j][:, :1]
        out.append(lp.masked_fill(draws[j] < 0, float("-inf")))
    return torch.stack(out) if out else torch.zeros(draws.shape)
