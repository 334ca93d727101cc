"""Divergences between a teacher and a student with different vocabularies, per aligned chunk
(pipeline.cross_tokenizer gives the chunks; every function here takes tensors only).

- `uld`: Universal Logit Distillation's distance between the sorted probability vectors of the teacher's and the
  student's predictions at each chunk's first token, Σ_i |p_(i) − q_(i)|. The teacher's head is exact; past it the
  cache holds only the tail's mass R_T, and the student's rest is R_S = 1 − Σ_head q_(i), so the rest contributes
  |R_T − R_S|: a lower bound of the true ranks' Σ_{i>w} |p_(i) − q_(i)|, which lies in [|R_T − R_S|, R_T + R_S].
- `gold`: GOLD's hybrid. Teacher tokens whose bytes are a student token (`vocab_map`) get the exact KL of the
  coarsened distributions (each matched head token its own bin, the rest one bin); the rest gets ULD between the
  teacher's unmatched head and tail and the student's tokens outside the matched ones.
- `alm`: ALM's chunk likelihoods. A chunk's teacher log-likelihood is the sum of its tokens' target_logprob, the
  student's the sum over its own tokens of the chunk; the loss is τ times the binary KL between the two Bernoullis
  "the model writes this chunk" at likelihoods raised to 1/τ (ALM's temperature): with p = P_T^(1/τ), q = P_S^(1/τ),
  τ·[p·log(p/q) + (1 − p)·log((1 − p)/(1 − q))]. At τ = 1 a chunk both models find unlikely gives almost no
  gradient; as τ grows the loss tends to (ℓ_T − ℓ_S) + ℓ_T·log(ℓ_S/ℓ_T) in the log-likelihoods ℓ, whose gradient
  in ℓ_S, ℓ_T/ℓ_S − 1, is the relative gap at any likelihood. Exact from the cache.
"""

from __future__ import annotations

import torch

LOG_ONE = -1e-6  # chunk log-likelihoods are kept below 0, so that log(1 − q) stays finite


def _sorted_head(topk_logprobs: torch.Tensor, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher head probabilities sorted descending [C, w'] (w' = min(w, v), zeros past each row's width) and the
    mass past the first w' ranks beyond the tail."""
    p = torch.exp(topk_logprobs.float()).sort(dim=-1, descending=True).values
    return p[:, :v], p[:, v:].sum(-1)


def _uld(p_sorted: torch.Tensor, rest_t: torch.Tensor, q: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Σ_{i<width} |p_(i) − q_(i)| + |R_T − (Σ q − Σ_{i<width} q_(i))| per row, q [C, V] the student's probabilities
    (zeros where excluded), p_sorted [C, w] and width [C] the teacher's."""
    w = p_sorted.shape[1]
    q_top = q.topk(w, dim=-1).values
    mask = torch.arange(w, device=q.device)[None, :] < width[:, None]
    head = torch.where(mask, (p_sorted - q_top).abs(), torch.zeros_like(q_top)).sum(-1)
    rest_s = q.sum(-1) - torch.where(mask, q_top, torch.zeros_like(q_top)).sum(-1)
    return head + (rest_t - rest_s).abs()


def uld_loss(student_logits, topk_logprobs, tail_logmass, temperature: float = 1.0) -> torch.Tensor:
    """[C] ULD per chunk (module docstring), from the student's logits at each chunk's first position [C, V]."""
    v = student_logits.shape[-1]
    q = torch.softmax(student_logits.float() / temperature, dim=-1)
    p, beyond = _sorted_head(topk_logprobs, v)
    width = (p > 0).sum(-1)
    return _uld(p, torch.exp(tail_logmass.float()) + beyond, q, width)


def gold_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, vocab_map, temperature=1.0) -> torch.Tensor:
    """[C] the GOLD hybrid per chunk (module docstring); vocab_map [V_T]: the student id of each teacher id, or −1."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    valid = topk_ids >= 0
    mapped = torch.where(valid, vocab_map[topk_ids.clamp_min(0)], -1)
    matched = mapped >= 0
    p = torch.where(valid, torch.exp(topk_logprobs.float()), torch.zeros_like(log_q[:, :1]))
    log_qm = log_q.gather(1, mapped.clamp_min(0))
    p_m = torch.where(matched, p, torch.zeros_like(p))
    q_m = torch.where(matched, torch.exp(log_qm), torch.zeros_like(p))
    p_rest = (1 - p_m.sum(-1)).clamp_min(0)
    q_rest = (1 - q_m.sum(-1)).clamp_min(1e-30)
    kl = (torch.xlogy(p_m, p_m) - p_m * torch.where(matched, log_qm, torch.zeros_like(p))).sum(-1)
    kl = kl + torch.xlogy(p_rest, p_rest) - p_rest * torch.log(q_rest)
    hits = torch.zeros_like(log_q).scatter_add(1, mapped.clamp_min(0), matched.to(log_q.dtype))
    outside = hits == 0  # student tokens no teacher head token of the row matches
    q_u = torch.where(outside, torch.exp(log_q), torch.zeros_like(log_q))
    p_u = torch.where(valid & ~matched, p, torch.zeros_like(p)).sort(dim=-1, descending=True).values
    p_u, beyond = p_u[:, : log_q.shape[-1]], p_u[:, log_q.shape[-1] :].sum(-1)
    return kl + _uld(p_u, torch.exp(tail_logmass.float()) + beyond, q_u, (p_u > 0).sum(-1))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def alm_loss(student_token_logprob, chunk_of, chunk_logprob, tau: float = 1.0) -> torch.Tensor:
    """[C] τ·binary KL of the chunks' likelihoods raised to 1/τ (module docstring); student_token_logprob [N] at the
    student's distilled positions, chunk_of [N] their chunk (−1 none), chunk_logprob [C] the teacher's."""
    inside = chunk_of >= 0
    lq = torch.zeros_like(chunk_logprob, dtype=student_token_logprob.dtype)
    lq = (lq.index_add(0, chunk_of[inside], student_token_logprob[inside]) / tau).clamp_max(LOG_ONE)
    lp = (chunk_logprob.float() / tau).clamp_max(LOG_ONE)
    p = torch.exp(lp)
    return tau * (p * (lp - lq) + (1 - p) * (_log1mexp(lp) - _log1mexp(lq)))


def chunk_losses(logits, token_logprob, fields: dict, kind: str, temperature=1.0, alm_tau=1.0) -> torch.Tensor:
    """[C] the loss `kind` per chunk from the student's logits at its distilled positions [N, V], its log-prob of each
    of their tokens at `temperature` [N] and the batch's chunk fields (pipeline.cross_tokenizer)."""
    if kind == "alm":
        return alm_loss(token_logprob, fields["chunk_of"], fields["chunk_logprob"], alm_tau)
    at = logits[fields["chunk_first"]]
    if kind == "uld":
        return uld_loss(at, fields["topk_logprobs"], fields["tail_logmass"], temperature)
    return gold_loss(
        at, fields["topk_ids"], fields["topk_logprobs"], fields["tail_logmass"], fields["vocab_map"], temperature
    )
