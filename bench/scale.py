"""Scale figures measurable on this machine, side by side in one run:

  memory      peak resident memory of `pipeline cache-teacher` on a dataset and on one 10× larger, the model
              excluded: each run's peak minus the peak of the same command on a 1-sample dataset (interpreter,
              libraries, model). Sampled every 10 ms from /proc (VmRSS, and RssAnon: memory not backed by files;
              the tokenized dataset is memory-mapped, so its pages show as RssFile and the kernel can drop them).
  tokenize    samples/s of the datasets tokenization (fresh datasets cache each time) at --num-proc 1 and 2.
  packing     training tokens/s (real tokens, not padding) of the same student and KD loss on mixed-length
              instruction data, padded micro-batches vs packed rows, the same token budget per micro-batch.

Writes bench/out/scale.json. `python bench/scale.py`.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from command import TOP_K_ROWS

from pipeline import batches, models
from pipeline.config import DataConfig, ModelConfig
from pipeline.data import tokenized
from pipeline.losses import batch_losses
from pipeline.scoring import forward
from stages import prepare_demo


def write_data(path, n, seed=0):
    """Mixed-length instruction data: responses of 1 to 120 words (log-uniform), prompts of 3 to 40."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "sort", "count", "the", "of", "and", "list", "value", "max"]
    with open(path, "w") as f:
        for _ in range(n):
            p = " ".join(rng.choice(words, int(np.exp(rng.uniform(np.log(3), np.log(40))))))
            r = " ".join(rng.choice(words, int(np.exp(rng.uniform(0, np.log(120))))))
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")


def peak_rss(cmd, env) -> dict:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) // 1024)
            except OSError:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    done.set()
    t.join()
    if proc.returncode:
        raise RuntimeError(err[-2000:])
    return {"vm_rss_mb": peak["VmRSS"], "rss_anon_mb": peak["RssAnon"]}


def memory(root: Path, small=2000) -> dict:
    tok_dir = root / "tok"
    prepare_demo.save_tokenizer(tok_dir, ["alpha beta gamma delta sum sort count the of and list value max"] * 50, 300)
    teacher = prepare_demo.save_model(ModelConfig(root / "teacher", tok_dir, "llama", 4, 256, 4))
    out = {}
    for name, n in (("base", 1), ("small", small), ("large", 10 * small)):
        data = root / f"{name}.jsonl"
        write_data(data, n)
        env = {**os.environ, "HF_DATASETS_CACHE": str(root / f"hf-{name}"), "OMP_NUM_THREADS": "2"}
        cmd = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "cache-teacher",
            "--teacher",
            teacher,
            "--data",
            str(data),
            "--prompt-field",
            "prompt",
            "--response-field",
            "response",
            "--top-k",
            "32",
            *(f for k, v in TOP_K_ROWS.items() for f in ("--" + k.replace("_", "-"), str(v))),
            "--batch-tokens",
            "16384",
            "--part-size",
            "256",
            "--out",
            str(root / f"cache-{name}"),
        ]
        out[name] = {"samples": n, **peak_rss(cmd, env)}
        print(
            f"memory {name:5s} {n:6d} samples: peak RSS {out[name]['vm_rss_mb']} MB, anonymous "
            f"{out[name]['rss_anon_mb']} MB",
            flush=True,
        )
    for key in ("vm_rss_mb", "rss_anon_mb"):
        s, l = out["small"][key] - out["base"][key], out["large"][key] - out["base"][key]
        out[f"{key}_large_over_small"] = l / max(1, s)
    return out


def tokenize_speed(root: Path, n=40000) -> dict:
    import datasets

    data = root / "tok.jsonl"
    write_data(data, n, seed=1)
    tok = models.load_tokenizer(str(root / "teacher"))
    cfg = DataConfig(str(data), prompt_field="prompt", response_field="response")
    out = {"samples": n}
    for procs in (1, 2):
        datasets.config.HF_DATASETS_CACHE = str(root / f"hf-tok-{procs}")
        t = time.perf_counter()
        ds = tokenized(cfg, tok, num_proc=procs, progress=False)
        out[f"num_proc_{procs}_samples_per_s"] = n / (time.perf_counter() - t)
        out["tokens"] = int(ds.data.column("length").to_numpy().sum())
        print(f"tokenize num_proc={procs}: {out[f'num_proc_{procs}_samples_per_s']:.0f} samples/s", flush=True)
    out["speedup_2_over_1"] = out["num_proc_2_samples_per_s"] / out["num_proc_1_samples_per_s"]
    return out


def packing_speed(n_batches=12, budget=8192, pack_length=1024, vocab=8000) -> dict:
    """Real tokens/s of a KD training step (FKL on synthetic top-16 rows), padded vs packed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
    )
    head = models.PositionLogits(model, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    lengths = np.exp(rng.uniform(np.log(24), np.log(1000), 4000)).astype(int)

    def sample(n):
        mask = np.zeros(n, np.uint8)
        mask[n // 3 :] = 1
        p = int(mask.sum())
        lp = np.sort(np.log(rng.dirichlet(np.ones(17), p))[:, :16], axis=1)[:, ::-1].copy()
        return {
            "input_ids": rng.integers(0, vocab, n),
            "loss_mask": mask,
            "topk_ids": rng.integers(0, vocab, (p, 16)),
            "topk_logprobs": lp.astype(np.float32),
            "tail_logmass": np.log(1 - np.exp(lp).sum(1)).astype(np.float32),
        }

    order = np.arange(len(lengths))
    out = {}
    for packed in (False, True):
        groups = batches.micro_batches(order, lengths, 0, budget, packed)[:n_batches]
        collated = [
            batches.collate([sample(int(lengths[i])) for i in g], 0, pack_length if packed else None) for g in groups
        ]
        rows = lambda b: {k: b[k] for k in ("topk_ids", "topk_logprobs", "tail_logmass")}

        def step(b):
            kd = batch_losses(forward(head, b, False), b, rows(b), "fkl")["kd"] / len(b["row_index"])
            kd.backward()
            opt.step()
            opt.zero_grad()

        step(collated[0])
        t = time.perf_counter()
        for b in collated:
            step(b)
        dt = time.perf_counter() - t
        real = sum(int(b["tokens"]) for b in collated)
        computed = sum(b["input_ids"].numel() for b in collated)
        key = "packed" if packed else "padded"
        out[key] = {
            "real_tokens_per_s": real / dt,
            "computed_over_real_tokens": computed / real,
            "samples": sum(len(g) for g in groups),
        }
        print(
            f"packing {key}: {real / dt:.0f} real tokens/s, {computed / real:.2f} tokens computed per real token",
            flush=True,
        )
    out["packed_over_padded"] = out["packed"]["real_tokens_per_s"] / out["padded"]["real_tokens_per_s"]
    return out


def main():
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        results = {
            "memory": memory(root),
            "tokenize": tokenize_speed(root),
            "packing": packing_speed(),
            "threads": torch.get_num_threads(),
        }
    return results


if __name__ == "__main__":
    out = ROOT / "bench/out"
    out.mkdir(exist_ok=True)
    (out / "scale.json").write_text(json.dumps(main(), indent=1))
