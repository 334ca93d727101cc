import math
import warnings

import numpy as np
import pytest
import torch

from pipeline import losses
from pipeline.losses import KINDS, dense_kd_loss, sparse_kd_loss, sparse_kd_loss_from_hidden


def teacher_topk(teacher_logits, k, t=1.0):
    logp = torch.log_softmax(teacher_logits.float() / t, -1)
    lp, ids = logp.topk(k, -1)
    rest = logp.scatter(-1, ids, float("-inf"))
    return ids, lp.float(), torch.logsumexp(rest, -1).float()


def grads(fn, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.sum().backward()
    return out.detach(), x.grad


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    v = int(torch.randint(2, 40, (1,), generator=g))
    scale = float(torch.rand(1, generator=g)) * 6 + 0.1
    s = torch.randn(n, v, generator=g) * scale
    t = torch.randn(n, v, generator=g) * scale
    temp = [0.5, 1.0, 2.0][seed % 3]
    params = dict(
        mu=float(torch.rand(1, generator=g)),
        beta=float(torch.rand(1, generator=g)),
        alpha=float(torch.rand(1, generator=g)),
    )
    return s, t, temp, params


# -- the property: with k = |V| every sparse kind is its dense twin, values and gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(12))
def test_full_k_equals_dense(kind, seed):
    s, t, temp, params = random_case(seed)
    ids, lp, tail = teacher_topk(t, t.shape[1], temp)
    assert torch.isneginf(tail).all()
    sv, sg = grads(lambda x: sparse_kd_loss(x, ids, lp, tail, kind, temperature=temp, **params), s)
    dv, dg = grads(lambda x: dense_kd_loss(x, t, kind, temperature=temp, **params), s)
    torch.testing.assert_close(sv, dv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sg, dg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_fkl_and_rkl(beta):
    s, t, _, _ = random_case(3)
    want = dense_kd_loss(s, t, "fkl" if beta == 0 else "rkl")
    torch.testing.assert_close(dense_kd_loss(s, t, "jsd", beta=beta), want)


def test_dense_jsd_matches_trl_formula():
    """TRL generalized_jsd_loss: β·KL(P‖M) + (1−β)·KL(Q‖M) with M = βP + (1−β)Q."""
    s, t, _, _ = random_case(5)
    beta = 0.3
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
    kl = torch.nn.functional.kl_div
    want = beta * kl(lm, lt, reduction="none", log_target=True).sum(-1) + (1 - beta) * kl(
        lm, ls, reduction="none", log_target=True
    ).sum(-1)
    torch.testing.assert_close(dense_kd_loss(s, t, "jsd", beta=beta), want)


def test_akl_head_contains_the_token_that_crosses_mu():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    assert losses.head_mask(p, 0.5, 4).tolist() == [[True, True, False, False]]
    assert losses.head_mask(p, 0.4, 4).tolist() == [[True, False, False, False]]
    assert losses.head_mask(p, 0.0, 4).tolist() == [[True, False, False, False]]
    assert losses.head_mask(torch.tensor([[0.2, 0.1, 0.7]]), 0.95, 2).tolist() == [[True, True, False]]


def test_akl_weights_follow_the_gaps():
    """Teacher (0.6, 0.3 | tail 0.1) vs student (0.3, 0.3 | 0.4): g_head = 0.3, g_tail = 0 + 0.3."""
    tlp = torch.tensor([[0.6, 0.3]]).log()
    tail = torch.tensor([0.1]).log()
    # student logits over V=3 with probabilities (0.3, 0.3, 0.4); token 2 is the tail
    s = torch.tensor([[0.3, 0.3, 0.4]]).log()
    loss, st = sparse_kd_loss(s, torch.tensor([[0, 1]]), tlp, tail, "akl", mu=0.5, return_stats=True)
    torch.testing.assert_close(st.g_head, torch.tensor([0.3]))
    torch.testing.assert_close(st.g_tail, torch.tensor([0.3]))
    torch.testing.assert_close(st.w_head, torch.tensor([0.5]))
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    want = 0.5 * (p * (p / q).log()).sum() + 0.5 * (q * (q / p).log()).sum()
    torch.testing.assert_close(loss, want[None])


def test_sparse_tail_bucket_is_a_lower_bound_of_dense_fkl():
    s, t, _, _ = random_case(7)
    ids, lp, tail = teacher_topk(t, 3)
    assert (sparse_kd_loss(s, ids, lp, tail, "fkl") <= dense_kd_loss(s, t, "fkl") + 1e-6).all()


def test_temperature_is_applied_to_the_student():
    s, t, _, _ = random_case(1)
    ids, lp, tail = teacher_topk(t, 5, 2.0)
    a = sparse_kd_loss(s, ids, lp, tail, "fkl", temperature=2.0)
    b = sparse_kd_loss(s / 2.0, ids, lp, tail, "fkl", temperature=1.0)
    torch.testing.assert_close(a, b)


# -- the chunked lm_head path


@pytest.mark.parametrize("kind", ["fkl", "akl", "jsd"])
def test_hidden_chunked_path_equals_logits_path(kind):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)
    ids, lp, tail = teacher_topk(torch.randn(37, 50, generator=g), 6)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    a = sparse_kd_loss_from_hidden(h1, w1, ids, lp, tail, kind, chunk_size=8)
    a.sum().backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = sparse_kd_loss(h2 @ w2.T, ids, lp, tail, kind)
    b.sum().backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


# -- edge cases: nothing non-finite from finite (or -inf masked) inputs


def assert_finite(kind, s, ids, lp, tail_logmass, **kw):
    s = s.clone().requires_grad_()
    loss = sparse_kd_loss(s, ids, lp, tail_logmass, kind, **kw)
    loss.sum().backward()
    assert torch.isfinite(loss).all(), (kind, loss)
    assert torch.isfinite(s.grad).all(), (kind, s.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_student_logits_and_zero_tail(kind):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 20, generator=g)
    s[:, 10:] = float("-inf")
    ids, lp, tail = teacher_topk(torch.randn(4, 20, generator=g), 5)
    assert_finite(kind, s, ids, lp, tail)
    assert_finite(kind, s, ids, lp, torch.full_like(tail, float("-inf")))
    s2 = s.clone()
    s2[:, 5:] = float("-inf")  # student puts no mass outside a set: Q_R may be 0
    assert_finite(kind, s2, ids, lp, tail)


@pytest.mark.parametrize("kind", KINDS)
def test_one_hot_teacher(kind):
    s = torch.randn(3, 10)
    ids = torch.arange(4).repeat(3, 1)
    lp = torch.tensor([0.0, float("-inf"), float("-inf"), float("-inf")]).repeat(3, 1)
    assert_finite(kind, s, ids, lp, torch.full((3,), float("-inf")))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_student_logits(kind, dtype):
    s, t, _, _ = random_case(2)
    ids, lp, tail = teacher_topk(t, 3)
    s = s.to(dtype).requires_grad_()
    loss = sparse_kd_loss(s, ids, lp.half(), tail, kind)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and torch.isfinite(s.grad.float()).all()


def test_identical_distributions_give_zero_for_every_kind():
    t = torch.randn(5, 12)
    ids, lp, tail = teacher_topk(t, 12)
    for kind in KINDS:
        torch.testing.assert_close(sparse_kd_loss(t, ids, lp, tail, kind), torch.zeros(5), atol=1e-5, rtol=0)


def test_reduction_all_ignored_is_zero_and_num_items_normalizes():
    loss = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = losses.reduce_loss(loss, torch.zeros(3))
    out.backward()
    assert out.item() == 0 and torch.isfinite(loss.grad).all()
    assert losses.reduce_loss(loss, torch.tensor([1, 1, 0]), num_items=4).item() == pytest.approx(0.75)
    assert losses.mix(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(2.5)


def test_token_logprob_is_cross_entropy():
    s, y = torch.randn(6, 30), torch.randint(0, 30, (6,))
    a, ga = grads(lambda x: -losses.token_logprob(x, y), s)
    b, gb = grads(lambda x: torch.nn.functional.cross_entropy(x, y, reduction="none"), s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


# -- errors


def test_clear_errors():
    s = torch.randn(2, 10)
    ids, lp, tail = teacher_topk(torch.randn(2, 10), 3)
    with pytest.raises(ValueError, match="unknown loss kind 'kl'"):
        sparse_kd_loss(s, ids, lp, tail, "kl")
    with pytest.raises(ValueError, match="shape mismatch"):
        sparse_kd_loss(s, ids, lp[:, :2], tail, "fkl")
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        sparse_kd_loss(s[:, :5], ids.clamp_min(7), lp, tail, "fkl")
    for bad in (dict(mu=1.5), dict(beta=-0.1), dict(alpha=2.0)):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            sparse_kd_loss(s, ids, lp, tail, "akl", **bad)


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["fkl", "akl"])
def test_fused_cross_entropy_equals_separate_losses(kind, temp):
    """One pass for KD + CE gives the values and gradients of sparse_kd_loss and F.cross_entropy apart."""
    g = torch.Generator().manual_seed(4)
    s, y = torch.randn(9, 30, generator=g), torch.randint(0, 30, (9,), generator=g)
    ids, lp, tail = teacher_topk(torch.randn(9, 30, generator=g), 5, temp)
    y[0] = ids[0, 0]  # a target inside the top-k and others outside
    w = torch.rand(9, generator=g)

    def fused(x):
        kd, ce, _ = losses.sparse_kd_loss_with_ce(x, y, ids, lp, tail, kind, temperature=temp)
        return kd + w * ce

    def apart(x):
        return sparse_kd_loss(x, ids, lp, tail, kind, temperature=temp) + w * torch.nn.functional.cross_entropy(
            x, y, reduction="none"
        )

    a, ga = grads(fused, s)
    b, gb = grads(apart, s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


# -- ragged rows, drawn tail tokens, renormalization


def pad_rows(ids, lp, widths, extra=3):
    """Rows cut to the given widths and padded (id −1, log-prob −inf) to a common width plus `extra` columns."""
    w = int(max(widths)) + extra
    pid = torch.full((len(widths), w), -1, dtype=torch.long)
    plp = torch.full((len(widths), w), float("-inf"))
    for r, n in enumerate(widths):
        pid[r, :n], plp[r, :n] = ids[r, :n], lp[r, :n]
    return pid, plp


@pytest.mark.parametrize("kind", KINDS)
def test_padding_changes_nothing(kind):
    """A row padded with id −1 gives the value and gradient of the same row alone (backward included, where the
    padding repeats the row's first id)."""
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(6, 30, generator=g), torch.randn(6, 30, generator=g) * 2
    widths = [1, 5, 3, 7, 2, 4]
    ids, lp, _ = teacher_topk(t, 7)
    logp = torch.log_softmax(t, -1)
    tail = torch.stack(
        [torch.logsumexp(logp[r].scatter(0, ids[r, :n], float("-inf")), 0) for r, n in enumerate(widths)]
    )
    pid, plp = pad_rows(ids, lp, widths)
    padded_v, padded_g = grads(lambda x: sparse_kd_loss(x, pid, plp, tail, kind), s)
    for r, n in enumerate(widths):
        v, gr = grads(
            lambda x: sparse_kd_loss(x, ids[r : r + 1, :n], lp[r : r + 1, :n], tail[r : r + 1], kind), s[r : r + 1]
        )
        torch.testing.assert_close(padded_v[r : r + 1], v)
        torch.testing.assert_close(padded_g[r : r + 1], gr)


def fkl_grad_with_draws(s, logp, head, n_draws, reps, gen):
    """Mean over `reps` independent draws of the sparse FKL gradient, head exact + N drawn tail tokens."""
    v = logp.shape[-1]
    p = logp.exp()
    tail_p = p.clone()
    tail_p[head] = 0
    draws = torch.multinomial(tail_p.expand(reps, v), n_draws, replacement=True, generator=gen)
    ids, counts = [], []
    for d in draws:
        u, c = d.unique(return_counts=True)
        ids.append(u)
        counts.append(c)
    m = max(len(u) for u in ids)
    d_ids = torch.full((reps, m), -1, dtype=torch.long)
    d_lp = torch.full((reps, m), float("-inf"))
    log_pr = torch.log(tail_p.sum())
    for r, (u, c) in enumerate(zip(ids, counts)):
        d_ids[r, : len(u)], d_lp[r, : len(u)] = u, log_pr + torch.log(c / n_draws)
    h = len(head)
    hid = head.expand(reps, h) if h else torch.zeros((reps, 0), dtype=torch.long)
    _, gr = grads(
        lambda x: sparse_kd_loss(
            x, hid, logp[head].expand(reps, h), log_pr.expand(reps), "fkl", drawn_ids=d_ids, drawn_logprobs=d_lp
        ),
        s.expand(reps, v).contiguous(),
    )
    return gr.mean(0)


@pytest.mark.parametrize("head_width", [0, 3])
def test_drawn_tail_tokens_give_an_unbiased_fkl_gradient(head_width):
    """E[∇ sparse FKL with drawn tail] = ∇ dense FKL (q − p); the one-bucket tail's gradient is biased.
    head_width 0 is Random-Sampling KD itself."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(1, 40, generator=g), torch.randn(1, 40, generator=g) * 1.5
    logp = torch.log_softmax(t[0], -1)
    head = logp.argsort(descending=True)[:head_width]
    dense = torch.softmax(s[0], -1) - logp.exp()
    est = fkl_grad_with_draws(s, logp, head, 16, 6000, g)
    torch.testing.assert_close(est, dense, atol=4e-3, rtol=0)
    if head_width:
        rest = logp.clone()
        rest[head] = float("-inf")
        _, bucket = grads(
            lambda x: sparse_kd_loss(x, head[None], logp[head][None], torch.logsumexp(rest, 0)[None], "fkl"), s
        )
        assert (bucket[0] - dense).abs().max() > 5 * (est - dense).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_drawn_tokens_keep_every_kind_finite_and_student_weighted_terms_exact(kind):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 25, generator=g), torch.randn(4, 25, generator=g)
    ids, lp, tail = teacher_topk(t, 3)
    d_ids = torch.tensor([[5, 9, -1], [7, -1, -1], [-1, -1, -1], [11, 12, 13]])
    d_ids = torch.where(torch.isin(d_ids, ids), torch.full_like(d_ids, -1), d_ids)
    d_lp = torch.where(
        d_ids >= 0, tail[:, None] + math.log(1 / 3), torch.full_like(tail[:, None], float("-inf")).expand(4, 3)
    )
    assert_finite(kind, s, ids, lp, tail, drawn_ids=d_ids, drawn_logprobs=d_lp)
    if kind in ("rkl", "srkl", "tvd"):  # no teacher-weighted term: the draws change nothing
        torch.testing.assert_close(
            sparse_kd_loss(s, ids, lp, tail, kind, drawn_ids=d_ids, drawn_logprobs=d_lp),
            sparse_kd_loss(s, ids, lp, tail, kind),
        )


def test_renormalize_on_a_cache_with_draws_or_a_sketch_warns_that_it_drops_them(tmp_path):
    from synthetic import write_cache

    from pipeline import teachers

    write_cache(tmp_path / "plain")
    write_cache(tmp_path / "drawn", top_p=0.5, draws=8)
    with pytest.warns(UserWarning, match="--tail renormalize drops the tail, and with it the cache's tail draws"):
        teachers.check_serves(teachers.cached([tmp_path / "drawn"]).source, "fkl", tail="renormalize")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teachers.check_serves(teachers.cached([tmp_path / "plain"]).source, "fkl", tail="renormalize")


def test_renormalize_is_distillkits_sparse_kl():
    """Σ_K p̃ log(p̃ / q), p̃ the head renormalized, q the student's full softmax; the tail is ignored."""
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    ids, lp, tail = teacher_topk(t, 6)
    p_tilde = torch.softmax(lp, -1)
    q = torch.log_softmax(s, -1).gather(1, ids)
    want = (p_tilde * (p_tilde.log() - q)).sum(-1)
    torch.testing.assert_close(sparse_kd_loss(s, ids, lp, tail, "fkl", tail="renormalize"), want)
    for kind in KINDS:
        assert_finite(kind, s, ids, lp, tail, tail="renormalize")


# -- the on-policy objective


def test_policy_gradient_matches_its_analytic_form():
    """∇_z [−w·sg(log p − log q(y))·log q(y)] = w·(log q(y) − log p(y))·(e_y − softmax(z)), w = min(clip, q/π)."""
    g = torch.Generator().manual_seed(3)
    s, y = torch.randn(6, 20, generator=g), torch.randint(0, 20, (6,), generator=g)
    log_p = torch.log_softmax(torch.randn(6, 20, generator=g), -1).gather(1, y[:, None])[:, 0]
    behavior = torch.log_softmax(torch.randn(6, 20, generator=g), -1).gather(1, y[:, None])[:, 0]
    for beh, clip in ((None, 10.0), (behavior, 10.0), (behavior, 0.5)):
        x = s.clone().requires_grad_()
        loss, est = losses.onpolicy_pg_loss(x, y, log_p, beh, clip=clip)
        loss.sum().backward()
        q = torch.softmax(s, -1)
        log_q = q.log().gather(1, y[:, None])[:, 0]
        w = torch.ones(6) if beh is None else (log_q - beh).exp().clamp(max=clip)
        want = (w * (log_q - log_p))[:, None] * (torch.nn.functional.one_hot(y, 20) - q)
        torch.testing.assert_close(x.grad, want)
        torch.testing.assert_close(est, log_q - log_p)


def test_policy_gradient_estimates_the_reverse_kl_gradient():
    """Tokens sampled from q: the mean of the per-token gradient approaches ∇ KL(q ‖ p) = q ⊙ (log q − log p − KL)."""
    g = torch.Generator().manual_seed(4)
    z, log_p = torch.randn(12, generator=g), torch.log_softmax(torch.randn(12, generator=g), -1)
    q = torch.softmax(z, -1)
    y = torch.multinomial(q, 40000, replacement=True, generator=g)
    x = z.expand(40000, 12).clone().requires_grad_()
    loss, _ = losses.onpolicy_pg_loss(x, y, log_p[y])
    loss.mean().backward()
    kl = (q * (q.log() - log_p)).sum()
    torch.testing.assert_close(x.grad.sum(0), q * (q.log() - log_p - kl), atol=0.02, rtol=0)


# -- exact draws and the teacher sketch: refinements of the tail bucket


def exact_draws(logp, head, n_draws, reps, gen):
    """reps independent sets of n_draws tail draws of one teacher row logp [V] beyond `head`, as the loss's exact-draw
    fields [reps, m]: ids, exact log-probs, Horvitz–Thompson log weights (storage.codecs, as a cache decodes them)."""
    from storage import codecs

    tail_p = logp.exp().clone()
    tail_p[head] = 0
    log_pr = torch.log(tail_p.sum())
    draws = torch.multinomial(tail_p.expand(reps, -1), n_draws, replacement=True, generator=gen)
    uniq = [d.unique() for d in draws]
    m = max(len(u) for u in uniq)
    ids = torch.full((reps, m), -1, dtype=torch.long)
    for r, u in enumerate(uniq):
        ids[r, : len(u)] = u
    lp = torch.where(ids >= 0, logp[ids.clamp_min(0)], torch.tensor(float("-inf")))
    widths = (ids >= 0).sum(1).numpy()
    flat = lp[ids >= 0].double().numpy()
    lw = torch.full_like(lp, float("-inf"))
    lw[ids >= 0] = torch.from_numpy(
        codecs.inclusion_logweights(flat, codecs.offsets_of(widths), np.full(reps, float(log_pr)), n_draws)
    ).float()
    return ids, lp, lw, log_pr


def identity_sketch(teacher_logits):
    """A sketch whose approximate logits are the teacher's own: coefficients = logits, basis = [0; I]."""
    v = teacher_logits.shape[-1]
    return {"sketch_coeffs": teacher_logits.float(), "sketch_basis": torch.cat([torch.zeros(1, v), torch.eye(v)])}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(6))
def test_a_sketch_of_the_exact_logits_makes_every_sparse_kind_its_dense_twin(kind, seed):
    """The sketch spreads the exact tail mass by softmax(approx / t) over the tokens outside the head: with the
    teacher's own logits as the approximation that is the teacher itself, whatever the head. (AKL's head is chosen
    within the cached head, as on the bucket: here μ lies within the cached head's mass.)"""
    s, t, temp, params = random_case(seed)
    ids, lp, tail = teacher_topk(t, max(1, t.shape[1] // 3), temp)
    params["mu"] = min(params["mu"], 0.99 * float(lp.exp().sum(-1).min()))
    sketch = identity_sketch(t)
    sv, sg = grads(lambda x: sparse_kd_loss(x, ids, lp, tail, kind, temperature=temp, **sketch, **params), s)
    dv, dg = grads(lambda x: dense_kd_loss(x, t, kind, temperature=temp, **params), s)
    torch.testing.assert_close(sv, dv, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sg, dg, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_sketch", [False, True])
def test_exact_draws_give_an_unbiased_fkl_gradient(with_sketch):
    """E[∇ FKL] over draws = ∇ dense FKL with Horvitz–Thompson weights, with or without a sketch beside them."""
    g = torch.Generator().manual_seed(5)
    v, reps = 40, 6000
    s, t = torch.randn(1, v, generator=g), torch.randn(1, v, generator=g) * 1.5
    logp = torch.log_softmax(t[0], -1)
    head = logp.argsort(descending=True)[:3]
    d_ids, d_lp, d_lw, log_pr = exact_draws(logp, head, 16, reps, g)
    sketch = {k: x.expand(reps, -1) if x.shape[0] == 1 else x for k, x in identity_sketch(t).items()}
    _, gr = grads(
        lambda x: sparse_kd_loss(
            x, head.expand(reps, 3), logp[head].expand(reps, 3), log_pr.expand(reps), "fkl",
            drawn_ids=d_ids, drawn_logprobs=d_lp, drawn_logweights=d_lw, **(sketch if with_sketch else {}),
        ),
        s.expand(reps, v).contiguous(),
    )  # fmt: skip
    torch.testing.assert_close(gr.mean(0), torch.softmax(s[0], -1) - logp.exp(), atol=4e-3, rtol=0)


@pytest.mark.parametrize("kind", ["rkl", "srkl", "tvd"])
def test_exact_draws_bound_the_student_weighted_terms_between_bucket_and_dense(kind):
    """Drawn tokens with exact log-probs split the bucket into finer bins (each drawn token, the undrawn rest), so the
    divergence lies between the bucket's and the full vocabulary's (data processing); with the sketch it is exact."""
    g = torch.Generator().manual_seed(3)
    v, reps = 60, 8
    s, t = torch.randn(reps, v, generator=g) * 2, (torch.randn(1, v, generator=g) * 2).expand(reps, v)
    logp = torch.log_softmax(t[0], -1)
    head = logp.argsort(descending=True)[:4]
    d_ids, d_lp, d_lw, log_pr = exact_draws(logp, head, 12, reps, g)
    rows = (head.expand(reps, 4), logp[head].expand(reps, 4), log_pr.expand(reps))
    bucket = sparse_kd_loss(s, *rows, kind)
    exact = sparse_kd_loss(s, *rows, kind, drawn_ids=d_ids, drawn_logprobs=d_lp, drawn_logweights=d_lw)
    dense = dense_kd_loss(s, t, kind)
    assert (bucket <= exact + 1e-5).all() and (exact <= dense + 1e-5).all() and (exact > bucket + 1e-4).any()
    sketched = sparse_kd_loss(
        s, *rows, kind, drawn_ids=d_ids, drawn_logprobs=d_lp, drawn_logweights=d_lw, **identity_sketch(t)
    )
    torch.testing.assert_close(sketched, dense, rtol=1e-4, atol=1e-5)


def test_a_sketch_refuses_counted_draws_and_keeps_every_kind_finite():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 25, generator=g), torch.randn(4, 25, generator=g)
    ids, lp, tail = teacher_topk(t, 3)
    d_ids = torch.tensor([[5, 9, -1], [7, -1, -1], [-1, -1, -1], [11, 12, 13]])
    d_ids = torch.where(torch.isin(d_ids, ids), torch.full_like(d_ids, -1), d_ids)
    d_lp = torch.where(d_ids >= 0, tail[:, None] - 2.0, torch.tensor(float("-inf")))
    sketch = {"sketch_coeffs": torch.randn(4, 2, generator=g), "sketch_basis": torch.randn(3, 25, generator=g)}
    with pytest.raises(ValueError, match="counted draws"):
        sparse_kd_loss(s, ids, lp, tail, "akl", drawn_ids=d_ids, drawn_logprobs=d_lp, **sketch)
    for kind in KINDS:
        assert_finite(kind, s, ids, lp, tail, drawn_ids=d_ids, drawn_logprobs=d_lp, drawn_logweights=d_lp, **sketch)


def test_hidden_chunked_path_with_draws_and_sketch_equals_logits_path():
    g = torch.Generator().manual_seed(4)
    hidden, w = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    t = torch.randn(10, 30, generator=g)
    ids, lp, tail = teacher_topk(t, 4)
    d_ids = torch.full((10, 2), -1)
    d_ids[:, 0] = torch.where(torch.isin(torch.tensor(20), ids), -1, 20).squeeze()
    d_lp = torch.where(d_ids >= 0, torch.log_softmax(t, -1).gather(1, d_ids.clamp_min(0)), torch.tensor(float("-inf")))
    kw = dict(drawn_ids=d_ids, drawn_logprobs=d_lp, drawn_logweights=d_lp, **identity_sketch(t))
    want = sparse_kd_loss(hidden @ w.T, ids, lp, tail, "akl", **kw)
    got = sparse_kd_loss_from_hidden(hidden, w, ids, lp, tail, "akl", chunk_size=3, **kw)
    torch.testing.assert_close(got, want)


def test_the_sketched_loss_in_row_chunks_equals_it_in_one(monkeypatch):
    """Chunks of positions, recomputed in backward, keep [chunk, V] temporaries only: same values and gradients."""
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(11, 30, generator=g), torch.randn(11, 30, generator=g)
    ids, lp, tail = teacher_topk(t, 4)
    targets = torch.randint(0, 30, (11,), generator=g)
    sketch = {"sketch_coeffs": torch.randn(11, 3, generator=g), "sketch_basis": torch.randn(4, 30, generator=g)}

    def run():
        x = s.clone().requires_grad_()
        kd, ce, stats = losses.sparse_kd_loss_with_ce(x, targets, ids, lp, tail, "akl", **sketch)
        (kd.sum() + ce.sum()).backward()
        return kd.detach(), ce.detach(), stats.w_head, x.grad

    whole = run()
    monkeypatch.setattr(losses, "ROW_CHUNK", 4)
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b)
