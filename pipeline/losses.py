"""Sparse-aware distillation divergences from cached top-k teacher distributions.

Per position the teacher is the (k+1)-bin distribution P = (p_K, P_R): its top-k (head) probabilities and the
exact residual tail mass. The student Q = (q_K, Q_R) is exact: q gathered at K, and
Q_R = exp(logsumexp(z_S[not K]/t) - logsumexp(z_S/t)). With k = |V| (P_R = 0) every sparse loss equals
its dense twin. Logs of zero probabilities are floored at log(float32 tiny) so no finite input gives
inf or NaN; 0·log 0 = 0.

    fkl   KL(P‖Q) = Σ P (log P − log Q)
    rkl   KL(Q‖P) = Σ Q (log Q − log P)
    jsd   β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q; β=0 is fkl, β=1 is rkl (TRL's generalized_jsd_loss)
    tvd   ½ Σ |P − Q|
    sfkl  KL(P ‖ αP + (1−α)Q)
    srkl  KL(Q ‖ (1−α)P + αQ)
    akl   w_head·fkl + w_tail·rkl; head H = smallest prefix of K (teacher-sorted) with Σ_H p ≥ μ,
          g_head = Σ_H |p−q|, g_tail = Σ_{K∖H} |p−q| + |P_R − Q_R|, w = g / (g_head + g_tail) detached

Rows may be ragged: id −1 marks padding (the teacher's log-prob there is −inf).

Drawn tail tokens (Random-Sampling KD) refine the tail bucket. Terms weighted by the teacher's probabilities (fkl,
sfkl, jsd's β·KL(P‖M), akl's FKL part) are evaluated on refined bins where each drawn token j carries a weight w_j
and the rest of the tail the teacher weight 0 (and the student's exact remainder); their teacher-linear part is then
an unbiased estimate of the full-vocabulary one, so the FKL gradient with respect to the student's logits is
unbiased. Two kinds of draws:
  counted  the cache keeps each drawn token's count c_j of N draws: w_j = p̂_j = P_R·c_j/N, also the value in the
           logs. Terms weighted by the student's probabilities (rkl, srkl, jsd's (1−β)·KL(Q‖M), akl's RKL part), tvd
           and AKL's gaps and weights keep the exact bucket: they need the teacher's mass wherever the student puts
           mass, which counts cannot give.
  exact    the cache keeps each drawn token's exact log p_j (drawn_logweights given): w_j = p_j/π_j, the
           Horvitz–Thompson weight with π_j = 1 − (1 − p_j/P_R)^N the chance that j is drawn at all, and the logs use
           the exact p_j. The student-weighted terms, tvd and AKL's gaps run on exact bins: head, each drawn token,
           and the undrawn rest P_R − Σ_j p_j (at least REST_FLOOR·P_R, which covers the stored values' rounding)
           against the student's own remainder: a finer partition of the vocabulary than the bucket, so by the
           data-processing inequality closer to the full-vocabulary divergence, and exact where the teacher's tail
           is drawn.

A teacher sketch (sketch_coeffs [N, r], sketch_basis [r + 1, V]: approximate teacher logits z̃ = [1, c] · basis)
says how the undrawn rest is spread. The loss then runs over the full vocabulary against a teacher stand-in p̃:
exact at the head and at exactly drawn tokens, P_rest · softmax(z̃/t) over the other tokens (P_rest the undrawn rest
above, or P_R without draws). The student-weighted terms, tvd and AKL's head, gaps and weights use p̃; the
teacher-weighted terms keep the Horvitz–Thompson weights (or use p̃ when there are no draws), so with exact draws a
loss made of them alone (fkl, sfkl) is the same on the bins and skips the full-vocabulary pass. With z̃ the
teacher's own logits, p̃ is the teacher.

tail="renormalize" is the peers' default (DistillKit's sparse KL): the head renormalized to sum to 1, the
tail and any drawn tokens dropped, and the student's log-probs gathered from its full softmax, so every
divergence runs over the head bins alone. It is biased; "bucket" (ours) is the default.

AKL follows the paper's head rule (the token that crosses μ is in the head); the authors' published
snippet leaves that token out of the head.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from pipeline import cross_losses
from pipeline.config import CROSS_KINDS, KINDS, LossConfig
from pipeline.errors import OptionError

LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)
AKL_EPS = 1e-8
REST_FLOOR = 1e-3
ROW_CHUNK = 1024


class AKLStats(NamedTuple):
    g_head: torch.Tensor
    g_tail: torch.Tensor
    w_head: torch.Tensor


# ---------------------------------------------------------------- divergences on bins


def _floor(logx: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(logx), torch.full_like(logx, LOG_FLOOR), logx)


def _kl(pa: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A‖B) = Σ a (log a − log b), with 0·log 0 = 0."""
    return torch.where(pa > 0, pa * (log_a - log_b), torch.zeros_like(pa)).sum(-1)


def _log_mix(w: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(w·a + (1−w)·b)."""
    if w <= 0:
        return log_b
    if w >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def head_mask(p: torch.Tensor, mu: float, n_head_bins: int) -> torch.Tensor:
    """AKL head over the first n_head_bins bins: smallest teacher-sorted prefix with Σ p ≥ μ (top-1 always in)."""
    ph = p[..., :n_head_bins]
    sorted_p, order = ph.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    in_head_sorted = before < mu
    in_head_sorted[..., 0] = True
    mask = torch.zeros_like(in_head_sorted).scatter(-1, order, in_head_sorted)
    pad = p.shape[-1] - n_head_bins
    return torch.nn.functional.pad(mask, (0, pad), value=False) if pad else mask


def akl_weights(p, q, mask):
    diff = (p - q).abs()
    g_head = torch.where(mask, diff, torch.zeros_like(diff)).sum(-1)
    g_tail = torch.where(mask, torch.zeros_like(diff), diff).sum(-1)
    denom = (g_head + g_tail).clamp_min(AKL_EPS)
    return AKLStats(g_head, g_tail, g_head / denom)


def bin_divergence(kind, logp, logq, *, mu=0.5, beta=0.5, alpha=0.1, n_head_bins=None, refined=None, head=None):
    """Per-position divergence between teacher bins logp and student bins logq, both [N, B] log-probs.

    refined: optional (log weights, logp, logq) bins in which the teacher-weighted terms Σ w·f(p, q) are evaluated
    instead (drawn tail tokens, see the module docstring). Returns (loss [N], AKLStats or None). n_head_bins: bins
    eligible for the AKL head (the tail bins are not); head: the AKL head mask itself, when the caller knows it.
    """
    p, q = logp.exp(), logq.exp()
    lp, lq = _floor(logp), _floor(logq)
    if refined is None:
        pa, lpa, lqa = p, lp, lq
    else:
        pa, lpa, lqa = refined[0].exp(), _floor(refined[1]), _floor(refined[2])
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return _kl(pa, lpa, lqa), None
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return _kl(q, lq, lp), None
    if kind == "jsd":
        return beta * _kl(pa, lpa, _log_mix(beta, lpa, lqa)) + (1 - beta) * _kl(q, lq, _log_mix(beta, lp, lq)), None
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1), None
    if kind == "sfkl":
        return _kl(pa, lpa, _log_mix(alpha, lpa, lqa)), None
    if kind == "srkl":
        return _kl(q, lq, _log_mix(1 - alpha, lp, lq)), None
    if kind == "akl":
        mask = head if head is not None else head_mask(p, mu, logp.shape[-1] if n_head_bins is None else n_head_bins)
        with torch.no_grad():
            stats = akl_weights(p, q, mask)
        loss = stats.w_head * _kl(pa, lpa, lqa) + (1 - stats.w_head) * _kl(q, lq, lp)
        zero = (stats.g_head + stats.g_tail) == 0
        loss = torch.where(zero, torch.zeros_like(loss), loss)
        return loss, AKLStats(stats.g_head, stats.g_tail, torch.where(zero, torch.zeros_like(loss), stats.w_head))
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(KINDS)}")


# ---------------------------------------------------------------- the student's side, O(N·k) extra memory


class _GatherWithTail(torch.autograd.Function):
    """(log q at ids [N, m], log Q_R [N], log q at targets [N]) from logits [N, V] at temperature t, in row chunks,
    keeping nothing of size [N, V] but the logits. With x = z/t − max: log q_i = x_i − log Σ e^x,
    log Q_R = log Σ_{j∉ids} e^x_j − log Σ e^x; the tail sum adds the non-top-k terms directly (no 1 − Σ
    cancellation). The targets do not affect the tail: they let the cross-entropy share the pass. One exp per pass."""

    @staticmethod
    def forward(ctx, logits, ids, t, targets):
        n = logits.shape[0]
        stats = logits.new_empty(3, n, dtype=torch.float32)  # row max, log Σ e^x, log Σ_{not ids} e^x
        log_q = logits.new_empty(ids.shape, dtype=torch.float32)
        log_y = logits.new_empty(n, dtype=torch.float32)
        for a in range(0, n, ROW_CHUNK):
            sl = slice(a, a + ROW_CHUNK)
            s = logits[sl].float()
            c = s.amax(-1, keepdim=True) / t
            x = s / t - c
            gathered, at_target = x.gather(-1, ids[sl]), x.gather(-1, targets[sl, None])[:, 0]
            e = x.exp_()
            stats[0, sl], stats[1, sl] = c[:, 0], e.sum(-1).log()
            stats[2, sl] = e.scatter_(-1, ids[sl], 0.0).sum(-1).log()
            log_q[sl] = gathered - stats[1, sl, None]
            log_y[sl] = at_target - stats[1, sl]
        ctx.save_for_backward(logits, ids, targets, stats, log_q)
        ctx.t = t
        return log_q, stats[2] - stats[1], log_y

    @staticmethod
    def backward(ctx, g_q, g_r, g_y):
        """With G = Σ g_q + g_r + g_y: d/ds_j = g_q,j − q_j G on ids; r_j (g_r − Q_R G) elsewhere, where
        r_j = e^x_j / Σ_{not ids} e^x and q_j = Q_R r_j; plus g_y at the target; then ÷ t. An id listed twice in a
        row (padding repeats a row's first id) gets −q_j G once and the sum of its g_q."""
        logits, ids, targets, stats, log_q = ctx.saved_tensors
        t = ctx.t
        grad = torch.empty_like(logits)
        total = g_q.sum(-1) + g_r + g_y
        q_r = torch.exp(stats[2] - stats[1])
        outside = g_r - q_r * total
        on_ids = -log_q.exp() * total[:, None]
        log_r = torch.where(torch.isfinite(stats[2]), stats[2], float("inf"))
        for a in range(0, logits.shape[0], ROW_CHUNK):
            sl = slice(a, a + ROW_CHUNK)
            g = (logits[sl].float() / t).sub_(stats[0, sl, None] + log_r[sl, None]).exp_()
            g.mul_(outside[sl, None]).scatter_(-1, ids[sl], on_ids[sl]).scatter_add_(-1, ids[sl], g_q[sl])
            g.scatter_add_(-1, targets[sl, None], g_y[sl, None])
            grad[sl] = g.div_(t)
        return grad, None, None, None


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim that gives −inf (and zero gradients, not NaN) for rows of −inf."""
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = (x - m).exp().sum(-1)
    return torch.where(
        total > 0,
        total.clamp_min(torch.finfo(total.dtype).tiny).log() + m[..., 0],
        torch.full_like(total, float("-inf")),
    )


def _pad_with_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids [N, W] with −1 padding → the same ids with each pad replaced by its row's first real id, and the mask of
    real entries. Repeating an id in a row keeps the student's tail sum exact (see _GatherWithTail)."""
    valid = ids >= 0
    first = ids.gather(1, valid.to(torch.uint8).argmax(1, keepdim=True)).clamp_min(0)
    return torch.where(valid, ids, first), valid


def token_logprob(logits, targets):
    """log q(target) at temperature 1, [N]: the cross-entropy's negative, with no [N, V] log-softmax kept."""
    return _GatherWithTail.apply(logits, targets[:, None], 1.0, targets)[2]


# ---------------------------------------------------------------- public API


def check_params(kind, mu=0.5, beta=0.5, alpha=0.1, kd_ratio=1.0, tail="bucket", alm_tau=1.0):
    """The library's checks of a divergence and its parameters: the command line's (pipeline.config.LossConfig)."""
    if kind not in KINDS:
        raise OptionError(f"unknown loss kind {kind!r}; choose one of {', '.join(KINDS)}")
    # LossConfig raises on a bad value
    LossConfig(kind=kind, mu=mu, beta=beta, alpha=alpha, kd_ratio=kd_ratio, tail=tail, alm_tau=alm_tau)


def has_teacher_weighted_terms(kind, beta=0.5) -> bool:
    """Whether part of a loss is weighted by the teacher's probabilities: the only terms that a cache with no head
    (tail draws alone, one bucket holding all the mass on both sides) can feed. fkl and sfkl are; jsd is for β < 1
    (β·KL(P‖M) vanishes at β = 1, where jsd is rkl); rkl, srkl and tvd are not, nor is akl, whose forward part is
    weighted by the head's gap (0 without a head)."""
    check_params(kind, beta=beta)
    return kind in ("fkl", "sfkl") or (kind == "jsd" and beta < 1)


def _check_sparse(student_logits, topk_ids, topk_logprobs, tail_logmass, drawn_ids=None, drawn_logprobs=None):
    n, v = student_logits.shape
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != n:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(student_logits.shape)}, topk_ids "
            f"{tuple(topk_ids.shape)}, topk_logprobs {tuple(topk_logprobs.shape)}; want [N, V], [N, k], [N, k]"
        )
    if tail_logmass.shape != (n,):
        raise ValueError(f"shape mismatch: tail_logmass {tuple(tail_logmass.shape)}, want [{n}]")
    if (
        (drawn_ids is None) != (drawn_logprobs is None)
        or drawn_ids is not None
        and (drawn_ids.shape != drawn_logprobs.shape or drawn_ids.dim() != 2 or drawn_ids.shape[0] != n)
    ):
        raise ValueError("drawn_ids and drawn_logprobs go together, both [N, m]")
    for ids in (topk_ids, drawn_ids):
        if ids is not None and ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= v):
            raise ValueError(
                f"teacher token id {int(ids.max())} is outside the student's vocabulary of {v}; "
                "use a student with the teacher's tokenizer"
            )


def sparse_kd_loss(
    student_logits,
    topk_ids,
    topk_logprobs,
    tail_logmass,
    kind,
    *,
    mu=0.5,
    beta=0.5,
    alpha=0.1,
    temperature=1.0,
    return_stats=False,
    validate=True,
    **teacher,
):
    """Per-position loss [N] between cached teacher rows (top-k + tail; −1-padded; optional drawn_ids and
    drawn_logprobs; tail="bucket"|"renormalize") and the student's logits at `temperature`.

    With return_stats=True returns (loss, AKLStats or None).
    """
    loss, _, stats = sparse_kd_loss_with_ce(
        student_logits,
        None,
        topk_ids,
        topk_logprobs,
        tail_logmass,
        kind,
        mu=mu,
        beta=beta,
        alpha=alpha,
        temperature=temperature,
        validate=validate,
        **teacher,
    )
    return (loss, stats) if return_stats else loss


def sparse_kd_loss_with_ce(
    student_logits,
    targets,
    topk_ids,
    topk_logprobs,
    tail_logmass,
    kind,
    *,
    mu=0.5,
    beta=0.5,
    alpha=0.1,
    temperature=1.0,
    validate=True,
    drawn_ids=None,
    drawn_logprobs=None,
    drawn_logweights=None,
    sketch_coeffs=None,
    sketch_basis=None,
    tail="bucket",
):
    """(KD loss [N], cross-entropy at temperature 1 [N] or None without targets, AKLStats or None); the CE
    shares the KD's pass over the logits when the temperature is 1. drawn_logweights: given when drawn_logprobs
    are the teacher's exact log-probs; sketch_coeffs [N, r] with sketch_basis [r + 1, V]: the teacher's logit
    sketch (see the module docstring)."""
    check_params(kind, mu, beta, alpha, tail=tail)
    if validate:
        _check_sparse(student_logits, topk_ids, topk_logprobs, tail_logmass, drawn_ids, drawn_logprobs)
        if drawn_logweights is not None and (drawn_ids is None or drawn_logweights.shape != drawn_ids.shape):
            raise ValueError("drawn_logweights go with drawn_ids, both [N, m]")
    head = topk_ids.long()
    width = head.shape[1]
    drawn = drawn_ids is not None and tail == "bucket" and drawn_ids.shape[1] > 0
    teacher_weighted_only = kind in ("fkl", "sfkl") or (kind == "jsd" and beta == 0)
    if sketch_coeffs is not None and tail == "bucket" and not (drawn and teacher_weighted_only):
        if drawn and drawn_logweights is None:
            raise ValueError("a teacher sketch goes with exact drawn log-probs (drawn_logweights), not counted draws")
        rows = (head, topk_logprobs, tail_logmass, sketch_coeffs) + (
            (drawn_ids, drawn_logprobs, drawn_logweights) if drawn else ()
        )
        return _sketched_in_chunks(
            student_logits, targets, rows, sketch_basis, kind, dict(mu=mu, beta=beta, alpha=alpha), float(temperature)
        )
    ids, valid = _pad_with_first(torch.cat([head, drawn_ids.long()], 1) if drawn else head)
    t = float(temperature)
    fused = targets is not None and t == 1.0
    log_q, log_rest, log_y = _GatherWithTail.apply(student_logits, ids, t, targets if fused else ids[:, 0])
    if targets is not None and not fused:
        log_y = token_logprob(student_logits, targets)
    log_q = log_q.masked_fill(~valid, float("-inf"))
    drawn_fields = (drawn_logprobs, drawn_logweights) if drawn else None
    logp, logq, refined = _bins(topk_logprobs, tail_logmass, log_q, log_rest, valid, width, tail, drawn_fields)
    loss, stats = bin_divergence(kind, logp, logq, mu=mu, beta=beta, alpha=alpha, n_head_bins=width, refined=refined)
    return loss, (None if targets is None else -log_y), stats


def _bins(topk_logprobs, tail_logmass, log_q, log_rest, valid, width, tail, drawn):
    """(teacher log-bins, student log-bins, refined bins or None) for bin_divergence from the gathered student
    log-probs log_q [N, width + m] (head, then drawn ids) and its log remainder; drawn: None or the drawn tokens'
    (log-probs, log weights or None), see the module docstring."""
    lq_head = log_q[:, :width]
    lp_head = topk_logprobs.float().masked_fill(~valid[:, :width], float("-inf"))
    tail_logmass = tail_logmass.float()[:, None]
    none = torch.full_like(tail_logmass, float("-inf"))
    if tail == "renormalize":
        norm = logsumexp(lp_head)[:, None]
        lp_head = torch.where(torch.isfinite(norm), lp_head - norm, torch.full_like(lp_head, float("-inf")))
        return torch.cat([lp_head, none], -1), torch.cat([lq_head, none], -1), None
    if drawn is None:
        return torch.cat([lp_head, tail_logmass], -1), torch.cat([lq_head, log_rest[:, None]], -1), None
    lq_drawn = log_q[:, width:]
    lp_drawn = drawn[0].float().masked_fill(~valid[:, width:], float("-inf"))
    fine_q = torch.cat([lq_head, lq_drawn, log_rest[:, None]], -1)
    if drawn[1] is None:  # counted: estimates that sum to P_R; the student-weighted terms keep the bucket
        logq = torch.cat([lq_head, logsumexp(torch.cat([log_rest[:, None], lq_drawn], -1))[:, None]], -1)
        fine_p = torch.cat([lp_head, lp_drawn, none], -1)
        return torch.cat([lp_head, tail_logmass], -1), logq, (fine_p, fine_p, fine_q)
    logp = torch.cat([lp_head, lp_drawn, undrawn_logmass(tail_logmass, lp_drawn)], -1)
    weights = torch.cat([lp_head, drawn[1].float().masked_fill(~valid[:, width:], float("-inf")), none], -1)
    return logp, fine_q, (weights, logp, fine_q)


def undrawn_logmass(tail_logmass, lp_drawn):
    """log(P_R − Σ_j p_j) [N, 1] from log P_R [N, 1] and exact drawn log-probs [N, m] (−inf pads), at least
    log(REST_FLOOR·P_R); −inf where the tail is empty."""
    share = (logsumexp(lp_drawn)[:, None] - tail_logmass).nan_to_num(nan=float("-inf"))
    rest = tail_logmass + torch.log(-torch.expm1(share.clamp_max(math.log1p(-REST_FLOOR))))
    return torch.where(torch.isneginf(tail_logmass), tail_logmass, rest)


def _scatter_mask(ids, mask, shape) -> torch.Tensor:
    """A [N, k] mask over ids [N, k] (−1 padded) as a [N, V] mask."""
    out = torch.zeros(shape, dtype=torch.uint8, device=ids.device)
    return out.scatter_add_(-1, ids.clamp_min(0), (mask & (ids >= 0)).to(torch.uint8)) > 0


def sketch_logits(coeffs: torch.Tensor, basis: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The teacher's approximate logits [N, V] from its sketch: [1, c] @ basis."""
    c = torch.cat([torch.ones_like(coeffs[:, :1]), coeffs], 1).float()
    return c @ basis[:, :vocab_size].float().to(c.device)


def _sketched_in_chunks(logits, targets, rows, basis, kind, params, t):
    """_sketched over chunks of ROW_CHUNK positions, each recomputed in backward (activation checkpointing), so its
    [chunk, V] temporaries are never held for all positions at once. rows: per-position tensors (head ids, head
    log-probs, tail log-masses, sketch coefficients, then optionally drawn ids, log-probs and log weights)."""
    outs = []
    for a in range(0, logits.shape[0], ROW_CHUNK):
        sl = slice(a, a + ROW_CHUNK)
        args = (logits[sl], None if targets is None else targets[sl], basis, *(r[sl] for r in rows))
        fn = lambda x, y, b, *r: _sketched(x, y, b, r, kind, params, t)
        outs.append(checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args))
    if not outs:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, None if targets is None else empty, AKLStats(empty, empty, empty) if kind == "akl" else None
    loss = torch.cat([o[0] for o in outs])
    ce = None if targets is None else torch.cat([o[1] for o in outs])
    stats = None if outs[0][2] is None else AKLStats(*(torch.cat(c) for c in zip(*(o[2] for o in outs))))
    return loss, ce, stats


def _sketched(logits, targets, basis, rows, kind, params, t):
    """The sparse loss with the teacher's sketch, over the full vocabulary: the teacher stand-in p̃ is exact at the
    head and at exactly drawn tokens, and spreads the undrawn rest's mass by softmax(approx / t) over the rest
    (module docstring). rows: (head ids, head log-probs, tail log-masses, coefficients[, drawn ids, exact log-probs,
    log weights])."""
    head, topk_logprobs, tail_logmass, coeffs = rows[:4]
    drawn = rows[4:] or None
    head = head.long()
    approx = sketch_logits(coeffs, basis, logits.shape[1])
    logq = torch.log_softmax(logits.float() / t, -1)
    ids = torch.cat([head, drawn[0].long()], 1) if drawn else head
    pad = ids < 0

    def on_vocab(values):  # [N, width + m] values at ids → [N, V], −inf elsewhere (pads repeat nothing)
        values = values.float().masked_fill(pad, float("-inf"))
        return torch.full_like(logq, float("-inf")).scatter_reduce(
            -1, ids.clamp_min(0), values, "amax", include_self=False
        )

    known = on_vocab(torch.cat([topk_logprobs, drawn[1]], 1) if drawn else topk_logprobs)
    is_known = torch.isfinite(known)
    lp_drawn = drawn[1].float().masked_fill(drawn[0] < 0, float("-inf")) if drawn else None
    rest = (
        tail_logmass.float()[:, None] if lp_drawn is None else undrawn_logmass(tail_logmass.float()[:, None], lp_drawn)
    )
    shape = torch.log_softmax((approx / t).masked_fill(is_known, float("-inf")), -1)
    logp = torch.where(is_known, known, shape + rest)
    refined = None
    if drawn:
        refined = (on_vocab(torch.cat([topk_logprobs.float(), drawn[2].float()], 1)), logp, logq)
    in_head = head_mask(topk_logprobs.float().exp(), params["mu"], head.shape[1]) & (head >= 0)
    loss, stats = bin_divergence(
        kind, logp, logq, refined=refined, head=_scatter_mask(head, in_head, logq.shape), **params
    )
    if targets is None:
        return loss, None, stats
    log_y = (logq if t == 1 else torch.log_softmax(logits.float(), -1)).gather(-1, targets[:, None])[:, 0]
    return loss, -log_y, stats


def dense_kd_loss(
    student_logits, teacher_logits, kind, *, mu=0.5, beta=0.5, alpha=0.1, temperature=1.0, return_stats=False
):
    """The same divergences over the full vocabulary: the online baseline and the tests' oracle."""
    check_params(kind, mu, beta, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
        )
    logq = torch.log_softmax(student_logits.float() / temperature, -1)
    logp = torch.log_softmax(teacher_logits.float() / temperature, -1)
    loss, stats = bin_divergence(kind, logp, logq, mu=mu, beta=beta, alpha=alpha)
    return (loss, stats) if return_stats else loss


PER_POSITION_FIELDS = ("drawn_ids", "drawn_logprobs", "drawn_logweights", "sketch_coeffs")


def sparse_kd_loss_from_hidden(
    hidden,
    lm_head_weight,
    topk_ids,
    topk_logprobs,
    tail_logmass,
    kind,
    *,
    chunk_size=1024,
    vocab_size=None,
    return_stats=False,
    **kw,
):
    """sparse_kd_loss on logits = hidden @ W.T, computed chunk by chunk of positions (the per-position fields among
    kw, PER_POSITION_FIELDS, chunked alike; the others, such as sketch_basis, passed whole).

    Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory holds one
    chunk × V of logits, never N × V. Same values and gradients as the unchunked path.
    """
    v = vocab_size or lm_head_weight.shape[0]
    names = [n for n in PER_POSITION_FIELDS if kw.get(n) is not None]
    per_position = [kw.pop(n) for n in names]

    def chunk_loss(h, w, ids, lp, tail, *fields):
        loss, stats = sparse_kd_loss(
            h @ w[:v].T, ids, lp, tail, kind, return_stats=True, **dict(zip(names, fields)), **kw
        )
        return (loss,) + (tuple(stats) if stats is not None else ())

    outs = []
    for a in range(0, hidden.shape[0], chunk_size):
        sl = slice(a, a + chunk_size)
        args = (hidden[sl], lm_head_weight, topk_ids[sl], topk_logprobs[sl], tail_logmass[sl])
        args += tuple(f[sl] for f in per_position)
        outs.append(
            checkpoint(chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(*args)
        )
    if not outs:
        loss = hidden.new_zeros(0, dtype=torch.float32)
        return (loss, AKLStats(loss, loss, loss) if kind == "akl" else None) if return_stats else loss
    cols = [torch.cat(c) for c in zip(*outs)]
    if not return_stats:
        return cols[0]
    return cols[0], (AKLStats(*cols[1:]) if len(cols) > 1 else None)


def onpolicy_pg_loss(student_logits, targets, teacher_logprob, behavior_logprob=None, *, clip=10.0, temperature=1.0):
    """The per-token reverse-KL policy gradient on sampled tokens y_t (on-policy distillation: MiniLLM's single-step
    term, the objective of Qwen3's and Thinking Machines' on-policy distillation).

    loss_t = −w_t · A_t · log q_S(y_t), with the advantage A_t = log p_T(y_t) − log q_S(y_t) and the importance
    weight w_t = min(clip, q_S(y_t) / π(y_t)) held constant (no gradient through sampling or either factor). Its
    gradient w_t·(log q_S − log p_T)(y_t)·∇log q_S(y_t) is the REINFORCE estimate of ∇ KL(q_S ‖ p_T) per token, with
    π the sampler: the student itself (w = 1 when fresh; stale or teacher-mixed samples carry their π). teacher_logprob
    is the cache's target_logprob at the same temperature. Returns (loss [N], the per-token KL estimate
    log q_S(y) − log p_T(y) [N], detached)."""
    logits = student_logits if temperature == 1 else student_logits.float() / temperature
    log_q = token_logprob(logits, targets)
    log_p = teacher_logprob.float().clamp_min(LOG_FLOOR)
    advantage = (log_p - log_q).detach()
    if behavior_logprob is None:
        weight = torch.ones_like(log_q)
    else:
        weight = torch.exp(log_q.detach() - behavior_logprob.float()).clamp(max=clip)
    return -(weight * advantage * log_q), (log_q - log_p).detach()


SPARSE_EXTRAS = ("drawn_ids", "drawn_logprobs", "drawn_logweights", "sketch_coeffs", "sketch_basis")


def batch_losses(
    logits, b, teacher_fields, kind, tail="bucket", mu=0.5, beta=0.5, alpha=0.1, temperature=1.0, alm_tau=1.0
) -> dict:
    """Sums over a batch's distilled positions from the student's logits there [N, V], the batch ("targets" [N]) and
    the teacher's fields: CE, and the loss `kind` as "kd" — sparse (topk_ids, topk_logprobs, tail_logmass, optional
    drawn_ids/drawn_logprobs), dense (teacher_logits), pg (target_logprob, optional behavior_logprob) — and stats."""
    if kind == "ce" or not teacher_fields:
        return {"ce": -token_logprob(logits, b["targets"]).sum()}
    empty = None
    if kind == "pkl":  # the teacher's rows projected onto the student's vocabulary, one per position
        kind, empty = "fkl", (teacher_fields["topk_ids"] < 0).all(-1)  # an empty row: no loss
    elif kind in CROSS_KINDS:
        lp = token_logprob(logits, b["targets"])  # alm's own at a temperature; uld and gold take the logits
        lp_t = lp if temperature == 1 or kind != "alm" else token_logprob(logits.float() / temperature, b["targets"])
        kd = cross_losses.chunk_losses(logits, lp_t, teacher_fields, kind, temperature, alm_tau)
        return {"ce": -lp.sum(), "kd": kd.sum(), "chunks": torch.tensor(len(kd))}
    if kind == "pg":
        if "target_logprob" not in teacher_fields:
            raise ValueError("the pg loss needs the teacher's log-prob of each sampled token (target_logprob)")
        pg, estimate = onpolicy_pg_loss(
            logits,
            b["targets"],
            teacher_fields["target_logprob"],
            teacher_fields.get("behavior_logprob"),
            temperature=temperature,
        )
        return {"ce": -token_logprob(logits, b["targets"]).sum(), "kd": pg.sum(), "rkl_estimate": estimate.sum()}
    params = {"mu": mu, "beta": beta, "alpha": alpha, "temperature": temperature}
    if "teacher_logits" in teacher_fields:
        kd, stats = dense_kd_loss(logits, teacher_fields["teacher_logits"], kind, return_stats=True, **params)
        ce = -token_logprob(logits, b["targets"])
    else:
        rows = [teacher_fields[k] for k in ("topk_ids", "topk_logprobs", "tail_logmass")]
        params.update({k: teacher_fields.get(k) for k in SPARSE_EXTRAS}, validate=False, tail=tail)
        kd, ce, stats = sparse_kd_loss_with_ce(logits, b["targets"], *rows, kind, **params)
    if empty is not None:
        kd = torch.where(empty, torch.zeros_like(kd), kd)
    out = {"ce": ce.sum(), "kd": kd.sum()}
    if stats is not None:
        out.update(g_head=stats.g_head.sum(), g_tail=stats.g_tail.sum(), w_head=stats.w_head.sum())
    return out


def reduce_loss(per_position, mask=None, num_items=None):
    """Σ loss·mask / num_items, num_items defaulting to Σ mask; 0 (not NaN) when nothing counts."""
    if mask is not None:
        per_position = torch.where(mask.bool(), per_position, torch.zeros_like(per_position))
        count = mask.sum()
    else:
        count = per_position.numel()
    denom = count if num_items is None else num_items
    if isinstance(denom, torch.Tensor):
        denom = denom.clamp_min(1)
    else:
        denom = max(denom, 1)
    return per_position.sum() / denom


def mix(ce, kd, kd_ratio):
    """(1 − kd_ratio)·CE + kd_ratio·KD."""
    check_params("fkl", kd_ratio=kd_ratio)
    return (1 - kd_ratio) * ce + kd_ratio * kd
