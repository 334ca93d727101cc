import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import build, free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

import storage
from pipeline.cli import main
from pipeline.config import DataConfig, ModelConfig
from stages import cache_teacher as ct

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny"))


def instruction(paths, **kw):
    return DataConfig(paths["train"], prompt_field="prompt", response_field="response", **kw)


def run(paths, out, arch="gpt2", data=None, **kw):
    cfg = ct.CacheTeacherConfig(
        teacher=paths[arch],
        data=data or instruction(paths),
        out=None if out is None else str(out),
        top_k=kw.pop("top_k", 5),
        part_size=kw.pop("part_size", 16),
        progress=False,
        **kw,
    )
    return ct.run(cfg)


def recompute(paths, arch, sample, temperature):
    model = AutoModelForCausalLM.from_pretrained(paths[arch], dtype=torch.float32).eval()
    ids = torch.as_tensor(sample["input_ids"].astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    vocab = len(AutoTokenizer.from_pretrained(paths[arch]))
    j = np.nonzero(sample["loss_mask"])[0]
    logp = torch.log_softmax(logits[j - 1, :vocab] / temperature, -1)
    return logp


# -- stored values equal an independent recomputation from the teacher's full logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["instruction", "plain"])
def test_stored_values_equal_recomputation(tiny, tmp_path, arch, kind):
    data = instruction(tiny) if kind == "instruction" else DataConfig(tiny["plain"], text_field="text")
    result = run(
        tiny, tmp_path / "c", arch, data, temperatures=(1.0, 2.0), top_p=1, tail_draws=0, logprob_dtype="float32"
    )
    assert result["status"] == "complete"
    cache = storage.open_cache(tmp_path / "c")
    storage.verify(tmp_path / "c")
    for t in (1.0, 2.0):
        c = cache.at_temperature(t)
        for i in (0, 7, len(c) - 1):
            s = c[i]
            logp = recompute(tiny, arch, s, t)
            lp, ids = logp.topk(5, -1)
            np.testing.assert_array_equal(s["topk_ids"], ids.numpy())
            np.testing.assert_allclose(s["topk_logprobs"], lp.numpy(), atol=1e-5)
            tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1)
            np.testing.assert_allclose(s["tail_logmass"], tail.numpy(), atol=1e-5)


def test_instruction_masks_only_the_response_with_eos(tiny, tmp_path):
    run(tiny, tmp_path / "c")
    s = storage.open_cache(tmp_path / "c")[0]
    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    row = json.loads(open(tiny["train"]).readline())
    distilled = s["input_ids"][s["loss_mask"] == 1]
    assert distilled[-1] == tok.eos_token_id
    assert tok.decode(distilled[:-1]).strip() == row["response"]
    assert tok.decode(s["input_ids"][s["loss_mask"] == 0]).endswith("### Response:\n")


def test_plain_text_distills_every_token_after_the_first(tiny, tmp_path):
    run(tiny, tmp_path / "c", data=DataConfig(tiny["plain"], text_field="text"))
    s = storage.open_cache(tmp_path / "c")[3]
    assert s["loss_mask"][0] == 0 and s["loss_mask"][1:].all()


def test_truncation_is_counted(tiny, tmp_path):
    result = run(tiny, tmp_path / "c", data=instruction(tiny, max_length=24))
    assert result["manifest"]["counts"]["truncated_samples"] > 0
    assert max(len(s["input_ids"]) for s in storage.open_cache(tmp_path / "c").stream()) == 24


def test_token_budget_batches_equal_fixed_batches(tiny, tmp_path):
    run(tiny, tmp_path / "a", batch_size=3)
    run(tiny, tmp_path / "b", batch_tokens=200)
    a, b = storage.open_cache(tmp_path / "a"), storage.open_cache(tmp_path / "b")
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["topk_ids"], b[i]["topk_ids"])
        np.testing.assert_allclose(a[i]["tail_logmass"], b[i]["tail_logmass"], atol=1e-5)


def test_the_heads_chunks_and_the_rows_cpu_slices_change_nothing(tiny, tmp_path, monkeypatch):
    """The lm_head over chunks of positions (chunk_bytes) and the rows computed in slices of a chunk (on CPU,
    CPU_SLICE_BYTES): a cache in the default encoding (top-p rows, tail draws) with a sketch is the same whether a
    batch is one chunk of one slice or many of each."""
    plain = dict(top_k=None, sketch_rank=4, part_size=8, batch_size=8)
    run(tiny, tmp_path / "whole", **plain)
    vocab = len(AutoTokenizer.from_pretrained(tiny["gpt2"]))
    monkeypatch.setattr(ct, "CPU_SLICE_BYTES", 4 * vocab * 3)  # slices of 3 positions
    run(tiny, tmp_path / "sliced", **plain, chunk_bytes=4 * vocab * 2 * 7)  # chunks of 7
    a, b = storage.open_cache(tmp_path / "whole"), storage.open_cache(tmp_path / "sliced")
    assert len(a) == len(b) > 8
    for i in range(len(a)):
        x, y = by_id(a[i]), by_id(b[i])  # two log-probs equal to rounding may leave the sort in either order
        for key in ("topk_ids", "drawn_ids", "sketch_coeffs", "topk_logprobs", "drawn_logprobs", "tail_logmass"):
            np.testing.assert_allclose(x[key], y[key], atol=1e-5, err_msg=key)


def by_id(sample: dict) -> dict:
    """The sample with each position's top-k entries in id order instead of log-prob order."""
    order = np.argsort(sample["topk_ids"], axis=-1, kind="stable")
    return sample | {k: np.take_along_axis(sample[k], order, -1) for k in ("topk_ids", "topk_logprobs")}


# -- many writers, resume, reuse


def test_shards_merge_into_the_single_process_cache(tiny, tmp_path):
    ref = run(tiny, tmp_path / "one", part_size=8)["manifest"]
    first = run(tiny, tmp_path / "many", part_size=8, shard=(1, 3))
    assert first["status"] == "partial" and not (tmp_path / "many/manifest.json").exists()
    run(tiny, tmp_path / "many", part_size=8, shard=(0, 3))
    merged = run(tiny, tmp_path / "many", part_size=8, shard=(2, 3))["manifest"]
    assert merged["parts"] == ref["parts"] and merged["counts"] == ref["counts"]


def test_same_inputs_are_a_cache_hit(tiny, tmp_path):
    run(tiny, tmp_path / "c")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "c/parts").rglob("*")}
    res = CliRunner().invoke(
        main,
        [
            "cache-teacher",
            "--teacher",
            tiny["gpt2"],
            "--data",
            tiny["train"],
            "--prompt-field",
            "prompt",
            "--response-field",
            "response",
            "--top-k",
            "5",
            "--part-size",
            "16",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert res.exit_code == 0 and res.output.startswith("cache hit"), res.output
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "c/parts").rglob("*")}


def test_cache_root_names_the_cache_by_key(tiny, tmp_path):
    cfg = ct.CacheTeacherConfig(
        teacher=tiny["gpt2"], data=instruction(tiny), cache_root=str(tmp_path), top_k=5, progress=False
    )
    first, second = ct.run(cfg), ct.run(cfg)
    assert first["status"] == "complete" and second["status"] == "hit" and first["path"] == second["path"]
    assert Path(first["path"]).name == first["manifest"]["cache_key"][:16]


def test_another_teacher_at_the_same_path_is_refused(tiny, tmp_path):
    run(tiny, tmp_path / "c")
    key = json.loads((tmp_path / "c/manifest.json").read_text())["cache_key"]
    with pytest.raises(storage.CacheMismatch, match="identity.teacher"):
        run(tiny, tmp_path / "c", "llama")
    assert json.loads((tmp_path / "c/manifest.json").read_text())["cache_key"] == key
    assert run(tiny, tmp_path / "c", "llama", overwrite=True)["status"] == "complete"


def one_sample_parts_command(tiny, out):
    """cache-teacher as a process: the Llama teacher, top-5, parts of 2 samples computed one sample at a time."""
    return [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--teacher", tiny["llama"], "--data", tiny["train"],
            "--prompt-field", "prompt", "--response-field", "response", "--top-k", "5", "--part-size", "2",
            "--batch-size", "1", "--out", str(out)]  # fmt: skip


def test_sigkill_then_resume_computes_only_missing_parts(tiny, tmp_path):
    args = one_sample_parts_command(tiny, tmp_path / "c")
    ref = run(tiny, tmp_path / "ref", "llama", part_size=2, batch_size=1)["manifest"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "c/parts"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("part-*"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in parts.glob("part-*"))
    assert 3 <= len(done) < ref["num_parts"], done
    with pytest.raises(storage.IncompleteCache, match="incomplete"):
        storage.verify(tmp_path / "c")
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"wrote {ref['num_parts'] - len(done)} parts" in out
    assert storage.verify(tmp_path / "c")["parts"] == ref["parts"]


# -- bad input: one line, non-zero exit, nothing visible written


def cli(tiny, out, *extra, teacher=None, data=None):
    args = ["cache-teacher", "--teacher", teacher or tiny["gpt2"], "--data", data or tiny["train"], "--out", str(out)]
    if "--text-field" not in extra:
        args += ["--prompt-field", "prompt", "--response-field", "response"]
    return CliRunner().invoke(main, args + list(extra))


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing-teacher", "model path"),
        ("missing-field", "column 'question' not in"),
        ("empty", "is empty"),
        ("malformed", "cannot read dataset"),
        ("k-too-large", "--top-k 100000 must lie between 1 and the vocabulary size"),
        ("tokenizer-too-big", "tokenizer has"),
        ("unknown-text-end", "--text-end '<|nope|>' is not a token of the tokenizer"),
    ],
)
def test_bad_input_is_one_line(tiny, tmp_path, case, expect):
    out = tmp_path / "c"
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("")
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response\n')
    if case == "missing-teacher":
        res = cli(tiny, out, teacher=str(tmp_path / "nope"))
    elif case == "unknown-text-end":
        res = cli(tiny, out, "--text-field", "text", "--text-end", "<|nope|>", data=tiny["plain"])
    elif case == "missing-field":
        res = CliRunner().invoke(
            main,
            [
                "cache-teacher",
                "--teacher",
                tiny["gpt2"],
                "--data",
                tiny["train"],
                "--out",
                str(out),
                "--prompt-field",
                "question",
                "--response-field",
                "response",
            ],
        )
    elif case == "empty":
        res = cli(tiny, out, data=str(empty))
    elif case == "malformed":
        res = cli(tiny, out, data=str(bad))
    elif case == "k-too-large":
        res = cli(tiny, out, "--top-k", "100000")
    else:
        from stages import prepare_demo

        small = prepare_demo.save_model(
            ModelConfig(tmp_path / "small", tiny["tokenizer"], "gpt2", 1, 16, 2), vocab_size=50
        )
        res = cli(tiny, out, teacher=small)
    assert res.exit_code != 0
    lines = [l for l in res.output.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], res.output
    assert not (out / "manifest.json").exists() and not list(out.glob("parts/part-*"))


def test_non_finite_logits_skip_the_sample_or_abort_when_strict(tiny, tmp_path):
    """A NaN input embedding (untied Llama, so the lm_head stays finite) poisons exactly the samples using that
    token."""
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    poison = tok("reverse", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("nan")
    model.save_pretrained(tmp_path / "bad")
    tok.save_pretrained(tmp_path / "bad")
    paths = {**tiny, "bad": str(tmp_path / "bad")}
    from pipeline.data import tokenized

    n_poisoned = sum(poison in ids for ids in tokenized(instruction(tiny), tok)[:]["input_ids"])
    assert 0 < n_poisoned < 48
    with pytest.warns(UserWarning, match="non-finite teacher logits"):
        m = run(paths, tmp_path / "c", "bad")["manifest"]
    assert m["counts"]["skipped_samples"] == n_poisoned
    storage.verify(tmp_path / "c")
    with pytest.raises(ct.NonFiniteLogits):
        run(paths, tmp_path / "d", "bad", strict=True)


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_masks_the_assistant_turn(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    tok.chat_template = CHAT
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    model.save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    m = run({**tiny, "chat": str(tmp_path / "chat")}, tmp_path / "c", "chat")["manifest"]
    assert m["identity"]["dataset"]["template"] == "chat-template"
    s = storage.open_cache(tmp_path / "c")[0]
    row = json.loads(open(tiny["train"]).readline())
    distilled = s["input_ids"][s["loss_mask"] == 1]
    assert distilled[-1] == tok.eos_token_id and (distilled == tok.eos_token_id).sum() == 1
    assert tok.decode(distilled, skip_special_tokens=True) == row["response"]
    assert tok.decode(s["input_ids"][s["loss_mask"] == 0]).endswith("<|assistant|>")


@pytest.mark.distributed
def test_torchrun_ranks_take_their_shards_and_merge_to_one_run(tiny, tmp_path):
    ref = run(tiny, tmp_path / "one", part_size=8)["manifest"]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "pipeline.cli",
            "cache-teacher",
            "--teacher",
            tiny["gpt2"],
            "--data",
            tiny["train"],
            "--prompt-field",
            "prompt",
            "--response-field",
            "response",
            "--top-k",
            "5",
            "--part-size",
            "8",
            "--out",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert storage.verify(tmp_path / "two")["parts"] == ref["parts"]


# -- compact encodings, target log-probs and tail draws, against the teacher's full distribution


def test_compact_encoding_keeps_exact_prefixes_tails_and_targets(tiny, tmp_path):
    """--top-p rows are prefixes of the exact top-k with the exact tail of what was kept; the target log-prob is
    the teacher's own, in the top-k or not; drawn tokens lie in the tail; the 8-bit decode error is recorded.
    (This untrained teacher is near uniform, p ≈ 1/367 per token, hence a top-p of 2 %.)"""
    run(tiny, tmp_path / "c", "llama", top_k=12, top_p=0.02, min_k=1, ids="bitpack", logprob_dtype="q8", tail_draws=16)
    storage.verify(tmp_path / "c")
    stats = storage.statistics(tmp_path / "c")
    assert 1 <= stats["mean_width"] < 12 and 0 < stats["decode_kl_mean"] < 1e-3
    cache = storage.open_cache(tmp_path / "c")
    outside = 0
    for i in (0, 5, len(cache) - 1):
        s = cache[i]
        logp = recompute(tiny, "llama", s, 1.0)
        targets = torch.as_tensor(s["input_ids"][s["loss_mask"] == 1].astype(np.int64))
        np.testing.assert_allclose(s["target_logprob"], logp.gather(1, targets[:, None])[:, 0].numpy(), atol=2e-3)
        order = logp.argsort(-1, descending=True)
        for r in range(len(targets)):
            w = int((s["topk_ids"][r] >= 0).sum())
            np.testing.assert_array_equal(s["topk_ids"][r, :w], order[r, :w].numpy())
            mass = logp[r].exp()[order[r, :w]].sum()
            assert float(mass) >= 0.02 or w == 12
            np.testing.assert_allclose(np.exp(s["tail_logmass"][r]), 1 - float(mass), atol=1e-5)
            np.testing.assert_allclose(
                np.exp(s["topk_logprobs"][r, :w]), logp[r].exp()[order[r, :w]].numpy(), rtol=0.05, atol=1e-4
            )
            drawn = s["drawn_ids"][r][s["drawn_ids"][r] >= 0]
            assert len(drawn) and not set(drawn) & set(order[r, :w].tolist())
            outside += int(targets[r] not in set(order[r, :w].tolist()))
    assert outside > 0, "some targets lie outside the kept rows"


def test_tokenized_data_is_one_shared_copy_with_a_content_fingerprint(tiny, tmp_path):
    from pipeline.data import content_sha256, tokenized

    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    data = tmp_path / "d.jsonl"
    data.write_text(open(tiny["train"]).read())
    cfg = instruction({"train": str(data)})
    one, again, two = tokenized(cfg, tok), tokenized(cfg, tok), tokenized(cfg, tok, num_proc=2)
    assert one.cache_files == again.cache_files  # reused, not recomputed
    assert content_sha256(one) == content_sha256(two)  # workers split the map, not the content
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1] + [lines[-1].replace("the", "a")]) + "\n")
    assert content_sha256(tokenized(cfg, tok)) != content_sha256(one)


# -- a teacher across processes or devices equals the single-device cache


@pytest.mark.distributed
def test_tensor_parallel_teacher_equals_the_single_process_cache(tiny, tmp_path):
    """torchrun with 2 gloo ranks, --tp 2: one TP group (4 heads, 2 KV heads) writes the cache."""
    from stages import prepare_demo

    teacher = prepare_demo.save_model(ModelConfig(tmp_path / "llama4", tiny["tokenizer"], "llama", 2, 32, 4))
    paths = {**tiny, "llama4": teacher}
    run(paths, tmp_path / "one", "llama4", part_size=16, logprob_dtype="float32")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "pipeline.cli",
            "cache-teacher",
            "--teacher",
            teacher,
            "--data",
            tiny["train"],
            "--prompt-field",
            "prompt",
            "--response-field",
            "response",
            "--top-k",
            "5",
            "--part-size",
            "16",
            "--logprob-dtype",
            "float32",
            "--tp",
            "2",
            "--out",
            str(tmp_path / "tp"),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert_same_cache(tmp_path / "one", tmp_path / "tp")


def test_device_map_teacher_equals_the_single_device_cache(tiny, tmp_path):
    run(tiny, tmp_path / "one", "llama", logprob_dtype="float32")
    run(tiny, tmp_path / "map", "llama", logprob_dtype="float32", device_map="auto", max_memory="cpu=2GiB")
    assert_same_cache(tmp_path / "one", tmp_path / "map")


def assert_same_cache(a, b):
    a, b = storage.open_cache(a), storage.open_cache(b)
    assert len(a) == len(b) and a.manifest["cache_key"] == b.manifest["cache_key"]
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["topk_ids"], b[i]["topk_ids"])
        for key in ("topk_logprobs", "tail_logmass", "target_logprob"):
            np.testing.assert_allclose(a[i][key], b[i][key], atol=1e-5, err_msg=key)


@pytest.mark.parametrize(
    "arch,expect",
    [("gpt2", "has no tensor-parallel plan"), ("llama", "--tp 2 does not divide the teacher's 1 key/value heads")],
)
def test_unsupported_tensor_parallel_teachers_are_one_line_errors(tiny, tmp_path, monkeypatch, arch, expect):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = cli(tiny, tmp_path / "c", "--tp", "2", teacher=tiny[arch])
    assert res.exit_code == 1 and expect in res.output and res.output.count("error:") == 1, res.output


def test_tp_groups_split_the_shards():
    from pipeline.parallel import TeacherGroup

    cfg = ct.CacheTeacherConfig(teacher="t", data=None, out="o", shard=(1, 3))
    assert ct.shard_of(cfg, TeacherGroup(2, 1, 4, 0, [2, 3])) == (5, 12)
    assert ct.shard_of(ct.CacheTeacherConfig(teacher="t", data=None, out="o"), TeacherGroup(2, 3, 4, 1, [6, 7])) == (
        3,
        4,
    )


# -- integrity: what the README recommends verifies, draws do not depend on batching, two runs on one --out agree

TOP_K_ROWS = {"top_p": 1, "tail_draws": 0, "ids": "plain", "logprob_dtype": "float16"}  # the default before 0.2
README_ENCODINGS = {  # as the README's flags state them: what is not named is the default's
    "default: top-p .5 + 16 draws q8": {},
    "top-k 64 fp16 (default before 0.2)": {**TOP_K_ROWS, "top_k": 64},
    "top-p .95 q8 bitpack": {"top_k": 64, "top_p": 0.95, "tail_draws": 0},
    "RS-KD 32 draws": {"top_p": 0.0, "min_k": 0, "tail_draws": 32, "logprob_dtype": "float16"},
    "top-k 16": {**TOP_K_ROWS, "top_k": 16},
    "default + sketch 32": {"sketch_rank": 32},
}


@pytest.mark.parametrize("name", README_ENCODINGS)
def test_every_encoding_the_readme_names_writes_a_cache_that_verifies(tiny, tmp_path, name):
    """RS-KD rows hold no head, so their tail is all the mass: log 1, which float32 rounding put a hair above 0."""
    cfg = ct.CacheTeacherConfig(
        teacher=tiny["llama"], data=instruction(tiny), out=str(tmp_path / "c"), part_size=16, progress=False,
        **README_ENCODINGS[name],
    )  # fmt: skip
    ct.run(cfg)
    enc = storage.verify(tmp_path / "c")["encoding"]
    assert enc["top_p"] == cfg.top_p and bool(enc["draws"]) == bool(cfg.tail_draws)
    assert enc["top_k"] == cfg.width(len(AutoTokenizer.from_pretrained(tiny["llama"])))


def test_the_default_encoding_is_the_all_loss_point_and_top_p_one_means_rows_of_top_k(tiny, tmp_path):
    default = run(tiny, tmp_path / "d", "llama", top_k=None)["manifest"]["encoding"]
    assert default["top_p"] == 0.5 and default["draws"] == {"n": 16, "values": "logprobs"}
    assert default["ids"]["codec"] == "bitpack" and default["logprobs"]["name"] == "q8" and default["min_k"] == 1
    assert default["top_k"] == min(1024, len(AutoTokenizer.from_pretrained(tiny["llama"])))
    rows = run(tiny, tmp_path / "k", "llama", top_k=8, top_p=1, tail_draws=0)["manifest"]["encoding"]
    assert rows["top_p"] is None and rows["top_k"] == 8 and rows["draws"] is None
    assert all(len(s["topk_ids"][0]) == 8 for s in storage.open_cache(tmp_path / "k").stream())


def test_a_cache_of_the_previous_default_is_resumed_and_hit_with_its_encoding(tiny, tmp_path):
    """A command that states no encoding option, rerun after the default changed, finishes (or hits) the cache it
    started, with that cache's encoding, and says so; a command that states one is refused as before."""
    old = {**TOP_K_ROWS, "top_p": None}
    ref = run(tiny, tmp_path / "ref", "llama", top_k=None, part_size=8, **old)["manifest"]
    assert ref["encoding"]["top_k"] == 64 and ref["encoding"]["top_p"] is None
    run(tiny, tmp_path / "c", "llama", top_k=None, part_size=8, shard=(1, 3), **old)
    with pytest.warns(UserWarning, match="default encoding before 0.2"):
        res = run(tiny, tmp_path / "c", "llama", top_k=None, part_size=8)
    assert res["status"] == "complete" and res["manifest"]["parts"] == ref["parts"]
    with pytest.warns(UserWarning, match="keeps that encoding"):
        assert run(tiny, tmp_path / "c", "llama", top_k=None, part_size=8)["status"] == "hit"
    with pytest.raises(storage.CacheMismatch, match="encoding"):
        run(tiny, tmp_path / "c", "llama", top_k=None, part_size=8, tail_draws=8)
    rooted = dict(cache_root=str(tmp_path / "root"), top_k=None, part_size=8)
    first = run(tiny, None, "llama", **rooted, **old)
    with pytest.warns(UserWarning, match="before 0.2"):
        again = run(tiny, None, "llama", **rooted)
    assert again["status"] == "hit" and again["path"] == first["path"]


def test_a_cache_of_the_default_of_0_2_to_0_3_resumes_with_its_24_draws_beside_the_options_stated(tiny, tmp_path):
    """The default's draws went from 24 to 16 in 0.4: a command that states other options (a sketch) but not the
    draws finishes and hits the cache it started under 0.3, with its 24 draws; stating other draws is refused, and
    --overwrite writes today's encoding."""
    old = dict(top_k=None, part_size=8, sketch_rank=8, sketch_positions=64)
    ref = run(tiny, tmp_path / "ref", "llama", tail_draws=24, **old)["manifest"]
    assert ref["encoding"]["draws"]["n"] == 24
    run(tiny, tmp_path / "c", "llama", tail_draws=24, shard=(1, 3), **old)
    with pytest.warns(UserWarning, match="default encoding 0.2–0.3 .* --tail-draws 16"):
        res = run(tiny, tmp_path / "c", "llama", **old)
    assert res["status"] == "complete" and res["manifest"]["parts"] == ref["parts"]
    assert res["manifest"]["cache_key"] == ref["cache_key"]
    with pytest.warns(UserWarning, match="keeps that encoding"):
        assert run(tiny, tmp_path / "c", "llama", **old)["status"] == "hit"
    with pytest.raises(storage.CacheMismatch, match="encoding"):
        run(tiny, tmp_path / "c", "llama", tail_draws=20, **old)
    replaced = run(tiny, tmp_path / "c", "llama", overwrite=True, **old)["manifest"]  # --overwrite: today's encoding
    assert replaced["encoding"]["draws"]["n"] == 16


def test_a_default_value_stated_on_the_command_line_is_not_left_to_an_earlier_default(tiny, tmp_path):
    """`--tail-draws 16` asks for 16 draws even though 16 is today's default: at an --out holding a 0.3 cache of 24
    draws, the command is refused in one line instead of resuming that cache; left unstated, it resumes it."""
    run(tiny, tmp_path / "c", "gpt2", top_k=None, tail_draws=24, shard=(1, 3))
    stated = cli(tiny, tmp_path / "c", "--part-size", "16", "--tail-draws", "16")
    assert stated.exit_code == 1 and "encoding" in stated.output and len(stated.output.strip().splitlines()) == 1
    with pytest.warns(UserWarning, match="default encoding 0.2–0.3"):
        unstated = cli(tiny, tmp_path / "c", "--part-size", "16")
    assert unstated.exit_code == 0, unstated.output
    assert storage.open_cache(tmp_path / "c").encoding["draws"]["n"] == 24


def test_an_earlier_default_that_makes_no_encoding_beside_the_options_stated_is_passed_over(tiny, tmp_path):
    """RS-KD at the default draws: before 0.2 the same command would have drawn none, which is no encoding."""
    res = run(tiny, tmp_path / "c", "llama", top_k=8, top_p=0.0, min_k=0)
    assert res["status"] == "complete" and res["manifest"]["encoding"]["draws"]["n"] == 16


def test_tail_draws_do_not_depend_on_the_batch_that_computes_them(tiny, tmp_path):
    """Another --batch-size (as when a run is resumed with one) pads differently, which moves the logits by float
    rounding only; the tokens drawn for each sample stay the same, so the cache key still means one content."""
    enc = dict(top_k=8, top_p=0.02, tail_draws=16, part_size=16)
    assert (
        run(tiny, tmp_path / "a", "llama", batch_size=1, **enc)["manifest"]["cache_key"]
        == run(tiny, tmp_path / "b", "llama", batch_size=7, **enc)["manifest"]["cache_key"]
    )
    a, b = storage.open_cache(tmp_path / "a"), storage.open_cache(tmp_path / "b")
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["drawn_ids"], b[i]["drawn_ids"])
        np.testing.assert_allclose(a[i]["drawn_logprobs"], b[i]["drawn_logprobs"], atol=1e-5)


def hidden_and_logits(paths, arch, sample):
    model = AutoModelForCausalLM.from_pretrained(paths[arch], dtype=torch.float32).eval()
    ids = torch.as_tensor(sample["input_ids"].astype(np.int64))[None]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    j = np.nonzero(sample["loss_mask"])[0] - 1
    vocab = len(AutoTokenizer.from_pretrained(paths[arch]))
    return out.hidden_states[-1][0, j].float(), out.logits[0, j, :vocab].float()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_draws_and_the_teacher_sketch_equal_recomputation(tiny, tmp_path, arch):
    """Each drawn token's stored log-prob is the teacher's; the sketch's basis turns each position's stored
    coefficients into the teacher's logits up to the rank's and the codes' rounding (exactly at full rank)."""
    enc = dict(top_p=0.5, tail_draws=8, logprob_dtype="float32", sketch_rank=32, sketch_bits=8, sketch_positions=64)
    run(tiny, tmp_path / "c", arch, **enc)
    storage.verify(tmp_path / "c")
    cache = storage.open_cache(tmp_path / "c")
    basis = cache.sketch()["basis"]
    for i in (0, len(cache) - 1):
        s = cache[i]
        logp = recompute(tiny, arch, s, 1.0)
        d = s["drawn_ids"]
        want = np.where(d >= 0, np.take_along_axis(logp.numpy(), np.maximum(d, 0), 1), -np.inf)
        np.testing.assert_allclose(s["drawn_logprobs"], want, atol=1e-5)
        _, logits = hidden_and_logits(tiny, arch, s)
        approx = np.concatenate([np.ones((len(logits), 1)), s["sketch_coeffs"]], 1) @ basis
        err = np.abs(approx - logits.numpy()).max(1) / logits.numpy().std(1)
        assert err.max() < 0.05


def test_a_sketch_rank_above_the_teachers_hidden_size_is_refused_before_anything_is_written(tiny, tmp_path):
    with pytest.raises(ct.InputError, match="--sketch-rank 33 exceeds the teacher's hidden size 32; use at most 32"):
        run(tiny, tmp_path / "c", "llama", tail_draws=4, sketch_rank=33)
    assert not (tmp_path / "c").exists()


def test_a_sharded_run_fits_the_sketch_once_and_every_shard_uses_it(tiny, tmp_path):
    enc = dict(top_p=0.5, tail_draws=4, sketch_rank=4, part_size=8, sketch_positions=32)
    ref = run(tiny, tmp_path / "one", "llama", **enc)["manifest"]
    run(tiny, tmp_path / "many", "llama", shard=(1, 2), **enc)
    merged = run(tiny, tmp_path / "many", "llama", shard=(0, 2), **enc)["manifest"]
    assert merged["parts"] == ref["parts"] and merged["sketch"] == ref["sketch"]
    storage.verify(tmp_path / "many")


def test_two_cache_teacher_runs_on_one_out_split_the_parts_and_both_complete(tiny, tmp_path):
    """Like two workflows sharing a --cache-root, or a requeued job whose old copy still runs: each part is written
    by one of them, neither clears the other's work, and both end with the whole cache."""
    ref = run(tiny, tmp_path / "ref", "llama", part_size=2, batch_size=1)["manifest"]
    args = one_sample_parts_command(tiny, tmp_path / "c")
    procs = [
        subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(o.startswith("complete") for o in outs), outs
    written = [int(re.search(r"wrote (\d+) parts", out).group(1)) for out in outs]
    assert sum(written) == ref["num_parts"] and min(written) > 0, outs
    assert storage.verify(tmp_path / "c")["parts"] == ref["parts"]


@pytest.mark.parametrize(
    "row,expect",
    [
        ({"prompt": None, "response": "a"}, "row 1: field 'prompt' is None (NoneType), not text"),
        ({"prompt": 123, "response": "a"}, "row 1: field 'prompt' is 123 (int), not text"),
        ({"prompt": "a", "response": "b", "ids": [1, 100000], "lp": [-1.0, -1.0]}, "token id 100000, outside"),
        ({"prompt": "a", "response": "b", "ids": [1, -3], "lp": [-1.0, -1.0]}, "token id -3, outside"),
        ({"prompt": "a", "response": "b", "ids": [1, 2], "lp": [-1.0, float("nan")]}, "NaN, infinite or above 0"),
        ({"prompt": "a", "response": "b", "ids": [1, 2], "lp": [-1.0, 0.5]}, "NaN, infinite or above 0"),
    ],
)
def test_bad_rows_are_refused_naming_the_row(tiny, tmp_path, row, expect):
    good = {"prompt": "a", "response": "b", **({"ids": [1, 2], "lp": [-1.0, -1.0]} if "ids" in row else {})}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    extra = ["--response-ids-field", "ids", "--behavior-field", "lp"] if "ids" in row else []
    res = cli(tiny, tmp_path / "c", *extra, data=str(data))
    assert res.exit_code == 1 and expect in res.output, res.output


def test_a_cache_borrows_another_caches_sketch_of_the_same_teacher_only(tiny, tmp_path):
    """On-policy rounds mixed with the fixed data's cache need its sketch: --sketch-from copies it (one sketch, so the
    caches mix), and refuses a cache of another teacher or rank in one line."""
    from pipeline import teachers

    enc = dict(top_p=0.5, tail_draws=4, sketch_rank=4, sketch_positions=32)
    run(tiny, tmp_path / "fixed", "llama", **enc)
    plain = DataConfig(tiny["plain"], text_field="text")
    run(tiny, tmp_path / "round", "llama", plain, sketch_from=str(tmp_path / "fixed"), **enc)
    a, b = storage.open_cache(tmp_path / "fixed"), storage.open_cache(tmp_path / "round")
    assert a.manifest["sketch"] == b.manifest["sketch"]
    teachers.cached([tmp_path / "fixed", tmp_path / "round"], (0.5,))  # one sketch: they mix
    with pytest.raises(Exception, match="mixed caches differ in their teacher sketch"):
        run(tiny, tmp_path / "own", "llama", plain, **enc)
        teachers.cached([tmp_path / "fixed", tmp_path / "own"], (0.5,))
    for arch, rank, expect in (("gpt2", 4, "another teacher"), ("llama", 8, "no sketch of rank 8")):
        with pytest.raises(ct.InputError, match=expect):
            run(tiny, tmp_path / f"bad-{arch}-{rank}", arch, plain, sketch_from=str(tmp_path / "fixed"),
                **{**enc, "sketch_rank": rank})  # fmt: skip


def test_a_cache_written_before_texts_were_recorded_is_resumed_and_hit_with_its_encoding(tiny, tmp_path):
    """A run interrupted under 0.2 (whose caches record no text, and whose encoding has no `text` entry) is finished
    by this version with that encoding, with a warning, never refused or restarted; the finished cache hits."""
    from storage import part as part_io

    ref = run(tiny, tmp_path / "ref", "llama", part_size=8)["manifest"]
    assert ref["encoding"]["text"]
    plan = json.loads((tmp_path / "ref/plan.json").read_text())
    del plan["encoding"]["text"]
    plan["cache_key"] = storage.cache_key(plan)
    writer = storage.CacheWriter(tmp_path / "old", plan)  # as 0.2 wrote part 1, then was stopped
    decoded = storage.open_cache(tmp_path / "ref").decode(1, [0])
    samples = part_io.samples_for_encoding(decoded, [0], plan["k"], plan["encoding"]["draws"]["n"])
    writer.write_part(
        1, [{k: v for k, v in s.items() if k not in ("prompt_text", "text", "text_end")} for s in samples]
    )
    with pytest.warns(UserWarning, match="before caches recorded their text"):
        res = run(tiny, tmp_path / "old", "llama", part_size=8)
    assert res["status"] == "complete" and res["manifest"]["cache_key"] == plan["cache_key"]
    assert "text" not in res["manifest"]["encoding"] and res["parts_written"] == ref["num_parts"] - 1
    storage.verify(tmp_path / "old")
    with pytest.warns(UserWarning, match="keeps serving students of the teacher's tokenizer"):
        assert run(tiny, tmp_path / "old", "llama", part_size=8)["status"] == "hit"


def test_top_p_rows_sorted_narrow_first_equal_rows_sorted_at_full_width():
    """cache-teacher sorts a top-p row 64 wide first and wider only when its prefix needs it: the kept prefixes, their
    log-probs, the kept set's tail mass and the tail draws equal those of a sort at the full width (to float32
    rounding: the normalizer adds up head and tail apart), for peaked and flat rows."""
    from pipeline import teachers
    from storage import codecs

    torch.manual_seed(0)
    logits = torch.randn(40, 500) * torch.linspace(0.1, 8, 40)[:, None]  # flat rows (wide prefixes) to peaked ones
    targets = torch.randint(0, 500, (40,))
    cfg = ct.CacheTeacherConfig(teacher="unused", out="unused", top_k=400, top_p=0.9, temperatures=(1.0, 2.0))
    uniforms = torch.rand(2, 40, 24, dtype=torch.float64)
    got = ct.position_fields(cfg, logits, targets, uniforms)
    want = teachers.topk_rows(logits, 400, cfg.temperatures, targets)
    widths = codecs.top_p_widths(want["logprobs"][0].numpy(), 0.9, 1)
    assert np.array_equal(got["widths"], widths) and widths.max() > 64 and widths.min() < 64
    for t in range(2):
        a = codecs.truncate(got["topk_logprobs"][t], got["tail_logmass"][t], widths)
        b = codecs.truncate(want["logprobs"][t].numpy(), want["tail"][t].numpy(), widths)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=3e-7)  # the normalizer: head and tail summed apart
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
    keep = np.arange(400)[None, :] < widths[:, None]
    assert np.array_equal(got["topk_ids"][keep], want["ids"].numpy()[keep])
    np.testing.assert_allclose(got["target_logprob"], want["target"].numpy(), rtol=1e-6)
    want = teachers.topk_rows(logits, 400, cfg.temperatures, targets, weights=True)
    draws = teachers.draw_tail(logits, want, torch.from_numpy(widths), cfg.temperatures, uniforms)
    assert np.array_equal(got["draws"], draws.numpy())  # the same tail, drawn at the same uniforms


@pytest.mark.parametrize("vocab", [4096, 4099])
def test_the_blockwise_top_k_finds_the_values_of_a_full_sort(vocab):
    """teachers.topk looks for the k largest logits in the k blocks of largest maxima: the same sorted values as
    torch.topk over the whole row, ids that point at them, each once, also where many values tie (logits rounded to
    a coarse grid), a row is constant, the top lies in one block, or −inf fills most of a row; a NaN row stays in
    range. A vocabulary that 64 divides (blocks), and a prime one (a plain top-k)."""
    from pipeline import teachers

    torch.manual_seed(vocab)
    logits = torch.randn(40, vocab) * 3
    logits[:10] = (logits[:10] * 2).round() / 2  # many exact ties, across the k-th value too
    logits[10] = 1.5  # one value everywhere
    logits[11, 64:128] += 100  # the k largest all in one block
    logits[12, 8:] = float("-inf")
    logits[13, 5] = float("nan")
    for k in (1, 8, 16):
        vals, ids = teachers.topk(logits, k)
        want = logits.topk(k, dim=-1).values
        ok = torch.ones(40, dtype=torch.bool)
        ok[13] = False
        assert torch.equal(vals[ok], want[ok])
        assert torch.equal(logits.gather(1, ids)[ok], vals[ok])
        assert all(len(set(row.tolist())) == k for row in ids)
        assert ((ids >= 0) & (ids < vocab)).all()


def flat_inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The reference sampler: one float64 cumulative sum over the whole row."""
    cdf = w.double().cumsum(-1)
    total = cdf[:, -1:]
    draws = torch.searchsorted(cdf, u * total, right=True).clamp_max(w.shape[1] - 1)
    return torch.where(total > 0, draws, -1)


@pytest.mark.parametrize("vocab", [8, 97, 1000, 49152])
def test_the_two_level_inverse_cdf_draws_what_one_float64_cumulative_sum_draws(vocab):
    """Block sums, then one block's cumulative sum: the same token as the flat float64 inverse CDF except where a
    uniform falls within float32 rounding of a boundary (a few in 10⁴), never a token of zero weight, and −1 for a row
    of zeros. Vocabularies that 64 divides, a prime one, and one smaller than a block."""
    from pipeline import teachers

    torch.manual_seed(vocab)
    w = (torch.randn(64, vocab) * 3).exp()
    w[0] = 0  # no tail at all
    w[1, : vocab // 2] = 0  # whole blocks of zero weight
    w[2] = 0
    w[2, vocab - 1] = 1.0  # one token of weight, the last
    w[3, torch.randperm(vocab)[: vocab // 3]] = 0
    w[4, 0] = float("nan")  # non-finite logits (cache-teacher skips the sample): draws stay indices
    u = torch.rand(64, 200, dtype=torch.float64)
    u[:, 0], u[:, 1] = 0.0, 1 - 2**-53
    got, want = teachers.inverse_cdf(w, u), flat_inverse_cdf(w, u)
    assert (got[0] == -1).all() and (got[2] == vocab - 1).all() and ((got[4] >= -1) & (got[4] < vocab)).all()
    got, want, w = torch.cat([got[1:4], got[5:]]), torch.cat([want[1:4], want[5:]]), torch.cat([w[1:4], w[5:]])
    assert (got >= 0).all() and (w.gather(1, got) > 0).all()
    assert (got != want).float().mean() < 1e-3


def test_tail_draws_follow_the_tail_beyond_each_rows_width():
    """draw_tail draws from softmax(z / t) with each row's first `width` ids removed: the entries between the width
    and the top-k (removed from topk_rows' tail weights) come back, the −1 padding of rows sorted narrow changes
    nothing, and rows that keep every token draw −1."""
    from pipeline import teachers

    torch.manual_seed(0)
    logits = torch.randn(48, 8) * torch.linspace(0.5, 6, 48)[:, None]
    temps = (1.0, 2.0)
    rows = teachers.topk_rows(logits, 6, temps, weights=True)
    rows["ids"] = torch.nn.functional.pad(rows["ids"], (0, 2), value=-1)  # as cache-teacher pads narrow rows
    widths = torch.randint(0, 7, (48,))
    u = torch.rand(2, 48, 300, dtype=torch.float64)
    got = teachers.draw_tail(logits, rows, widths, temps, u)
    for j, t in enumerate(temps):
        p = torch.softmax(logits.double() / t, -1)
        for r in range(48):
            p[r, rows["ids"][r, : widths[r]]] = 0
        assert (got[j] != flat_inverse_cdf(p, u[j])).float().mean() < 1e-3
    whole = teachers.topk_rows(logits, 8, temps, weights=True)
    assert (teachers.draw_tail(logits, whole, torch.full((48,), 8), temps, u) == -1).all()
