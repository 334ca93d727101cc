"""Throughput ratios, measured side by side in one process on the same model and batches:

  cache-teacher / plain teacher forward   the stage's per-batch work (positions-only lm_head, chunked top-k and
                                          exact tail, background part writes) vs `model(ids).logits`
  cache training / plain SFT              one optimizer step with the sparse AKL loss from cached rows vs the
                                          same step with cross-entropy only
  cache training / online KD              vs a step that also runs the teacher and uses dense_kd_loss("fkl"),
                                          the cheapest online loss (the cached side keeps AKL): conservative

Models are Llama-style, randomly initialized, V = 32000; batches of 8 × 256 tokens, half of each sequence
distilled (instruction-like) or all of it (plain text). Each figure is the median of `repeats` timed passes
after a warm-up. Writes bench/out/throughput.json.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from command import TOP_K_ROWS

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


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# cache-teacher's options for these batches: top-64 float16 rows, no top-p, no draws
Cfg = CacheTeacherConfig(
    teacher="unused", out="unused", data=DataConfig("unused", text_field="text"), **TOP_K_ROWS, top_k=64
)


def cache_teacher_ratio(teacher, sample_batches, repeats):
    head = models.PositionLogits(teacher, V)
    chunk = ct.chunk_rows(Cfg, V)

    @torch.inference_mode()
    def forward():
        for b in sample_batches:
            c = batches.collate(b, 0)
            teacher(input_ids=c["input_ids"], attention_mask=c["attention_mask"]).logits

    def cache():
        with tempfile.TemporaryDirectory() as d:
            plan = storage.make_plan(
                backend="zarr",
                k=64,
                temperatures=[1.0],
                vocab_size=V,
                num_rows=sum(map(len, sample_batches)),
                part_size=len(sample_batches[0]),
                identity={},
            )
            w = storage.BackgroundWriter(storage.CacheWriter(Path(d) / "c", plan))
            for p, b in enumerate(sample_batches):
                res = ct.teacher_fields(Cfg, head, b, 0, "cpu", chunk)
                w.put(p, [{**s, **r} for s, r in zip(b, res)])
            w.close()

    return median_time(forward, repeats), median_time(cache, repeats)


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

    return (
        median_time(step(sft, plain), repeats),
        median_time(step(kd, cached), repeats),
        median_time(step(online, plain), repeats),
    )


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
    head = models.PositionLogits(teacher, V)
    with torch.inference_mode():
        for b in bs:
            c = batches.collate(b, 0)
            if mode == "forward":
                teacher(input_ids=c["input_ids"], attention_mask=c["attention_mask"]).logits
            else:
                ct.teacher_fields(Cfg, head, b, 0, "cpu", ct.chunk_rows(Cfg, V))
    done.set()
    sampler.join()
    print(json.dumps({"peak_mb": peak[0] - base}))


def measured_peak(mode):
    out = subprocess.run([sys.executable, __file__, "--memory", mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main(repeats=5, n_batches=4, batch=8, seq=256):
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    teacher, student = llama(4, 512), llama(2, 256)
    results = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "vocab": V,
        "batch": batch,
        "seq": seq,
        "teacher_params": params(teacher),
        "student_params": params(student),
        "rows": [],
    }
    tokens = n_batches * batch * seq
    body_heavy = llama(12, 1024)
    results["body_heavy_teacher_params"] = params(body_heavy)
    for distilled, name in ((0.5, "instruction"), (1.0, "plain-text")):
        bs = make_batches(n_batches, batch, seq, distilled)
        fwd, cache = cache_teacher_ratio(teacher, bs, repeats)
        big_fwd, big_cache = cache_teacher_ratio(body_heavy, bs, max(3, repeats - 2))
        row = {
            "data": name,
            "teacher_forward_tok_s": tokens / fwd,
            "cache_teacher_tok_s": tokens / cache,
            "cache_teacher_over_forward": fwd / cache,
            "body_heavy_cache_teacher_over_forward": big_fwd / big_cache,
        }
        print(
            f"{name:12s} cache-teacher {tokens / cache:8.0f} tok/s, forward {tokens / fwd:8.0f} tok/s, "
            f"ratio {fwd / cache:.3f}; 12×1024 teacher ratio {big_fwd / big_cache:.3f}"
        )
        sft, kd, online = train_ratios(student, teacher, bs, repeats)
        row.update(
            {
                "sft_tok_s": tokens / sft,
                "cached_kd_tok_s": tokens / kd,
                "online_kd_tok_s": tokens / online,
                "cached_kd_over_sft": sft / kd,
                "cached_kd_speedup_over_online": online / kd,
            }
        )
        print(
            f"{name:12s} cached KD {tokens / kd:8.0f} tok/s, SFT {tokens / sft:8.0f} tok/s (ratio {sft / kd:.3f}), "
            f"online KD {tokens / online:8.0f} tok/s (cached is {online / kd:.2f}× faster)"
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
