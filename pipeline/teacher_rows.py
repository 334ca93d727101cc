"""A teacher's rows from its logits at distilled positions: top-k ids and log-probs, the exact tail mass, the
log-prob of the actual next token, and tokens drawn from the tail. Used by cache-teacher and by the online
teacher in training; pure torch."""
from __future__ import annotations

import torch


def topk_rows(logits: torch.Tensor, k: int, temperatures, targets: torch.Tensor | None = None) -> dict:
    """Rows of float32 logits [P, V] → ids [P, k] (sorted by p), logprobs [T, P, k], tail [T, P] with
    log P_R = logsumexp(z[not topk]/t) − logsumexp(z/t) summed over the non-top-k terms themselves, target [T, P]
    (log p of `targets`, when given), and finite [P]: a NaN or +inf logit makes the row's log-normalizer
    non-finite, which is how rows are checked. One exp per pass over [P, V] and temperature."""
    vals, ids = logits.topk(k, dim=-1)
    lps, tails, target_lps = [], [], []
    for t in temperatures:
        top = vals[:, :1] / t
        e = (logits - top if t == 1 else (logits / t).sub_(top)).exp_()
        log_z = e.sum(-1, keepdim=True).log_()
        lps.append(vals / t - top - log_z)
        if targets is not None:
            target_lps.append(logits.gather(-1, targets[:, None])[:, 0] / t - top[:, 0] - log_z[:, 0])
        tails.append(e.scatter_(-1, ids, 0.0).sum(-1).log_() - log_z[:, 0])
    finite = torch.isfinite(log_z[:, 0]) & torch.isfinite(top[:, 0])
    return {"ids": ids, "logprobs": torch.stack(lps), "tail": torch.stack(tails),
            "target": torch.stack(target_lps) if targets is not None else None, "finite": finite}


def draw_tail(logits: torch.Tensor, ids: torch.Tensor, widths: torch.Tensor, temperatures,
              uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens drawn with replacement from the teacher's tail at each temperature: softmax(z / t) over every token
    but the row's first `widths` ids, by inverse CDF (float64) at the given uniforms [T, P, n] in [0, 1). The draws are
    a function of the logits and the uniforms alone, whatever the batch. [T, P, n]; −1 where the tail is empty."""
    kept = torch.arange(ids.shape[1], device=ids.device)[None, :] < widths[:, None]
    out = []
    for j, t in enumerate(temperatures):
        x = logits / t
        w = x.sub_(x.amax(-1, keepdim=True)).exp_()
        at_ids = w.gather(-1, ids)
        w.scatter_(-1, ids, torch.where(kept, torch.zeros_like(at_ids), at_ids))
        cdf = w.cumsum(-1, dtype=torch.float64)
        del w
        total = cdf[:, -1:]
        draws = torch.searchsorted(cdf, uniforms[j].to(cdf) * total, right=True).clamp_max_(cdf.shape[-1] - 1)
        out.append(torch.where(total > 0, draws, torch.full_like(draws, -1)))
    return torch.stack(out) if out else torch.zeros((0, len(logits), uniforms.shape[-1]), dtype=torch.long)
