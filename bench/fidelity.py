"""The size/fidelity frontier: what a student loses by learning from a cache instead of from the teacher itself,
for each cache encoding, against the bytes it stores per distilled position. Three teachers side by side in one run
(`python bench/fidelity.py`; the teachers, caches and finished students are kept in bench/out/fidelity/, so an
interrupted run resumes): two trained here and the real pretrained one.

The two trained here (built once):
  demo    the demo's generated instruction tasks (add/reverse/sort/count/max); Llama 4×128, V = 600, SFT.
  stdlib  CPython's own standard library sources (the running interpreter's Lib/*.py, tests, idlelib and
          site-packages left out), cut into ~1 KB plain-text chunks, every 10th file held out; a byte-level BPE
          of V = 2048 trained on the training chunks; Llama 4×256 trained as an LM on them.

Arms: top-k at several k in float16 (tail as one exact bucket), the same k=16 rows with the tail dropped and the
head renormalized (the peers' default), top-p rows (≤ 64 wide) with bit-packed ids and 8-bit log-probs, quantized
log-probs at 8 and 4 bits, an exact head plus tail draws (top-p .90 + 16, top-p .50 + 24, top-p .50 + 16: the
default), draws alone (Random-Sampling KD, 32), the online teacher (dense full-vocabulary loss every step: the
reference) and SFT. The non-draw caches are converted from one top-64 float32 cache (storage.convert: truncation
adds the dropped mass to the tail term by term); draw caches need the full logits and are written by cache-teacher
directly.

Every student (same init, same batches, same lr schedule, per seed) trains with FKL (kd_ratio 1) for the same
number of steps; then, on the held-out split, the exact KL(teacher ‖ student) over the full vocabulary (the
teacher model run alongside) and the student's NLL. Seeds give mean ± std. Final KL carries the training
trajectory's noise (±1-4 % between seeds), so each arm's FKL gradient is also compared with the online teacher's
dense gradient on the same 128 training samples, at the student's init and at the online-trained student: the
angle and the relative error, with no trajectory in between.

The real teacher: SmolLM2-135M-Instruct (its Q4_1 GGUF file, dequantized: a real pretrained distribution, not the
original bf16 model), V = 49152, on passages of the standard library's sources (≤ 128 tokens), with its depth-pruned
copy (layers 0, 6, 12, 18, 24, 29) as the student, 60 FKL steps, 2 seeds, its own arms (REAL_ARMS: top-p rows as
wide as the teacher needs).

Writes bench/out/fidelity.json and bench/fidelity.png (about four hours on 2 cores, most of it the real teacher's
students). `python bench/fidelity.py demo stdlib`: the settings named, replacing theirs in fidelity.json (each entry
says when it was measured). `--quick`: the two trained here only, smaller, one seed (bench/fidelity-quick.png).
`--real`: the real teacher alone, to bench/out/fidelity-real.json and bench/fidelity-real.png; `--real --only
"A|B"`: the online reference and the named arms only (SFT is one), to bench/out/fidelity-real-only.json.
"""

import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from command import TOP_K_ROWS, exported_real_teacher, pipeline

import storage
from pipeline import batches, losses, models, scoring, sources, teachers
from pipeline.config import DataConfig, ModelConfig
from pipeline.data import tokenized
from stages import prepare_demo

OUT = ROOT / "bench/out/fidelity"

# name, cache encoding (converted from the top-64 float32 source unless it draws), train options
ARMS = [
    ("top-k 4 fp16", {"top_k": 4}, {}),
    ("top-k 16 fp16", {"top_k": 16}, {}),
    ("top-k 64 fp16", {"top_k": 64}, {}),
    ("top-k 16 renormalized", {"top_k": 16}, {"tail": "renormalize"}),
    ("top-k 16 q8", {"top_k": 16, "ids": "bitpack", "logprobs": "q8"}, {}),
    ("top-k 16 q4", {"top_k": 16, "ids": "bitpack", "logprobs": "q4"}, {}),
    ("top-p .90 q8", {"top_k": 64, "top_p": 0.90, "ids": "bitpack", "logprobs": "q8"}, {}),
    ("top-p .95 q8", {"top_k": 64, "top_p": 0.95, "ids": "bitpack", "logprobs": "q8"}, {}),
    ("top-p .99 q8", {"top_k": 64, "top_p": 0.99, "ids": "bitpack", "logprobs": "q8"}, {}),
    ("top-p .90 q8 + 16 draws", {"top_k": 64, "top_p": 0.90, "ids": "bitpack", "logprobs": "q8", "draws": 16}, {}),
    ("top-p .50 q8 + 24 draws", {"top_k": 64, "top_p": 0.50, "ids": "bitpack", "logprobs": "q8", "draws": 24}, {}),
    ("top-p .50 q8 + 16 draws", {"top_k": 64, "top_p": 0.50, "ids": "bitpack", "logprobs": "q8", "draws": 16}, {}),
    (
        "draws only (RS-KD, 32)",
        {"top_k": 64, "top_p": 0.0, "min_k": 0, "ids": "bitpack", "logprobs": "q8", "draws": 32},
        {},
    ),
]


# the real teacher's arms: the default and top-k 16 converted from a top-64 float32 cache; top-p rows as wide as
# the teacher needs (up to 1024) and the draw caches written by cache-teacher directly
REAL_ARMS = [
    ("top-k 64 fp16 (default before 0.2)", {"top_k": 64}, {}),
    ("top-k 16 fp16", {"top_k": 16}, {}),
    ("top-p .95 q8", {"top_k": 1024, "top_p": 0.95, "ids": "bitpack", "logprobs": "q8", "direct": True}, {}),
    *[
        (
            f"top-p .50 q8 + {n} draws",
            {"top_k": 1024, "top_p": 0.50, "ids": "bitpack", "logprobs": "q8", "draws": n},
            {},
        )
        for n in (24, 20, 16)  # 0.3's default, the point between, 0.4's default
    ],
    (
        "draws only (RS-KD, 32)",
        {"top_k": 64, "top_p": 0.0, "min_k": 0, "ids": "bitpack", "logprobs": "q8", "draws": 32},
        {},
    ),
]
REAL_LAYERS = "0,6,12,18,24,29"
REAL_STEPS = 60


# ---------------------------------------------------------------- teachers


def build_real(root: Path, train_n: int, test_n: int) -> dict:
    """SmolLM2-135M-Instruct (GGUF, dequantized) as the teacher, its depth-pruned copy (layers 0, 6, 12, 18, 24,
    29) as the student, passages of the standard library's sources (every 10th file held out) as the data."""
    train, test, where = prepare_demo.stdlib_chunks(500)
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(test)
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train[:train_n]), ("test", test[:test_n])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    teacher, student = exported_real_teacher(), root / "student"
    if not (student / "config.json").exists():
        pipeline("init-student", **{"from": str(teacher)}, layers=REAL_LAYERS, out=str(student))
    return {
        "root": root,
        "fields": {"text_field": "text", "max_length": 128},
        "where": f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) on {where}",
        "teacher": str(teacher),
        "student": str(student),
        "init_from_config": False,
        "batch": 8,
        "lr": 5e-4,
        "arms": REAL_ARMS,
    }


def build_stdlib(root: Path, train_n: int, test_n: int, steps: int) -> dict:
    train, test, where = prepare_demo.stdlib_chunks()
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(test)
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train[:train_n]), ("test", test[:test_n]), ("lm", train[train_n : train_n + 20000])):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    if not (root / "tokenizer").exists():
        prepare_demo.save_tokenizer(root / "tokenizer", train[:20000], 2048)
    fields = {"text_field": "text", "max_length": 256}
    return _teacher(
        root, fields, where, teacher=(4, 256, 4), student=(2, 128, 2), steps=steps, lm="lm.jsonl", lr=2e-3, batch=16
    )


def build_demo(root: Path, train_n: int, test_n: int, steps: int) -> dict:
    if not (root / "train.jsonl").exists():
        prepare_demo.run(prepare_demo.DemoDataConfig(str(root / "data"), train_n, test_n, 600))
        for name in ("train", "test"):
            (root / f"{name}.jsonl").write_text((root / f"data/{name}.jsonl").read_text())
        (root / "lm.jsonl").write_text((root / "train.jsonl").read_text())
        (root / "data/tokenizer").rename(root / "tokenizer")
    fields = {"prompt_field": "prompt", "response_field": "response", "max_length": 64}
    return _teacher(
        root,
        fields,
        "prepare-demo tasks",
        teacher=(4, 128, 4),
        student=(2, 64, 2),
        steps=steps,
        lm="lm.jsonl",
        lr=3e-3,
        batch=32,
    )


def _teacher(root, fields, where, teacher, student, steps, lm, lr, batch) -> dict:
    """Train the teacher (once) and initialize the student config; the paths and data configs of a setting."""
    for name, (layers, width, heads) in (("teacher-init", teacher), ("student-init", student)):
        if not (root / name).exists():
            prepare_demo.save_model(ModelConfig(root / name, root / "tokenizer", "llama", layers, width, heads))
    if not (root / "teacher/final").exists():
        t0 = time.perf_counter()
        pipeline(
            "train",
            student=str(root / "teacher-init"),
            out=str(root / "teacher"),
            loss="ce",
            data=str(root / lm),
            **fields,
            max_steps=steps,
            lr=lr,
            batch_size=batch,
            warmup_steps=30,
            log_every=50,
        )
        print(f"  trained teacher {root.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return {
        "root": root,
        "fields": fields,
        "where": where,
        "teacher": str(root / "teacher/final"),
        "student": str(root / "student-init"),
        "batch": batch,
        "lr": lr,
    }


# ---------------------------------------------------------------- arms


def data(setting, split) -> DataConfig:
    return DataConfig(str(setting["root"] / f"{split}.jsonl"), **setting["fields"])


def data_flags(setting, split) -> dict:
    """The data options of a split, as the command's flags."""
    return {"data": str(setting["root"] / f"{split}.jsonl"), **setting["fields"]}


def build_caches(setting) -> dict:
    """Arm → cache path: one top-64 float32 cache converted per arm, draw (and "direct") caches written directly."""
    root = setting["root"] / "caches"
    source = root / "top64-f32"
    base = dict(teacher=setting["teacher"], **data_flags(setting, "train"), part_size=128)
    pipeline("cache-teacher", out=str(source), **{**TOP_K_ROWS, "top_k": 64, "logprob_dtype": "float32"}, **base)
    out = {}
    for name, enc, _ in setting.get("arms", ARMS):
        path = root / name.replace(" ", "_").replace("/", "").replace("(", "").replace(")", "").replace(",", "")
        if not (path / "manifest.json").exists():
            if enc.get("draws") or enc.get("direct"):
                pipeline(
                    "cache-teacher",
                    out=str(path),
                    top_k=enc["top_k"],
                    top_p=enc.get("top_p", 1),
                    min_k=enc.get("min_k", 1),
                    ids=enc["ids"],
                    logprob_dtype=enc["logprobs"],
                    tail_draws=enc.get("draws", 0),
                    **base,
                )
            else:
                storage.convert(
                    source,
                    path,
                    top_k=enc["top_k"],
                    top_p=enc.get("top_p"),
                    min_k=enc.get("min_k"),
                    ids=enc.get("ids"),
                    logprobs=enc.get("logprobs", "float16"),
                )
        out[name] = path
    return out


def cache_figures(path) -> dict:
    s = storage.statistics(path)
    return {
        "bytes_per_position": s["bytes_per_distilled_position"],
        "mean_width": s["mean_width"],
        "mean_drawn": s.get("mean_drawn_width", 0.0),
        "decode_kl_mean": s.get("decode_kl_mean"),
        "decode_kl_max": s.get("decode_kl_max"),
    }


def train_student(setting, out, seed, steps, cache=None, online=False, sft=False, **extra) -> float:
    t0 = time.perf_counter()
    cfg = dict(
        student=setting["student"],
        out=str(out),
        loss=extra.pop("loss", "ce" if sft else "fkl"),
        seed=seed,
        max_steps=steps,
        batch_size=setting["batch"],
        lr=setting["lr"],
        warmup_steps=20,
        part_size=128,
        log_every=50,
        init_from_config=setting.get("init_from_config", True),
        tokenizer=setting["student"] if setting.get("init_from_config", True) else None,
        **extra,
    )
    if cache:
        cfg["cache"] = str(cache)
    else:
        cfg |= data_flags(setting, "train")
        if online:
            cfg["teacher"] = setting["teacher"]
    if not (Path(out) / "final").exists():
        pipeline("train", **cfg)
    return time.perf_counter() - t0


def heldout(setting, model_path, teacher_model) -> dict:
    """Exact KL(teacher ‖ student) and KL(student ‖ teacher) over the full vocabulary, and NLL, per held-out token."""
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    head = models.PositionLogits(model, len(tok))
    source = sources.TokenizedSource(tokenized(data(setting, "test"), tok, progress=False))
    row = scoring.score(
        head,
        model,
        teachers.OnlineTeacher(source, teacher_model, len(tok)),
        tok.pad_token_id,
        torch.device("cpu"),
        ("fkl", "rkl"),
        batch_size=32,
    )
    return {"kl": row["fkl"], "rkl": row["rkl"], "nll": row["ce"]}


def run_setting(name, setting, seeds, steps) -> dict:
    from transformers import AutoModelForCausalLM

    print(f"== {name}: {setting['where']}", flush=True)
    caches = build_caches(setting)
    teacher_model = AutoModelForCausalLM.from_pretrained(setting["teacher"]).eval()
    runs = setting["root"] / "runs"
    arms = [("online (dense)", None, {"online": True})] + [("SFT", None, {"sft": True})] * setting.get("sft", True)
    arms += [(n, caches[n], opts) for n, _, opts in setting.get("arms", ARMS)]
    rows = []
    for arm, cache, opts in arms:
        row = {"arm": arm, **(cache_figures(cache) if cache else {}), "seeds": []}
        for seed in seeds:
            out = runs / f"{arm.replace(' ', '_').replace('/', '')}-s{seed}"
            seconds = train_student(setting, out, seed, steps, cache=cache, **opts)
            row["seeds"].append({"seed": seed, "train_s": seconds, **heldout(setting, out / "final", teacher_model)})
        for key in ("kl", "rkl", "nll"):
            vals = [s[key] for s in row["seeds"]]
            row[key] = statistics.mean(vals)
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
        (ROOT / "bench/out").mkdir(exist_ok=True)
        (ROOT / f"bench/out/fidelity-{name}.partial.json").write_text(json.dumps(rows, indent=1, default=str))
        print(
            f"  {arm:26s} "
            + (f"{row['bytes_per_position']:7.1f} B/pos  " if cache else " " * 15)
            + f"KL {row['kl']:.4f} ± {row['kl_std']:.4f}  NLL {row['nll']:.3f}",
            flush=True,
        )
    ref = rows[0]["kl"]
    for row in rows:
        row["kl_vs_online"] = row["kl"] / ref
    t_stats = storage.statistics(next(iter(caches.values())))
    angles = {
        "at_student_init": gradient_angles(setting, caches, setting["student"], teacher_model),
        "at_online_student": gradient_angles(setting, caches, runs / "online_(dense)-s0" / "final", teacher_model),
    }
    for row in rows:
        for where, a in angles.items():
            if row["arm"] in a:
                row[f"grad_angle_deg_{where}"] = a[row["arm"]]["angle_deg"]
                row[f"grad_rel_error_{where}"] = a[row["arm"]]["relative_error"]
    return {
        "where": setting["where"],
        "vocab": len(models.load_tokenizer(setting["teacher"])),
        "steps": steps,
        "seeds": seeds,
        "positions": t_stats["distilled_positions"],
        "rows": rows,
    }


def gradient_angles(setting, caches, checkpoint, teacher_model, n=128, batch=32) -> dict:
    """Per arm: the angle (degrees) and relative error of its FKL parameter gradient against the online teacher's dense
    FKL gradient, on the same n training samples, at a fixed student checkpoint. Low-noise: no training trajectory."""
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(checkpoint)
    student = AutoModelForCausalLM.from_pretrained(checkpoint)
    head = models.PositionLogits(student, len(tok))
    source = sources.TokenizedSource(tokenized(data(setting, "train"), tok, progress=False), 128)

    def grad(teacher, tail="bucket"):
        student.zero_grad()
        for a in range(0, n, batch):
            b = batches.collate([teacher.source[i] for i in range(a, a + batch)], tok.pad_token_id)
            terms = losses.batch_losses(scoring.forward(head, b, False), b, teacher.fields(b), "fkl", tail=tail)
            (terms["kd"] / n).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters()]).clone()

    ref = grad(teachers.OnlineTeacher(source, teacher_model, len(tok)))
    out = {}
    for name, _, opts in setting.get("arms", ARMS):
        g = grad(teachers.cached([caches[name]]), opts.get("tail", "bucket"))
        cos = float(torch.nn.functional.cosine_similarity(g.double(), ref.double(), dim=0))
        out[name] = {
            "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
            "relative_error": float((g - ref).norm() / ref.norm()),
        }
        print(
            f"  gradient {name:26s} {out[name]['angle_deg']:6.2f}°  relative error {out[name]['relative_error']:.3f}",
            flush=True,
        )
    return out


def plot(results, path):
    """Top: held-out KL against bytes per position (the frontier). Bottom: the relative error of each arm's FKL
    gradient against the online teacher's dense one, at the online-trained student (no trajectory noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 8.4), squeeze=False)
    for col, (name, res) in enumerate(results.items()):
        rows = res["rows"]
        online, sft = rows[0], rows[1]
        ax, gx = axes[0][col], axes[1][col]
        ax.axhspan(online["kl"] - online["kl_std"], online["kl"] + online["kl_std"], color="#2ca02c", alpha=0.15)
        ax.axhline(online["kl"], color="#2ca02c", label="online teacher (reference)")
        ax.axhline(online["kl"] * 1.02, color="#2ca02c", ls=":", label="reference + 2 %")
        ax.axhline(sft["kl"], color="#7f7f7f", ls="--", label="SFT (no teacher)")
        for r in rows[2:]:
            marker = "x" if "renormalized" in r["arm"] else ("^" if "draws" in r["arm"] else "o")
            ax.errorbar(r["bytes_per_position"], r["kl"], yerr=r["kl_std"], fmt=marker, capsize=3)
            ax.annotate(
                r["arm"], (r["bytes_per_position"], r["kl"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
            if "grad_rel_error_at_online_student" in r:
                gx.plot(r["bytes_per_position"], r["grad_rel_error_at_online_student"], marker)
                gx.annotate(
                    r["arm"],
                    (r["bytes_per_position"], r["grad_rel_error_at_online_student"]),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
        for a in (ax, gx):
            a.axvline(64, color="k", lw=0.6, ls="-.")
            a.set_xscale("log")
            a.set_xlabel("bytes per distilled position on disk (zarr)")
        gx.set_yscale("log")
        gx.set_ylabel("‖g − g_online‖ / ‖g_online‖, FKL gradient")
        gx.set_title(f"{name}: gradient error at the online-trained student")
        ax.set_ylabel("held-out KL(teacher ‖ student), nats/token")
        ax.set_title(f"{name}: V = {res['vocab']}, {res['steps']} steps, {len(res['seeds'])} seeds")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_real(steps=REAL_STEPS, seeds=(0, 1), only=None):
    """The real teacher alone: bench/out/fidelity-real.json and bench/fidelity-real.png; with `only` (arm names), the
    online reference and those arms, to bench/out/fidelity-real-only.json."""
    setting = build_real(OUT / "real", steps * 8, 64)
    if only is not None:
        setting |= {"arms": [a for a in REAL_ARMS if a[0] in only], "sft": "SFT" in only}
        if len(setting["arms"]) + setting["sft"] != len(only):
            raise SystemExit(f"--only names arms of {['SFT'] + [a[0] for a in REAL_ARMS]}")
    results = {"real": run_setting("real", setting, list(seeds), steps)}
    name = "fidelity-real" if only is None else "fidelity-real-only"
    (ROOT / f"bench/out/{name}.json").write_text(json.dumps(results, indent=1, default=str))
    if only is None:
        plot(results, ROOT / "bench/fidelity-real.png")
    return results


def main(names=("demo", "stdlib", "real"), quick=False):
    """The settings named (all three by default: side by side in one run) into bench/out/fidelity.json, beside the
    other settings' entries of an earlier run (each entry dated), and the settings run plotted to bench/fidelity.png
    (the real teacher alone: bench/fidelity-real.png). `quick`: fewer passages and steps, one seed, the real teacher
    left out, to bench/fidelity-quick.png only."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = [0] if quick else [0, 1]
    builders = {
        "demo": lambda: build_demo(OUT / "demo", 800 if quick else 3000, 64 if quick else 200, 100 if quick else 600),
        "stdlib": lambda: build_stdlib(
            OUT / "stdlib", 800 if quick else 4000, 64 if quick else 200, 100 if quick else 1500
        ),
        "real": lambda: build_real(OUT / "real", REAL_STEPS * 8, 64),
    }
    steps = {"demo": 20 if quick else 200, "stdlib": 20 if quick else 150, "real": REAL_STEPS}
    names = [n for n in names if not (quick and n == "real")]
    if unknown := set(names) - set(builders):
        raise SystemExit(f"unknown settings {sorted(unknown)}: name some of {list(builders)}")
    path = ROOT / "bench/out/fidelity.json"
    results = {} if quick else json.loads(path.read_text()) if path.exists() else last_results()
    for name in names:  # each setting written as it ends, so that an interrupted run keeps the finished ones
        results[name] = run_setting(name, builders[name](), seeds, steps[name])
        results[name]["measured"] = time.strftime("%Y-%m-%d")
        if not quick:
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(results, indent=1, default=str))
    png = "fidelity-quick" if quick else "fidelity-real" if names == ["real"] else "fidelity"
    plot({n: results[n] for n in names}, ROOT / f"bench/{png}.png")  # what this run measured
    return results


def last_results() -> dict:
    """The settings' entries as bench/results.json keeps them (a fresh clone has no bench/out)."""
    path = ROOT / "bench/results.json"
    return json.loads(path.read_text()).get("fidelity", {}) if path.exists() else {}


if __name__ == "__main__":
    if "--real" in sys.argv:
        main_real(only=sys.argv[sys.argv.index("--only") + 1].split("|") if "--only" in sys.argv else None)
    else:
        main([a for a in sys.argv[1:] if not a.startswith("--")] or ("demo", "stdlib", "real"), "--quick" in sys.argv)
