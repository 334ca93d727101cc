"""On-policy rounds: the student samples (deterministically per seed), the teacher scores exactly the sampled tokens,
and the student trains on them with any divergence or the policy gradient."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import build
from transformers import AutoModelForCausalLM

import storage
from pipeline.cli import main
from pipeline.config import DataConfig, TrainConfig
from stages import cache_teacher as ct
from stages import generate as gen
from stages import train as tr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("onpolicy"), train_size=24, test_size=8)


def generate(tiny, out, **kw):
    cfg = dict(
        model=tiny["llama"],
        source=tiny["train"],
        prompt_field="prompt",
        out=str(out),
        max_new_tokens=10,
        samples_per_prompt=2,
        batch_size=8,
        progress=False,
    )
    return gen.run(gen.GenerateConfig(**{**cfg, **kw}))


def rows(path):
    return [json.loads(l) for l in open(path)]


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(tiny, tmp_path):
    generate(tiny, tmp_path / "a.jsonl", seed=3)
    generate(tiny, tmp_path / "b.jsonl", seed=3)
    generate(tiny, tmp_path / "c.jsonl", seed=4)
    a, b, c = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl"), rows(tmp_path / "c.jsonl")
    assert len(a) == 48 and a == b and [r["response_token_ids"] for r in a] != [r["response_token_ids"] for r in c]
    r = a[0]
    assert {"prompt", "response", "answer", "behavior_logprobs", "generator", "sampling", "round"} <= r.keys()
    assert len(r["behavior_logprobs"]) == len(r["response_token_ids"]) <= 10
    assert r["sampling"]["seed"] == 3 and r["generator"]["weights_fingerprint"]


def test_sampler_log_probs_are_the_models_own(tiny, tmp_path):
    """Plain sampling at temperature 1: the behavior log-prob of each token is the student's log q(y_t)."""
    generate(tiny, tmp_path / "g.jsonl", samples_per_prompt=1, limit=4)
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"]).eval()
    from pipeline import data as data_module
    from pipeline import models

    tok = models.load_tokenizer(tiny["llama"])
    for r in rows(tmp_path / "g.jsonl"):
        p = data_module.encode_instructions(tok, [r["prompt"]], [""])[0][0]
        ids = torch.tensor([p + r["response_token_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1, : len(tok)], -1)
        want = lp.gather(1, torch.tensor(r["response_token_ids"])[:, None])[:, 0]
        np.testing.assert_allclose(r["behavior_logprobs"], want.numpy(), atol=1e-4)


def test_teacher_mixed_sampling_records_both_log_probs(tiny, tmp_path):
    generate(tiny, tmp_path / "m.jsonl", teacher=tiny["llama"], alpha=0.3, limit=3)
    for r in rows(tmp_path / "m.jsonl"):
        # the same model on both sides: the mixture is that model, so all three log-probs agree
        np.testing.assert_allclose(r["teacher_logprobs"], r["student_logprobs"], atol=1e-5)
        np.testing.assert_allclose(r["behavior_logprobs"], r["student_logprobs"], atol=1e-5)


def test_cache_of_generations_scores_exactly_the_sampled_tokens(tiny, tmp_path):
    """cache-teacher on generated rows: the distilled tokens are the sampled ids (not a re-tokenization of the text),
    target_logprob is the teacher's log-prob of each (recomputed here), behavior_logprob comes along, and the
    manifest records the generating model."""
    generate(tiny, tmp_path / "g.jsonl")
    data = DataConfig(
        str(tmp_path / "g.jsonl"),
        prompt_field="prompt",
        response_field="response",
        response_ids_field="response_token_ids",
        behavior_field="behavior_logprobs",
    )
    m = ct.run(
        ct.CacheTeacherConfig(
            teacher=tiny["gpt2"], data=data, out=str(tmp_path / "c"), top_k=4, logprob_dtype="float32", progress=False
        )
    )["manifest"]
    assert m["identity"]["dataset"]["generated_by"][0]["model"] == tiny["llama"]
    storage.verify(tmp_path / "c")
    cache = storage.open_cache(tmp_path / "c")
    teacher = AutoModelForCausalLM.from_pretrained(tiny["gpt2"]).eval()
    vocab = m["vocab_size"]
    generated = rows(tmp_path / "g.jsonl")
    for i in (0, 5, 17):
        s, r = cache[i], generated[i]
        response = s["input_ids"][s["loss_mask"] == 1]
        np.testing.assert_array_equal(response, r["response_token_ids"])
        np.testing.assert_allclose(s["behavior_logprob"], r["behavior_logprobs"], atol=1e-6)
        with torch.no_grad():
            lp = torch.log_softmax(
                teacher(torch.as_tensor(s["input_ids"].astype(np.int64))[None]).logits[0, :, :vocab], -1
            )
        j = np.nonzero(s["loss_mask"])[0]
        np.testing.assert_allclose(s["target_logprob"], lp[j - 1, response].numpy(), atol=1e-5)


def test_policy_gradient_and_mixed_caches_train(tiny, tmp_path):
    generate(tiny, tmp_path / "g.jsonl")
    data = DataConfig(
        str(tmp_path / "g.jsonl"),
        prompt_field="prompt",
        response_field="response",
        response_ids_field="response_token_ids",
        behavior_field="behavior_logprobs",
    )
    ct.run(ct.CacheTeacherConfig(teacher=tiny["gpt2"], data=data, out=str(tmp_path / "on"), top_k=4, progress=False))
    ct.run(
        ct.CacheTeacherConfig(
            teacher=tiny["gpt2"],
            data=DataConfig(tiny["train"], prompt_field="prompt", response_field="response"),
            out=str(tmp_path / "off"),
            top_k=4,
            progress=False,
        )
    )
    base = dict(
        student=tiny["llama"],
        max_steps=4,
        batch_size=4,
        lr=1e-3,
        progress=False,
        log_every=1,
        allow_tokenizer_mismatch=True,
    )
    s = tr.run(TrainConfig.of(out=str(tmp_path / "pg"), loss="pg", cache=str(tmp_path / "on"), **base))
    assert s["nonfinite"] == 0
    metrics = [json.loads(l) for l in open(tmp_path / "pg/metrics.jsonl")]
    assert all(np.isfinite(m["rkl_estimate"]) for m in metrics)
    s = tr.run(
        TrainConfig.of(
            out=str(tmp_path / "mix"),
            loss="akl",
            cache=(str(tmp_path / "off"), str(tmp_path / "on")),
            mix=(0.5,),
            **base,
        )
    )
    assert s["steps"] == 4
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--student",
            tiny["llama"],
            "--cache",
            str(tmp_path / "off"),
            "--cache",
            str(tmp_path / "on"),
            "--out",
            str(tmp_path / "bad"),
            "--allow-tokenizer-mismatch",
        ],
    )
    assert res.exit_code == 1 and "need --mix" in res.output
