"""The embedded default: procedurally generated instruction tasks with checkable answers, a tokenizer trained on
them, and tiny model configs. Everything offline."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

from pipeline.config import DemoDataConfig, ModelConfig

TASKS = ("add", "reverse", "sort", "count", "max")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def make_example(rng: random.Random) -> dict:
    task = rng.choice(TASKS)
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return {"task": task, "prompt": f"add {a} and {b}", "response": f"the sum is {a + b}", "answer": str(a + b)}
    letters = [rng.choice("abcdefghij") for _ in range(rng.randint(3, 7))]
    word = "".join(letters)
    if task == "reverse":
        out = word[::-1]
        return {
            "task": task,
            "prompt": f"reverse {' '.join(word)}",
            "response": f"reversed : {' '.join(out)}",
            "answer": out,
        }
    if task == "sort":
        out = "".join(sorted(word))
        return {
            "task": task,
            "prompt": f"sort {' '.join(word)}",
            "response": f"sorted : {' '.join(out)}",
            "answer": out,
        }
    if task == "count":
        c = rng.choice(letters)
        n = letters.count(c)
        return {
            "task": task,
            "prompt": f"count {c} in {' '.join(word)}",
            "response": f"{c} appears {n} times",
            "answer": str(n),
        }
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return {
        "task": task,
        "prompt": f"max of {' '.join(map(str, nums))}",
        "response": f"the max is {max(nums)}",
        "answer": str(max(nums)),
    }


def stdlib_chunks(chars: int = 1000) -> tuple[list[str], list[str], str]:
    """(train chunks, held-out chunks, where): CPython's own standard library sources, on every machine with this
    interpreter (tests, idlelib, lib2to3, turtledemo and site-packages left out), cut at line ends into chunks of
    about `chars` characters; every 10th file (in path order) is held out."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
    files = sorted(p for p in lib.rglob("*.py") if not skip & set(p.relative_to(lib).parts))
    train, test = [], []
    for n, f in enumerate(files):
        cur, chunks = "", []
        for line in f.read_text(errors="replace").splitlines(keepends=True):
            if len(cur) + len(line) > chars and cur:
                chunks.append(cur)
                cur = ""
            cur += line
        if cur.strip():
            chunks.append(cur)
        (test if n % 10 == 9 else train).extend(c for c in chunks if len(c) > chars // 5)
    return train, test, f"{lib} ({len(files)} files)"


def run(cfg: DemoDataConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    splits = {
        "train": [make_example(rng) for _ in range(cfg.train_size)],
        "test": [make_example(rng) for _ in range(cfg.test_size)],
    }
    texts = [r["prompt"] + " " + r["response"] for r in splits["train"]]
    if cfg.pretrain_size:
        chunks = stdlib_chunks(cfg.pretrain_chars)[0]
        random.Random(cfg.seed).shuffle(chunks)
        splits["pretrain"] = [{"text": c} for c in chunks[: cfg.pretrain_size]]
        texts += chunks[: cfg.pretrain_size]
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    save_tokenizer(out / "tokenizer", texts, cfg.vocab_size)
    paths = {name: str(out / f"{name}.jsonl") for name in splits}
    return {**paths, "tokenizer": str(out / "tokenizer")}


def save_tokenizer(folder, texts, vocab_size: int = 600, style: str = "byte-level"):
    """Train a BPE and save it as a PreTrainedTokenizerFast (what AutoTokenizer loads): byte-level (GPT-2's
    scheme) or metaspace (SentencePiece's: ▁ for a space, a dummy prefix, raw bytes as <0xAB> tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "byte-level":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet, extra = pre_tokenizers.ByteLevel.alphabet(), []
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        alphabet, extra = [], [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + extra, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    if extra:  # the byte tokens are ordinary vocabulary (as in a converted SentencePiece model), not special
        model = json.loads(tok.to_str())["model"]
        bpe = models.BPE(model["vocab"], [tuple(m) for m in model["merges"]], unk_token="<unk>", byte_fallback=True)
        tok.model = bpe
        tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))
    return fast


def save_model(cfg: ModelConfig, vocab_size: int | None = None) -> str:
    """A freshly initialized tiny causal LM (GPT-2 or Llama style) with its tokenizer, via save_pretrained; its
    tables sized to the tokenizer (or `vocab_size` rows)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    arch, layers, width, heads = cfg.arch, cfg.layers, cfg.width, cfg.heads
    tok = AutoTokenizer.from_pretrained(str(cfg.tokenizer))
    v = vocab_size or len(tok)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=v, n_positions=256, n_embd=width, n_layer=layers, n_head=heads, **ids)
    else:  # llama, ModelConfig's other choice
        config = LlamaConfig(
            vocab_size=v,
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **ids,
        )
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(cfg.out))
    tok.save_pretrained(str(cfg.out))
    return str(cfg.out)
