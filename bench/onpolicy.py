"""On-policy round costs, side by side in one run:

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
            model=student,
            data=paths["train"],
            prompt_field="prompt",
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        results = {"prompts": prompts, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "repeats": repeats}
        for name, fn in (
            ("plain_model_generate", lambda s: plain_generate(model, tok, texts, batch_size, max_new_tokens, s)),
            (
                "pipeline_generate",
                lambda s: pipeline("generate", out=str(root / "g.jsonl"), seed=s, **base)["tokens"],
            ),
            (
                "pipeline_generate_teacher_mixed",
                lambda s: pipeline("generate", out=str(root / "m.jsonl"), seed=s, teacher=teacher, alpha=0.2, **base)[
                    "tokens"
                ],
            ),
        ):
            rates = []
            for s in range(repeats):
                t = time.perf_counter()
                n = fn(s)
                rates.append(n / (time.perf_counter() - t))
            results[name] = {"tokens_per_s": float(np.median(rates)), "all": rates}
            print(f"{name:32s} {np.median(rates):8.0f} tokens/s", flush=True)
        results["pipeline_over_plain"] = (
            results["pipeline_generate"]["tokens_per_s"] / results["plain_model_generate"]["tokens_per_s"]
        )

        stages = {}
        t = time.perf_counter()
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
        pipeline(
            "train",
            student=student,
            out=str(root / "run"),
            loss="akl",
            cache=str(root / "cache"),
            max_steps=prompts // batch_size,
            batch_size=batch_size,
        )
        stages["train"] = time.perf_counter() - t
        results["round_seconds"] = stages
        print("one round: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()), flush=True)
    return results


if __name__ == "__main__":
    out = ROOT / "bench/out"
    out.mkdir(exist_ok=True)
    (out / "onpolicy.json").write_text(json.dumps(main(), indent=1))
