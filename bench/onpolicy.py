"""On-policy round costs, side by side in one run (the generators take turns round by round; bench/timing.py):

  generate    tokens/s of `pipeline generate` (our batched loop: KV cache, left padding, length-sorted batches,
              per-token log-probs recorded) against plain `model.generate(do_sample=True)` on the same prompts,
              batch size and length; and teacher-mixed sampling (α = 0.2: both models step together).
  round       wall-clock of one round split by stage: generate → cache-teacher on the generations → train.

Models are Llama-style from configs (teacher 4×256, student 2×128, V = 4096) on the demo's prompts.
Writes bench/out/onpolicy.json. `python bench/onpolicy.py`.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from command import TOP_K_ROWS, pipeline
from timing import interleaved, ratio

from pipeline import data, models
from pipeline.config import ModelConfig
from stages import prepare_demo


def plain_generate(model, tok, prompts, batch_size, max_new_tokens, seed):
    """model.generate with sampling over the same length-sorted, left-padded batches."""
    ids_all = data.encode_instructions(tok, prompts, [""] * len(prompts))[0]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids_all[i]))
    n = 0
    torch.manual_seed(seed)
    for a in range(0, len(order), batch_size):
        enc = [ids_all[i] for i in order[a : a + batch_size]]
        w = max(map(len, enc))
        ids = torch.tensor([[tok.pad_token_id] * (w - len(e)) + e for e in enc])
        attn = torch.tensor([[0] * (w - len(e)) + [1] * len(e) for e in enc])
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )[:, w:]
        for row in out.tolist():
            n += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return n


def generation_rates(generators: dict, repeats: int) -> dict:
    """tokens/s of each generator (called with a seed, it returns the tokens it generated), the generators taking
    turns round by round after a warm-up."""
    tokens = {name: [] for name in generators}

    def counted(name, fn):
        return lambda: tokens[name].append(fn(len(tokens[name])))

    times = interleaved({name: counted(name, fn) for name, fn in generators.items()}, repeats)
    return {name: np.array(tokens[name][1:]) / times[name] for name in generators}  # the warm-up's tokens left out


def round_seconds(root: Path, teacher, base: dict, prompts: int, batch_size: int) -> dict:
    """One on-policy round's stages, timed: generate, cache-teacher on the generations, train from that cache."""
    stages, t = {}, time.perf_counter()
    pipeline("generate", out=str(root / "round.jsonl"), seed=0, **base)
    stages["generate"] = time.perf_counter() - t
    generated = dict(
        data=str(root / "round.jsonl"),
        prompt_field="prompt",
        response_field="response",
        response_ids_field="response_token_ids",
        behavior_field="behavior_logprobs",
    )
    t = time.perf_counter()
    pipeline("cache-teacher", teacher=teacher, **generated, out=str(root / "cache"), top_k=16, **TOP_K_ROWS)
    stages["cache_teacher"] = time.perf_counter() - t
    t = time.perf_counter()
    student, steps = base["model"], prompts // batch_size
    cache = str(root / "cache")
    pipeline("train", student=student, out=str(root / "run"), loss="akl", cache=cache, max_steps=steps,
             batch_size=batch_size)  # fmt: skip
    stages["train"] = time.perf_counter() - t
    return stages


def main(prompts=256, batch_size=32, max_new_tokens=48, repeats=3):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = prepare_demo.run(prepare_demo.DemoDataConfig(str(root / "data"), prompts, 16, 4096))
        teacher = prepare_demo.save_model(ModelConfig(root / "teacher", paths["tokenizer"], "llama", 4, 256, 4))
        student = prepare_demo.save_model(ModelConfig(root / "student", paths["tokenizer"], "llama", 2, 128, 2))
        tok = models.load_tokenizer(student)
        model = models.load_model(student, torch.float32, torch.device("cpu")).eval()
        texts = [json.loads(l)["prompt"] for l in open(paths["train"])]
        base = dict(
            model=student, data=paths["train"], prompt_field="prompt", max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )  # fmt: skip
        generate = lambda out, s, **mixed: pipeline("generate", out=str(root / out), seed=s, **mixed, **base)["tokens"]
        rates = generation_rates(
            {
                "plain_model_generate": lambda s: plain_generate(model, tok, texts, batch_size, max_new_tokens, s),
                "pipeline_generate": lambda s: generate("g.jsonl", s),
                "pipeline_generate_teacher_mixed": lambda s: generate("m.jsonl", s, teacher=teacher, alpha=0.2),
            },
            repeats,
        )
        results = {"prompts": prompts, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "repeats": repeats}
        for name, r in rates.items():
            results[name] = {"tokens_per_s": float(np.median(r)), "all": r.tolist()}
            print(f"{name:32s} {np.median(r):8.0f} tokens/s", flush=True)
        results["pipeline_over_plain"] = ratio(rates, "pipeline_generate", "plain_model_generate")
        results["round_seconds"] = round_seconds(root, teacher, base, prompts, batch_size)
        print("one round: " + ", ".join(f"{k} {v:.1f} s" for k, v in results["round_seconds"].items()), flush=True)
    return results


if __name__ == "__main__":
    out = ROOT / "bench/out"
    out.mkdir(exist_ok=True)
    (out / "onpolicy.json").write_text(json.dumps(main(), indent=1))
