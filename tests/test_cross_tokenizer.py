"""One cache, a student of another tokenizer: the cache records each sample's text and where its tokens end; the
student's tokens are aligned to the teacher's on the bytes; uld, gold and alm equal their dense definitions on
tiny models where every quantity is computed in full; training on them brings the student closer to the teacher;
bits per byte compare models of any tokenizer."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import build, free_port
from transformers import AutoModelForCausalLM

import storage
from pipeline import alignment, batches, cross_losses, hf, losses, models, scoring, teachers
from pipeline.cli import main
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.cross_tokenizer import Projection, projected_rows, vocabulary_map
from pipeline.errors import OptionError
from stages import cache_teacher as ct
from stages import evaluate, generate, prepare_demo
from stages import train as tr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny byte-level teacher fine-tuned by SFT, caches of its train and test splits (full rows in float32, and
    the default encoding), and a fresh student with a metaspace tokenizer of its own."""
    root = tmp_path_factory.mktemp("xtok")
    paths = build(root, train_size=64, test_size=16, archs=("gpt2",))
    data = {s: DataConfig(paths[s], prompt_field="prompt", response_field="response") for s in ("train", "test")}
    tr.run(TrainConfig.of(student=paths["gpt2"], out=str(root / "teacher"), loss="ce", data=data["train"],
                          max_steps=30, lr=3e-3, batch_size=16, progress=False, log_every=30))  # fmt: skip
    paths["teacher"] = str(root / "teacher/final")
    full = dict(
        top_k=len(models.load_tokenizer(paths["teacher"])), top_p=1, tail_draws=0, ids="plain", logprob_dtype="float32"
    )
    for name, split, enc in (("full", "test", full), ("train", "train", {}), ("test", "test", {})):
        out = str(root / f"cache-{name}")
        ct.run(ct.CacheTeacherConfig(teacher=paths["teacher"], data=data[split], out=out, progress=False, **enc))
        paths[f"cache_{name}"] = out
    texts = [json.loads(line)["prompt"] + " " + json.loads(line)["response"] for line in open(paths["train"])]
    prepare_demo.save_tokenizer(root / "ms-tok", texts * 4, 300, "metaspace")
    paths["student"] = prepare_demo.save_model(
        ModelConfig(root / "student", root / "ms-tok", "llama", layers=2, width=32, heads=2)
    )
    paths["data"], paths["root"] = data, root
    return paths


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), models.load_tokenizer(path)


# -- the cache records the text


def test_the_cache_records_each_samples_text_and_where_its_tokens_end(world):
    cache = storage.open_cache(world["cache_train"])
    pieces = alignment.token_bytes(models.load_tokenizer(world["teacher"]))
    rows = [json.loads(line) for line in open(world["train"])]
    assert cache.encoding["text"]
    for i in range(len(cache)):
        s = cache[i]
        row = rows[s["sample_index"]]
        assert s["prompt_text"].decode() == row["prompt"] and s["text"].decode() == row["response"]
        spelled = [pieces[t] for t, e in zip(s["input_ids"], s["text_end"]) if e >= 0]
        assert b"".join(spelled) == s["text"]
        ends = s["text_end"][s["text_end"] >= 0]
        assert (np.diff(ends) > 0).all() and ends[-1] == len(s["text"])
        assert s["text_end"][-1] == alignment.END and s["loss_mask"][s["text_end"] >= 0].all()


def test_a_cache_verifies_and_its_samples_layout_holds_the_same_text(world, tmp_path):
    storage.verify(world["cache_train"])  # raises on any problem
    storage.convert(world["cache_train"], tmp_path / "arrow", backend="arrow")
    a, b = storage.open_cache(world["cache_train"]), storage.open_cache(tmp_path / "arrow")
    for i in range(len(a)):
        for key in ("prompt_text", "text", "text_end"):
            assert np.array_equal(np.asarray(a[i][key]), np.asarray(b[i][key]))


# -- the three losses equal their dense definitions


def dense_fields(world, cache):
    """A batch of the student's tokens with the cached fields per chunk, and beside it each chunk's teacher
    distribution [C, V_T] and chunk log-likelihood computed from the teacher model in full."""
    t_model, t_tok = load(world["teacher"])
    s_model, s_tok = load(world["student"])
    cross = teachers.cross_tokenizer([cache], (), None, s_tok, 256, t_tok)
    plain = storage.open_cache(cache)
    samples = [cross.source[i] for i in range(6)]
    t_full, t_chunk = [], []
    for i in range(6):
        t = plain[i]
        ids = torch.from_numpy(t["input_ids"].astype(np.int64))
        logp = torch.log_softmax(t_model(ids[None]).logits[0, :-1].float(), -1)[:, : len(t_tok)]
        ct_, cs_, n = alignment.chunks(np.asarray(t["text_end"]), cross.source.rows[i]["text_end"])
        kept = [c for c in range(n) if (ct_ == c).any()]  # chunks of the sample, in order
        keep = [c for c in kept if t["loss_mask"][ct_ == c].all() and cross.source.rows[i]["loss_mask"][cs_ == c].all()]
        j = [int(np.nonzero(ct_ == c)[0][0]) for c in keep]
        t_full.append(logp[torch.tensor(j, dtype=torch.long) - 1].exp())
        tok_lp = logp.gather(1, ids[1:, None])[:, 0]
        t_chunk.append(torch.stack([tok_lp[np.nonzero(ct_ == c)[0] - 1].sum() for c in keep]))
    b = batches.collate(samples, s_tok.pad_token_id)
    logits = scoring.forward(models.PositionLogits(s_model, len(s_tok)), b)
    return b, cross.fields(b), logits.detach(), torch.cat(t_full).detach(), torch.cat(t_chunk).detach()


def sorted_desc(x: np.ndarray, width: int) -> np.ndarray:
    return np.pad(-np.sort(-x, axis=-1), ((0, 0), (0, width - x.shape[-1])))


def test_uld_from_full_rows_is_the_distance_of_the_sorted_distributions(world):
    b, fields, logits, p, _ = dense_fields(world, world["cache_full"])
    q = torch.softmax(logits[fields["chunk_first"]], -1).numpy()
    width = max(p.shape[1], q.shape[1])
    dense = np.abs(sorted_desc(p.numpy(), width) - sorted_desc(q, width)).sum(-1)
    sparse = losses.batch_losses(logits, b, fields, "uld")["kd"]
    assert len(dense) > 20 and float(sparse) == pytest.approx(dense.sum(), rel=1e-4)


def test_uld_from_a_truncated_head_is_a_lower_bound_within_the_two_tails(world):
    b, fields, logits, p, _ = dense_fields(world, world["cache_test"])
    q = torch.softmax(logits[fields["chunk_first"]], -1)
    width = max(p.shape[1], q.shape[1])
    dense = np.abs(sorted_desc(p.numpy(), width) - sorted_desc(q.numpy(), width)).sum(-1)
    sparse = cross_losses.uld_loss(logits[fields["chunk_first"]], fields["topk_logprobs"], fields["tail_logmass"])
    w = (fields["topk_ids"] >= 0).sum(-1)
    rest_t = fields["tail_logmass"].exp()
    rest_s = 1 - torch.stack([q[r].topk(int(w[r])).values.sum() for r in range(len(w))])
    assert (sparse.numpy() <= dense + 1e-3).all()  # (q8 head log-probs: within their rounding)
    assert (dense <= (sparse + rest_t + rest_s).numpy() + 1e-3).all()
    assert (sparse.numpy() < dense - 1e-3).any()  # the bound is not always tight: the tail's shape is not cached


def test_gold_is_the_coarsened_kl_on_exact_matches_plus_uld_on_the_rest(world):
    b, fields, logits, p, _ = dense_fields(world, world["cache_full"])
    vocab_map = fields["vocab_map"].numpy()
    assert 0 < (vocab_map >= 0).sum() < len(vocab_map)  # some tokens match, some do not
    q = torch.softmax(logits[fields["chunk_first"]], -1).double().numpy()
    p = p.double().numpy()
    m = vocab_map >= 0
    pm, qm = p[:, m], q[:, vocab_map[m]]
    p_rest, q_rest = 1 - pm.sum(-1), 1 - qm.sum(-1)
    kl = (pm * np.log(np.maximum(pm, 1e-300) / qm)).sum(-1) + p_rest * np.log(p_rest / q_rest)
    q_u = np.delete(q, vocab_map[m], axis=1)
    width = max(q_u.shape[1], (~m).sum())
    uld = np.abs(sorted_desc(p[:, ~m], width) - sorted_desc(q_u, width)).sum(-1)
    sparse = losses.batch_losses(logits, b, fields, "gold")["kd"]
    assert float(sparse) == pytest.approx((kl + uld).sum(), rel=1e-3)


def projected(rows: dict) -> list[dict]:
    """Each position's projected row as {student id: probability}, and its bucket under None."""
    out = []
    for ids, lps, tail in zip(rows["topk_ids"], rows["topk_logprobs"], rows["tail_logmass"]):
        row = {int(i): pytest.approx(float(np.exp(lp)), rel=1e-6) for i, lp in zip(ids, lps) if i >= 0}
        out.append({**row, None: pytest.approx(float(np.exp(tail)), abs=1e-7)})
    return out


@pytest.mark.parametrize("draws", [True, False])
def test_pkl_rows_are_the_teachers_continuations_of_the_bytes_written_begun_in_the_students_tokens(draws):
    """Text " there is"; the teacher writes " there"|" is", the student " th"|"ere"|" is". Where the student writes
    "ere", the teacher's row for " there" has written " th": its continuations are " there" (adds "ere") and " the"
    (adds "e"), and a drawn " therm" (adds "erm", begun by the student's "er"); " a" does not continue " th". With
    exact draws a row is normalized over head and draws; without, a row at a teacher token's start keeps its tail."""
    teacher_pieces = [b" there", b" the", b" a", b" is", b" was", b" therm"]
    student_pieces = [b" th", b"ere", b" is", b" a", b"e", b" w", b"er", b"as"]
    teacher = {
        "text_end": np.array([6, 9]), "loss_mask": np.array([1, 1]),
        "topk_ids": np.array([[0, 1, 2], [3, 4, -1]]), "tail_logmass": np.log([0.1, 0.1]),
        "topk_logprobs": np.log([[0.5, 0.3, 0.1], [0.6, 0.3, 1.0]]),  # (padding: id −1, not read)
    }  # fmt: skip
    if draws:
        teacher.update(drawn_ids=np.array([[5], [-1]]), drawn_logprobs=np.log([[0.05], [1.0]]),
                       drawn_logweights=np.log([[0.1], [1.0]]))  # fmt: skip
    student = {"input_ids": np.array([0, 1, 2]), "text_end": np.array([3, 6, 9]), "loss_mask": np.array([1, 1, 1])}
    rows = projected_rows(teacher, student, b" there is", Projection(teacher_pieces, student_pieces))
    if draws:
        want = [
            {0: 0.9, 3: 0.1, None: 0},
            {1: 0.5 / 0.9, 4: 0.3 / 0.9, 6: 0.1 / 0.9, None: 0},
            {2: 2 / 3, 5: 1 / 3, None: 0},
        ]
    else:
        want = [{0: 0.8, 3: 0.1, None: 0.1}, {1: 0.5 / 0.8, 4: 0.3 / 0.8, None: 0}, {2: 0.6, 5: 0.3, None: 0.1}]
    assert projected(rows) == want


def test_a_student_token_that_is_not_its_own_bytes_gets_an_empty_row():
    """A metaspace dummy prefix: the student's " there" spans the text's "there" (5 bytes): no row, all bucket."""
    teacher = {"text_end": np.array([5]), "loss_mask": np.array([1]), "topk_ids": np.array([[0]]),
               "topk_logprobs": np.array([[0.0]]), "tail_logmass": np.array([-np.inf])}  # fmt: skip
    student = {"input_ids": np.array([0]), "text_end": np.array([5]), "loss_mask": np.array([1])}
    rows = projected_rows(teacher, student, b"there", Projection([b"there"], [b" there", b"there"]))
    assert projected(rows) == [{None: 1.0}]


def test_an_empty_pkl_row_gives_no_loss_and_no_gradient():
    """The sparse losses pad rows with a real id; a position pkl has no row for must not train on that id."""
    z = torch.randn(2, 10, requires_grad=True)
    fields = {"topk_ids": torch.tensor([[-1], [2]]), "topk_logprobs": torch.tensor([[-math.inf], [0.0]]),
              "tail_logmass": torch.tensor([0.0, -math.inf])}  # fmt: skip
    kd = losses.batch_losses(z, {"targets": torch.tensor([3, 2])}, fields, "pkl")["kd"]
    kd.backward()
    assert float(kd) == pytest.approx(-float(torch.log_softmax(z[1], -1)[2]), rel=1e-5)
    assert (z.grad[0] == 0).all() and (z.grad[1] != 0).any()


def test_the_projection_begins_a_byte_string_with_the_longest_student_token_that_starts_it():
    teacher = [b" the", b" there", b"re", b"\xc3\xa9t\xc3\xa9", b"", b"zz"]
    project = Projection(teacher, [b" th", b" the", b"r", b"\xc3", b"\xc3\xa9", b"<", b""])
    assert [project.first(b) for b in teacher] == [1, 1, 2, 4, -1, -1]
    # of two tokens with the same bytes, the one the student writes: "▁" (2), not the byte-fallback <0x20> (0)
    assert Projection([b" x"], [b" ", b"y", b" "], student_added=[0]).first(b" x") == 2


def test_pkl_gives_every_distilled_student_position_of_a_real_cache_a_row(world):
    """Not a row per chunk: most positions have continuations in the default encoding (top-p head + exact draws)."""
    s_tok = models.load_tokenizer(world["student"])
    t_tok = models.load_tokenizer(world["teacher"])
    cross = teachers.cross_tokenizer([world["cache_test"]], (), None, s_tok, 256, t_tok, "pkl")
    sample = cross.source[0]
    assert len(sample["topk_ids"]) == int(sample["loss_mask"].sum()) > len(sample["chunk_first"])
    assert (sample["topk_ids"] >= 0).any(-1).mean() > 0.8  # most positions have continuations


@pytest.mark.parametrize("tau", [1.0, 10.0])
def test_alm_is_tau_times_the_binary_kl_of_the_chunk_likelihoods_at_one_over_tau(world, tau):
    b, fields, logits, _, t_chunk = dense_fields(world, world["cache_full"])
    assert torch.allclose(fields["chunk_logprob"], t_chunk, atol=1e-4)  # the cache's sums are the teacher's
    lq = torch.zeros_like(t_chunk).index_add(
        0, fields["chunk_of"].clamp_min(0), torch.where(
            fields["chunk_of"] >= 0, losses.token_logprob(logits, b["targets"]), torch.zeros(len(b["targets"]))
        )
    ).double()  # fmt: skip
    lp = t_chunk.double()
    p, q = (lp / tau).exp(), (lq / tau).exp()
    dense = tau * (p * (p.log() - q.log()) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q)))
    got = float(losses.batch_losses(logits, b, fields, "alm", alm_tau=tau)["kd"])
    assert got == pytest.approx(float(dense.sum()), rel=1e-4)


def test_alm_at_a_large_tau_matches_log_likelihoods_with_a_gradient_where_both_are_unlikely():
    """τ → ∞: (ℓ_T − ℓ_S) + ℓ_T·log(ℓ_S/ℓ_T), gradient ℓ_T/ℓ_S − 1 in ℓ_S; at τ = 1 a chunk of likelihood e^-20
    that the student puts at e^-30 moves it by less than 1e-8."""
    lp = torch.tensor([-20.0, -3.0, -0.5])
    chunk_of = torch.arange(3)
    for tau, want_grad in ((1.0, None), (1e5, lp / torch.tensor([-30.0, -2.0, -0.5]) - 1)):
        lq = torch.tensor([-30.0, -2.0, -0.5], requires_grad=True)
        loss = cross_losses.alm_loss(lq, chunk_of, lp, tau)
        loss.sum().backward()
        if want_grad is None:
            assert abs(float(lq.grad[0])) < 1e-8
            continue
        limit = (lp - lq) + lp * torch.log(lq / lp)
        torch.testing.assert_close(loss, limit.detach(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(lq.grad, want_grad, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind", ["uld", "gold", "pkl", "alm"])
def test_packed_batches_give_the_padded_loss_and_gradient(world, kind):
    """The chunk indices follow the samples into a packed row: the same losses and gradients as padded rows."""
    s_model, s_tok = load(world["student"])
    t_tok = models.load_tokenizer(world["teacher"]) if kind in ("gold", "pkl") else None
    cross = teachers.cross_tokenizer([world["cache_train"]], (), None, s_tok, 256, t_tok, kind)
    samples = [cross.source[i] for i in range(7)]
    head = models.PositionLogits(s_model, len(s_tok))
    total = sum(len(s["input_ids"]) for s in samples)
    out = {}
    for pack in (None, total):
        b = batches.collate(samples, s_tok.pad_token_id, pack)
        s_model.zero_grad()
        terms = losses.batch_losses(scoring.forward(head, b, False), b, cross.fields(b), kind)
        (terms["kd"] + terms["ce"]).backward()
        out[pack] = (terms, {n: p.grad.clone() for n, p in s_model.named_parameters()}, b["input_ids"].shape)
    assert out[total][2] == (1, total)  # one row, no padding
    for key in ("kd", "ce"):
        torch.testing.assert_close(out[None][0][key], out[total][0][key], rtol=1e-5, atol=1e-5)
    for n, g in out[None][1].items():
        torch.testing.assert_close(g, out[total][1][n], rtol=1e-4, atol=1e-6)


# -- training and evaluation


def chunk_divergence(world, model_path, kind="alm"):
    model, tok = load(model_path)
    t_tok = models.load_tokenizer(world["teacher"]) if kind in ("gold", "pkl") else None
    cross = teachers.cross_tokenizer([world["cache_test"]], (), None, tok, 256, t_tok, kind)
    head = models.PositionLogits(model, len(tok))
    return scoring.score(head, model, cross, tok.pad_token_id, torch.device("cpu"), (kind,))[kind]


@pytest.mark.parametrize("loss", ["uld", "gold", "pkl", "alm"])
def test_each_cross_tokenizer_loss_lowers_its_heldout_divergence(world, tmp_path, loss):
    before = chunk_divergence(world, world["student"], loss)
    tr.run(TrainConfig.of(student=world["student"], out=str(tmp_path / "run"), loss=loss, cache=world["cache_train"],
                          max_steps=25, lr=3e-3, batch_size=8, progress=False, log_every=5))  # fmt: skip
    after = chunk_divergence(world, str(tmp_path / "run/final"), loss)
    assert after < 0.8 * before


@pytest.mark.parametrize("loss", ["alm", "pkl"])
def test_mixed_caches_serve_a_cross_tokenizer_student(world, tmp_path, loss):
    caches = (world["cache_train"], world["cache_test"])
    summary = tr.run(TrainConfig.of(
        student=world["student"], out=str(tmp_path / "run"), loss=loss, cache=caches, mix=(0.25,), max_steps=4,
        lr=3e-3, batch_size=8, progress=False, log_every=2,
    ))  # fmt: skip
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert summary["steps"] == 4 and all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in rows if "kd" in r)


def test_bits_per_byte_of_a_uniform_model_is_log2_v_times_tokens_per_byte(world, tmp_path):
    """A model whose logits are all equal pays log2 V bits for each token of the text (a metaspace dummy prefix
    included); bits per byte divides their sum by the bytes of the text, counted here from the text itself."""
    for path in (world["teacher"], world["student"]):
        model, tok = load(path)
        with torch.no_grad():
            for p in model.get_output_embeddings().parameters():
                p.zero_()
        model.save_pretrained(tmp_path / "uniform")
        tok.save_pretrained(tmp_path / "uniform")
        cfg = evaluate.EvalConfig(
            model=str(tmp_path / "uniform"), out=str(tmp_path / "m.json"), data=world["data"]["test"], generate=False,
            progress=False,
        )  # fmt: skip
        metrics = evaluate.run(cfg)
        rows = [json.loads(line) for line in open(world["test"])]
        n_bytes = sum(len(r["response"].encode()) for r in rows)
        n_tokens = sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rows)
        assert metrics["bits_per_byte"] == pytest.approx(math.log2(len(tok)) * n_tokens / n_bytes, rel=1e-4)


def test_evaluate_reports_chunk_divergences_from_another_tokenizers_cache(world, tmp_path):
    metrics = evaluate.run(evaluate.EvalConfig(model=world["student"], out=str(tmp_path / "m.json"),
                                               data=world["data"]["test"], teacher_cache=world["cache_test"],
                                               generate=False, progress=False))  # fmt: skip
    assert metrics["chunk_alm_to_teacher"] > 0 and metrics["chunk_uld_to_teacher"] > 0
    assert metrics["chunk_alm_to_teacher"] == pytest.approx(chunk_divergence(world, world["student"]))


# -- what a cache cannot serve


def test_a_cache_without_text_is_refused_in_one_line(world, tmp_path):
    """A teacher whose tokenizer's bytes cannot be told (here: a WordPiece decoder) writes a cache without text, as
    every cache before 0.3 is; a cross-tokenizer loss on it is one line naming why."""
    teacher = tmp_path / "teacher"
    shutil.copytree(world["teacher"], teacher)
    spec = json.loads((teacher / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "cache"
    ct.run(ct.CacheTeacherConfig(teacher=str(teacher), data=world["data"]["test"], out=str(out), progress=False))
    assert "text" not in storage.open_cache(out).encoding
    res = CliRunner().invoke(main, ["train", "--student", world["student"], "--out", str(tmp_path / "run"),
                                    "--cache", str(out), "--loss", "uld", "--max-steps", "1"])  # fmt: skip
    assert res.exit_code == 1 and "records no text" in res.output and res.output.count("error:") == 1, res.output


def test_the_trainer_surface_gives_the_loss_of_pipeline_train(world):
    """CacheDataset(…, tokenizer=…[, teacher_tokenizer=…]) + DistillCollator + distill_loss: the same per-position
    loss as train's path, for every cross-tokenizer loss."""
    model, tok = load(world["student"])
    t_tok = models.load_tokenizer(world["teacher"])
    dataset = hf.CacheDataset(world["cache_train"], tokenizer=tok, max_length=256)
    vocab_map = torch.from_numpy(vocabulary_map(alignment.token_bytes(t_tok), alignment.token_bytes(tok)))
    batch = hf.DistillCollator(tok)([dataset[i] for i in range(4)])
    labels = batch.pop("labels")
    outputs = model(**batch)
    cross = teachers.cross_tokenizer([world["cache_train"]], (), None, tok, 256, t_tok)
    b = batches.collate([cross.source[i] for i in range(4)], tok.pad_token_id)
    logits = scoring.forward(models.PositionLogits(model, len(tok)), b)
    for kind in ("uld", "gold", "alm"):
        got = hf.distill_loss(kind, vocab_map=vocab_map if kind == "gold" else None)(outputs, labels)
        want = losses.batch_losses(logits, b, cross.fields(b), kind)["kd"] / len(b["targets"])
        assert float(got) == pytest.approx(float(want), rel=1e-4)
    with pytest.raises(OptionError, match="teacher_tokenizer"):  # pkl's rows are per position, not per chunk
        hf.distill_loss("pkl")(outputs, labels)
    with pytest.raises(OptionError, match="pass tokenizer=…"):  # a projection needs the student's tokens
        hf.CacheDataset(world["cache_train"], teacher_tokenizer=t_tok)
    projected = hf.CacheDataset(world["cache_train"], tokenizer=tok, max_length=256, teacher_tokenizer=t_tok)
    labels = hf.DistillCollator(tok)([projected[i] for i in range(4)]).pop("labels")
    cross = teachers.cross_tokenizer([world["cache_train"]], (), None, tok, 256, t_tok, "pkl")
    b = batches.collate([cross.source[i] for i in range(4)], tok.pad_token_id)
    want = losses.batch_losses(logits, b, cross.fields(b), "pkl")["kd"] / len(b["targets"])
    assert float(hf.distill_loss("pkl")(outputs, labels)) == pytest.approx(float(want), rel=1e-4)


def test_an_on_policy_round_of_a_student_of_another_tokenizer(world, tmp_path):
    """The student samples; the teacher scores the sampled text in its own tokens (cache-teacher on the generated
    rows' text, not their ids); training mixes the fixed cache and the round's cache, aligned on the bytes."""
    gen = tmp_path / "gen.jsonl"
    generate.run(generate.GenerateConfig(model=world["student"], source=world["train"], prompt_field="prompt",
                                         out=str(gen), limit=16, max_new_tokens=12, progress=False))  # fmt: skip
    rows = [json.loads(line) for line in open(gen)]
    data = DataConfig(str(gen), prompt_field="prompt", response_field="response")
    cache = ct.run(ct.CacheTeacherConfig(teacher=world["teacher"], data=data, out=str(tmp_path / "c"), progress=False))
    assert cache["manifest"]["encoding"]["text"]
    texts = storage.open_cache(tmp_path / "c").texts()
    assert [t.decode() for _, t in texts] == [r["response"] for r in rows]
    caches = (world["cache_train"], str(tmp_path / "c"))
    for loss in ("alm", "pkl"):
        tr.run(TrainConfig.of(
            student=world["student"], out=str(tmp_path / loss), loss=loss, cache=caches, mix=(0.5,), max_steps=3,
            batch_size=8, progress=False, log_every=1,
        ))  # fmt: skip
        assert (tmp_path / loss / "final/config.json").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["gold", "pkl"])
def test_fsdp_on_two_ranks_ends_where_one_process_does(world, tmp_path, loss):
    """gold (chunk fields, the vocabulary map) and pkl (projected rows per position) under FSDP2 on 2 CPU ranks end
    at one process's weights."""
    args = ["train", "--student", world["student"], "--cache", world["cache_train"], "--loss", loss, "--max-steps",
            "6", "--batch-size", "8", "--lr", "2e-3", "--log-every", "2"]  # fmt: skip
    single = CliRunner().invoke(main, args + ["--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "pipeline.cli", *args, "--fsdp", "--out", str(tmp_path / "fsdp")]  # fmt: skip
    root = Path(__file__).parents[1]
    subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
    a = load_file(tmp_path / "one/final/model.safetensors")
    b = load_file(tmp_path / "fsdp/final/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)
