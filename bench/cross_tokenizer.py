"""One cache, a student of another tokenizer: SmolLM2-135M-Instruct (the real teacher, byte-level BPE, V = 49152)
distilled into two students of one architecture (Llama, 4 layers, width 128), each pretrained here for the same
steps on the standard library's prose (docstrings and pydoc topics): one with the teacher's tokenizer, one with a
metaspace (SentencePiece-style) tokenizer of 4096 tokens trained here on that prose and the training files' code.
They are distilled on passages
of the standard library's sources (text nobody here wrote, every 10th file held out) from one cache (the default
encoding), and scored by held-out bits per byte, which does not depend on the tokenizer.

Arms, each with seeds 0 and 1: SFT and the four cross-tokenizer losses (uld, gold, pkl, alm at ALM's temperatures
τ = 1, 10 and 100; (1 − r)·CE + r·KD with r = 0.5, as ULD and GOLD train; pkl also at r = 1 and 0.25) for the
other-tokenizer student; SFT and FKL (r = 1) for the same-tokenizer one.
Writes bench/out/cross_tokenizer.json and bench/cross_tokenizer.png. `python bench/cross_tokenizer.py [--steps N]
[--train N] [--only "ARM|ARM"]` (another --train writes cross_tokenizer-N.json and .png).
"""

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from akl_cache import prose_chunks
from command import exported_real_teacher, pipeline

from pipeline.config import ModelConfig
from stages import prepare_demo

OUT = ROOT / "bench/out"
SHARED = OUT / "xtok"  # the tokenizer and the two pretrained students
TEXT = {"text_field": "text", "max_length": 256}
ARMS = [  # (arm, student, options)
    ("other tokenizer: SFT", "other", {"loss": "ce"}),
    ("other tokenizer: uld", "other", {"loss": "uld", "kd_ratio": 0.5}),
    ("other tokenizer: gold", "other", {"loss": "gold", "kd_ratio": 0.5}),
    ("other tokenizer: pkl", "other", {"loss": "pkl", "kd_ratio": 0.5}),
    ("other tokenizer: pkl, KD only", "other", {"loss": "pkl"}),
    ("other tokenizer: pkl r=0.25", "other", {"loss": "pkl", "kd_ratio": 0.25}),
    ("other tokenizer: alm", "other", {"loss": "alm", "kd_ratio": 0.5}),
    ("other tokenizer: alm τ=10", "other", {"loss": "alm", "kd_ratio": 0.5, "alm_tau": 10.0}),
    ("other tokenizer: alm τ=100", "other", {"loss": "alm", "kd_ratio": 0.5, "alm_tau": 100.0}),
    ("same tokenizer: SFT", "same", {"loss": "ce"}),
    ("same tokenizer: FKL", "same", {"loss": "fkl"}),
]


def write(path: Path, texts) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return str(path)


def setup(root: Path, train_n: int, test_n: int, pretrain_steps: int) -> dict:
    """Teacher, data, the two pretrained students (under SHARED: every training size starts from the same two) and
    the caches."""
    root.mkdir(parents=True, exist_ok=True)
    SHARED.mkdir(parents=True, exist_ok=True)
    teacher = exported_real_teacher()
    train, test, _ = prepare_demo.stdlib_chunks(300)
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(test)
    prose = prose_chunks(300)[0]
    data = {
        "train": write(root / "train.jsonl", train[:train_n]),
        "test": write(root / "test.jsonl", test[:test_n]),
        "prose": write(root / "prose.jsonl", prose),
    }
    if not (SHARED / "ms-tokenizer").exists():  # on the prose and the training files' code (never held-out files)
        prepare_demo.save_tokenizer(SHARED / "ms-tokenizer", prose + train, 4096, "metaspace")
    students = {}
    for name, tok in (("same", teacher), ("other", SHARED / "ms-tokenizer")):
        init = SHARED / f"init-{name}"
        if not (init / "config.json").exists():
            prepare_demo.save_model(ModelConfig(str(init), str(tok), "llama", layers=4, width=128, heads=4))
        start = SHARED / f"pretrained-{name}"
        if not (start / "final").exists():
            pipeline("train", student=init, out=start, loss="ce", data=data["prose"], **TEXT, max_steps=pretrain_steps,
                     batch_size=16, lr=2e-3, warmup_steps=20, log_every=50)  # fmt: skip
        students[name] = str(start / "final")
    caches = {}
    for split in ("train", "test"):
        caches[split] = root / f"cache-{split}"
        if not (caches[split] / "manifest.json").exists():
            pipeline("cache-teacher", teacher=teacher, data=data[split], **TEXT, out=caches[split], part_size=128)
    return {"root": root, "teacher": str(teacher), "data": data, "students": students, "caches": caches}


def evaluate(s: dict, model: str, out: Path) -> dict:
    if not out.exists():
        pipeline("evaluate", model=model, data=s["data"]["test"], **TEXT, no_generate=True, out=out,
                 teacher_cache=s["caches"]["test"])  # fmt: skip
    return json.loads(out.read_text())


def arm_rows(s: dict, steps: int, seeds, arms) -> list[dict]:
    rows = []
    for arm, student, opts in arms:
        row = {"arm": arm, "student": student, **opts, "seeds": []}
        for seed in seeds:
            slug = arm.replace(" ", "").replace(":", "-").replace("τ=", "tau")
            run = s["root"] / "runs" / f"{slug}-s{seed}"
            source = {"data": s["data"]["train"], **TEXT} if opts["loss"] == "ce" else {"cache": s["caches"]["train"]}
            if not (run / "final").exists():
                pipeline("train", student=s["students"][student], out=run, seed=seed, max_steps=steps, batch_size=8,
                         lr=1e-3, warmup_steps=10, log_every=50, part_size=128, **source, **opts)  # fmt: skip
            m = evaluate(s, str(run / "final"), s["root"] / "eval" / f"{slug}-s{seed}.json")
            row["seeds"].append({"seed": seed, **{k: m[k] for k in m if k.startswith(("bits", "chunk", "nll"))}})
        for key in ("bits_per_byte", "chunk_alm_to_teacher"):
            vals = [x[key] for x in row["seeds"] if key in x]
            if vals:
                row[key], row[f"{key}_std"] = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
        print(f"  {arm:26s} bits/byte {row['bits_per_byte']:.4f} ± {row['bits_per_byte_std']:.4f}", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["arms"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colors = ["#888" if r["loss"] == "ce" else ("#1f77b4" if r["student"] == "other" else "#2ca02c") for r in rows]
    ax.barh([r["arm"] for r in rows], [r["bits_per_byte"] for r in rows], xerr=[r["bits_per_byte_std"] for r in rows],
            color=colors)  # fmt: skip
    for start in ("same", "other"):
        ax.axvline(result["start"][start], ls=":", color="#2ca02c" if start == "same" else "#1f77b4")
    ax.axvline(result["teacher_bits_per_byte"], ls="--", color="k", label="teacher")
    ax.invert_yaxis()
    ax.set_xlabel("held-out bits per byte (lower is better; dotted: the students before distillation)")
    ax.set_title("SmolLM2-135M-Instruct → 4-layer students, one cache, two tokenizers")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(steps: int, pretrain_steps: int, train_n: int, test_n: int, only: str | None = None) -> dict:
    """Every arm (or those `only` names, "A|B"), into bench/out/cross_tokenizer.json; with another training size than
    the default 800 passages, into cross_tokenizer-N.json and its plot."""
    arms = [a for a in ARMS if only is None or a[0] in only.split("|")]
    if only is not None and len(arms) != len(only.split("|")):
        raise SystemExit(f'--only names arms by name, "A|B", of {[a[0] for a in ARMS]}')
    suffix = "" if train_n == 800 else f"-{train_n}"
    s = setup(OUT / f"xtok{suffix}", train_n, test_n, pretrain_steps)
    teacher = evaluate(s, s["teacher"], s["root"] / "eval/teacher.json")
    start = {k: evaluate(s, v, s["root"] / f"eval/start-{k}.json")["bits_per_byte"] for k, v in s["students"].items()}
    rows = arm_rows(s, steps, (0, 1), arms)
    best = min((r for r in rows if r["student"] == "other" and r["loss"] != "ce"), key=lambda r: r["bits_per_byte"])
    ref = {r["arm"]: r["bits_per_byte"] for r in rows}
    ref = {k: ref.get(k, float("nan")) for k in ("other tokenizer: SFT", "same tokenizer: FKL")}
    result = {
        "setting": {
            "steps": steps,
            "pretrain_steps": pretrain_steps,
            "train_passages": train_n,
            "test_passages": test_n,
            "teacher": s["teacher"],
        },  # fmt: skip
        "teacher_bits_per_byte": teacher["bits_per_byte"],
        "start": start,
        "arms": rows,
        "best_cross": best["arm"],
        "best_cross_vs_sft": best["bits_per_byte"] / ref["other tokenizer: SFT"],
        "best_cross_vs_same_tokenizer_kd": best["bits_per_byte"] / ref["same tokenizer: FKL"],
    }
    (OUT / f"cross_tokenizer{suffix}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, ROOT / f"bench/cross_tokenizer{suffix}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1, default=str))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--train", type=int, default=800)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--only", help='arms by name, "A|B"')
    a = p.parse_args()
    main(a.steps, a.pretrain_steps, a.train, a.test, a.only)
