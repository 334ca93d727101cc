"""AKL from a cache against AKL online: what each cache encoding costs the project's main loss, and the losses
weighted by the student's probabilities (rkl, jsd, tvd) with it.

Two real-text teachers:
  real   SmolLM2-135M-Instruct (its Q4_1 GGUF file, dequantized: a real pretrained distribution, not the original
         bf16 model), V = 49152, on passages of the standard library's sources (≤ 128 tokens), its depth-pruned copy
         (layers 0, 6, 12, 18, 24, 29) as the student, 60 steps (bench/fidelity.py --real's setting).
  prose  a language model of real English prose: the docstrings of CPython's standard library (every docstring of
         every module, class and function, as written by its authors; every 10th file held out), a byte-level BPE
         of V = 4096 trained on them, a Llama 4×256 trained here as an LM on them (a flat distribution: a small model
         of varied prose), a Llama 2×128 student from scratch, 150 steps.

Arms, per teacher: the online teacher (dense full-vocabulary AKL every step: the reference), online FKL, SFT, and
AKL from caches: the default top-k 64 fp16, top-p .5 + 24 draws q8 (counted, as written before, where such a cache
exists; and exact), the same with a teacher sketch (rank 32 or 16, 4-bit), and FKL from the sketched cache. Same
init, batches and schedule per seed; then the exact held-out KL(teacher ‖ student) and KL(student ‖ teacher) over
the full vocabulary. Gradient error of each cached arm's loss (akl, rkl, jsd, tvd, fkl) against the online dense
gradient of the same loss on the same 128 training samples, at the online-AKL-trained student (and AKL's at init).

`python bench/akl_cache.py [real|prose ...]` writes bench/out/akl_cache.json and bench/akl_cache.png.
`--only "ARM|ARM"` trains the AKL online reference and the named arms only; `--kinds "rkl|jsd|tvd"` adds those
losses trained online and from the exact-draws cache and the sketched one (or from the caches of the arms that
`--kinds-from "ARM|ARM"` names); `--seeds 0,1`; `--table` prints the README's tables.
"""

import ast
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import fidelity
from command import pipeline

import storage
from pipeline import batches, losses, models, scoring, sources, teachers
from pipeline.data import tokenized
from stages import prepare_demo

OUT = ROOT / "bench/out/akl_cache"
HEAD = {"top_p": 0.5, "ids": "bitpack", "logprobs": "q8"}
ARMS = [  # name, encoding (None: the setting's counted cache written before exact draws), train loss
    ("top-k 64 fp16 (default before 0.2)", {"top_k": 64}, "akl"),
    ("top-p .5 + 24 draws q8, counted", None, "akl"),
    ("top-p .5 + 24 draws q8, exact", {**HEAD, "draws": 24}, "akl"),
    ("top-p .5 + 24 draws q8 + sketch 32 q4", {**HEAD, "draws": 24, "sketch": 32}, "akl"),
    ("top-p .5 + 16 draws q8 + sketch 16 q4", {**HEAD, "draws": 16, "sketch": 16}, "akl"),
    ("top-p .5, at most 16, + 24 draws q8, exact", {**HEAD, "top_k": 16, "draws": 24}, "akl"),
    ("top-p .5, at most 16, + 24 draws q8 + sketch 32 q4", {**HEAD, "top_k": 16, "draws": 24, "sketch": 32}, "akl"),
    ("FKL: top-p .5 + 24 draws q8 + sketch 32 q4", {**HEAD, "draws": 24, "sketch": 32}, "fkl"),
    ("FKL: top-p .5, at most 16, + 24 draws q8, exact", {**HEAD, "top_k": 16, "draws": 24}, "fkl"),
    (
        "FKL: top-p .5, at most 16, + 24 draws q8 + sketch 32 q4",
        {**HEAD, "top_k": 16, "draws": 24, "sketch": 32},
        "fkl",
    ),
]
KINDS = ("akl", "rkl", "jsd", "tvd", "fkl")


def prose_chunks(chars: int = 500) -> tuple[list[str], list[str], str]:
    """(train, held-out, where): the standard library's prose: every docstring of its modules, classes and functions
    and the reference topics pydoc ships (pydoc_data.topics), cut at paragraph ends into chunks of about `chars`
    characters; every 10th file (and topic) held out."""
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
    files = sorted(p for p in lib.rglob("*.py") if not skip & set(p.relative_to(lib).parts))
    docs = [_docstrings(f) for f in files] + [topics[k].split("\n\n") for k in sorted(topics)]
    train, test = [], []
    for n, paragraphs in enumerate(docs):
        paragraphs = [" ".join(p.split()) for p in paragraphs if len(p.strip()) > 40]
        cur, chunks = "", []
        for p in paragraphs:
            if len(cur) + len(p) > chars and cur:
                chunks.append(cur)
                cur = ""
            cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) > chars // 5:
            chunks.append(cur)
        (test if n % 10 == 9 else train).extend(chunks)
    return train, test, f"docstrings of {lib} ({len(files)} files) and pydoc's {len(topics)} reference topics"


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(errors="replace"))
    except SyntaxError:
        return []
    nodes = [tree] + [x for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.ClassDef))]
    return [p for x in nodes for p in (ast.get_docstring(x) or "").split("\n\n")]


def build_prose(root: Path, train_n=2400, test_n=200, teacher_steps=250) -> dict:
    """The teacher is trained on all training chunks (the students distill on 2400 of them), then held out."""
    train, test, where = prose_chunks()
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(test)
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train[:train_n]), ("test", test[:test_n]), ("lm", train)):
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    if not (root / "tokenizer").exists():
        prepare_demo.save_tokenizer(root / "tokenizer", train, 4096)
    fields = {"text_field": "text", "max_length": 128}
    s = fidelity._teacher(
        root, fields, where, teacher=(4, 256, 4), student=(2, 128, 2), steps=teacher_steps, lm="lm.jsonl", lr=2e-3,
        batch=16,
    )  # fmt: skip
    return {**s, "steps": 150, "counted": None, "skip": ("top-p .5 + 16 draws q8 + sketch 16 q4",)}


def build_real(root: Path) -> dict:
    s = fidelity.build_real(fidelity.OUT / "real", 60 * 8, 64)
    counted = fidelity.OUT / "real/caches/top-p_.50_q8_+_24_draws"  # written before exact draws existed
    reuse = {"FKL online (dense)": "online_(dense)", "SFT": "SFT"}  # bench/fidelity.py --real's, same settings
    counted = counted if (counted / "manifest.json").exists() else None
    untrained = ("top-p .5 + 24 draws q8 + sketch 32 q4", "FKL: top-p .5 + 24 draws q8 + sketch 32 q4")
    skip = ("top-p .5 + 16 draws q8 + sketch 16 q4", *(a[0] for a in ARMS if "at most 16" in a[0]))
    return {**s, "steps": 60, "counted": counted, "reuse": reuse, "skip": skip,
            "untrained": untrained, "gradient_kinds": ("akl",)}  # fmt: skip


def kinds_from(setting) -> tuple:
    """The caches (by arm) that --kinds trains from: the exact draws and the sketched cache unless named."""
    return setting.get("kinds_from") or (ARMS[2][0], ARMS[3][0])


def build_caches(setting) -> dict:
    """The arms' caches: all of them, or with --only those its arms train on."""
    out = {}
    needed = set(setting.get("only", ())) | (set(kinds_from(setting)) if setting.get("other_kinds") else set())
    for name, enc, _ in ARMS:
        if name in setting.get("skip", ()) or setting.get("only") and name not in needed:
            continue
        if enc is None:
            if setting["counted"]:
                out[name] = setting["counted"]
            continue
        path = setting["root"] / "caches" / "-".join(f"{k}{v}" for k, v in sorted(enc.items()))
        if not (path / "manifest.json").exists():
            pipeline(
                "cache-teacher", teacher=setting["teacher"], **fidelity.data_flags(setting, "train"), out=str(path),
                part_size=128, top_k=enc.get("top_k", 1024), top_p=enc.get("top_p", 1), ids=enc.get("ids", "plain"),
                logprob_dtype=enc.get("logprobs", "float16"), tail_draws=enc.get("draws", 0),
                sketch_rank=enc.get("sketch", 0), sketch_bits=4,
            )  # fmt: skip
        out[name] = path
    return out


def cache_figures(path) -> dict:
    s = storage.statistics(path)
    sketch = path / "sketch"
    once = sum(f.stat().st_size for f in sketch.rglob("*") if f.is_file()) if sketch.exists() else 0
    return {
        "bytes_per_position": s["bytes_per_distilled_position"],
        "sketch_basis_bytes": once,
        "mean_width": s["mean_width"],
        "mean_drawn": s.get("mean_drawn_width", 0.0),
    }


def arm_rows(setting, caches, seeds) -> list[dict]:
    from transformers import AutoModelForCausalLM

    teacher_model = AutoModelForCausalLM.from_pretrained(setting["teacher"]).eval()
    arms = [
        ("AKL online (dense)", None, {"online": True, "loss": "akl"}),
        ("FKL online (dense)", None, {"online": True, "loss": "fkl"}),
        ("SFT", None, {"sft": True}),
    ] + [(name, caches[name], {"loss": loss}) for name, _, loss in ARMS if name in caches]
    arms = [a for a in arms if a[0] not in setting.get("untrained", ())]
    if setting.get("only"):  # the references and the named arms
        arms = [a for a in arms if a[1] is None and "AKL" in a[0] or a[0] in setting["only"]]
    for kind in setting.get("other_kinds", ()):  # the other student-weighted losses: online, and from caches
        arms += [(f"{kind.upper()} online (dense)", None, {"online": True, "loss": kind})]
        arms += [(f"{kind.upper()}: {name}", caches[name], {"loss": kind}) for name in kinds_from(setting)]
    rows = []
    for arm, cache, opts in arms:
        row = {"arm": arm, **(cache_figures(cache) if cache else {}), "seeds": []}
        for seed in seeds:
            reused = setting.get("reuse", {}).get(arm)  # a run of bench/fidelity.py with the same settings
            slug = arm.replace(" ", "_").replace("/", "").replace(":", "").replace(",", "")
            out = setting["root"] / "runs" / (f"{reused}-s{seed}" if reused else f"akl_cache/{slug}-s{seed}")
            seconds = fidelity.train_student(setting, out, seed, setting["steps"], cache=cache, **opts)
            row["seeds"].append({"seed": seed, "train_s": seconds, **heldout(setting, out / "final", teacher_model)})
        for key in ("kl", "rkl", "nll"):
            vals = [s[key] for s in row["seeds"]]
            row[key], row[f"{key}_std"] = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
        print(
            f"  {arm:44s} " + (f"{row['bytes_per_position']:6.1f} B/pos " if cache else " " * 13)
            + f"KL(T‖S) {row['kl']:.4f} ± {row['kl_std']:.4f}  KL(S‖T) {row['rkl']:.4f}  NLL {row['nll']:.3f}",
            flush=True,
        )  # fmt: skip
    for row in rows:
        row["kl_vs_akl_online"] = row["kl"] / rows[0]["kl"]
        row["rkl_vs_akl_online"] = row["rkl"] / rows[0]["rkl"]
    return rows


def heldout(setting, model, teacher_model) -> dict:
    """fidelity.heldout, kept beside the model (heldout.json) so that a rerun does not score it again."""
    saved = Path(model) / "heldout.json"
    if not saved.exists():
        saved.write_text(json.dumps(fidelity.heldout(setting, model, teacher_model)))
    return json.loads(saved.read_text())


def gradient_errors(setting, caches, checkpoint, kinds=KINDS, n=128, batch=16) -> dict:
    """{kind: {arm: relative error}} of each cached arm's loss gradient against the online dense one, at a fixed
    student checkpoint, on the same n training samples."""
    from transformers import AutoModelForCausalLM

    tok = models.load_tokenizer(checkpoint)
    student = AutoModelForCausalLM.from_pretrained(checkpoint)
    teacher_model = AutoModelForCausalLM.from_pretrained(setting["teacher"]).eval()
    head = models.PositionLogits(student, len(tok))
    source = sources.TokenizedSource(tokenized(fidelity.data(setting, "train"), tok, progress=False), 128)

    def grad(teacher, kind):
        student.zero_grad()
        for a in range(0, n, batch):
            b = batches.collate([teacher.source[i] for i in range(a, a + batch)], tok.pad_token_id)
            terms = losses.batch_losses(scoring.forward(head, b, False), b, teacher.fields(b), kind)
            (terms["kd"] / n).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters()]).clone()

    out = {}
    for kind in kinds:
        ref = grad(teachers.OnlineTeacher(source, teacher_model, len(tok)), kind)
        out[kind] = {}
        for name, _, loss in ARMS:
            if name not in caches or loss != "akl":
                continue
            g = grad(teachers.cached([caches[name]]), kind)
            out[kind][name] = float((g - ref).norm() / ref.norm())
            print(f"  gradient {kind} {name:44s} relative error {out[kind][name]:.3f}", flush=True)
    return out


def run_setting(name, setting, seeds=(0, 1), gradients_only=False) -> dict:
    print(f"== {name}: {setting['where']}", flush=True)
    t0 = time.perf_counter()
    caches = build_caches(setting)
    rows = [] if gradients_only else arm_rows(setting, caches, list(seeds))
    trained = setting["root"] / "runs" / "akl_cache" / "AKL_online_(dense)-s0" / "final"
    grads = (
        {}
        if setting.get("only")
        else {
            "at_akl_online_student": gradient_errors(setting, caches, trained, setting.get("gradient_kinds", KINDS)),
            "at_student_init": gradient_errors(setting, caches, setting["student"], kinds=("akl",)),
        }
    )
    return {
        "where": setting["where"],
        "vocab": len(models.load_tokenizer(setting["teacher"])),
        "steps": setting["steps"],
        "seeds": list(seeds),
        "rows": rows,
        "gradient_relative_error": grads,
        "seconds": time.perf_counter() - t0,
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        rows = res["rows"]
        if not rows:  # a --gradients-only run: the AKL gradient errors
            _plot_gradients(ax, name, res)
            continue
        ref = rows[0]
        ax.axhspan(ref["kl"] - ref["kl_std"], ref["kl"] + ref["kl_std"], color="#2ca02c", alpha=0.15)
        ax.axhline(ref["kl"], color="#2ca02c", label="AKL online (reference)")
        ax.axhline(ref["kl"] * 1.05, color="#2ca02c", ls=":", label="reference + 5 %")
        for r in rows[1:3]:
            ax.axhline(r["kl"], ls="--", color="#7f7f7f" if r["arm"] == "SFT" else "#1f77b4", label=r["arm"])
        for r in rows[3:]:
            if "bytes_per_position" not in r or r["arm"][:4] in ("RKL:", "JSD:", "TVD:"):
                continue  # the other losses: in the JSON and the README's table
            marker = "s" if r["arm"].startswith("FKL") else ("*" if "sketch" in r["arm"] else "o")
            ax.errorbar(r["bytes_per_position"], r["kl"], yerr=r["kl_std"], fmt=marker, capsize=3)
            ax.annotate(
                r["arm"], (r["bytes_per_position"], r["kl"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_xlabel("bytes per distilled position on disk (zarr; a sketch's basis is stored once per cache)")
        ax.set_ylabel("held-out KL(teacher ‖ student), nats/token")
        ax.set_title(f"{name}: V = {res['vocab']}, {res['steps']} steps, {len(res['seeds'])} seeds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results) -> str:
    """The README's tables: per teacher, each arm's held-out figures (÷ the online arm of its own loss) and the
    gradient errors of the cached AKL arms."""
    out = []
    for name, res in results.items():
        rows = {r["arm"]: r for r in res["rows"]}
        out += [
            f"**{name}** ({res['where']}; V = {res['vocab']}, {res['steps']} steps, seeds {res['seeds']})",
            "",
            "| arm | B/pos | held-out KL(T‖S) | ÷ own loss online | KL(S‖T) | ÷ own loss online | NLL |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            first = r["arm"].split(" ")[0].rstrip(":")
            kind = first if first in ("FKL", "RKL", "JSD", "TVD") else "AKL"
            ref = rows.get(f"{kind} online (dense)", rows["AKL online (dense)"])
            bpos = f"{r['bytes_per_position']:.0f}" if "bytes_per_position" in r else "–"
            out.append(
                f"| {r['arm']} | {bpos} | {r['kl']:.4f} ± {r['kl_std']:.4f} | {r['kl'] / ref['kl']:.3f} | "
                f"{r['rkl']:.4f} ± {r['rkl_std']:.4f} | {r['rkl'] / ref['rkl']:.3f} | {r['nll']:.3f} |"
            )
        grads = res["gradient_relative_error"]
        if not grads:  # a run of named arms only (--only)
            out.append("")
            continue
        arms = list(grads["at_akl_online_student"]["akl"])
        out += ["", "| gradient error vs online, (at init /) at the online-AKL student | " + " | ".join(KINDS) + " |"]
        out.append("|---" * (len(KINDS) + 1) + "|")
        for arm in arms:
            init, trained = grads["at_student_init"], grads["at_akl_online_student"]
            cells = [
                (f"{100 * init[k][arm]:.0f}% / " if k in init else "") + f"{100 * trained[k][arm]:.0f}%" for k in KINDS
            ]
            out.append(f"| {arm} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _plot_gradients(ax, name, res):
    grads = res["gradient_relative_error"]
    arms = list(grads["at_akl_online_student"]["akl"])
    x = range(len(arms))
    for shift, (where, label) in enumerate(
        (("at_student_init", "student at init"), ("at_akl_online_student", "trained"))
    ):
        ax.bar([i + 0.4 * shift for i in x], [100 * grads[where]["akl"][a] for a in arms], 0.4, label=label)
    ax.set_xticks([i + 0.2 for i in x], [a.replace(" + ", "\n+ ") for a in arms], fontsize=7)
    ax.set_ylabel("AKL gradient error vs online AKL, % of its norm")
    ax.set_title(f"{name}: V = {res['vocab']}, 128 training samples")
    ax.legend(fontsize=8)


def main(names):
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = ROOT / "bench/out/akl_cache.json"
    builders = {"real": lambda: build_real(OUT / "real"), "prose": lambda: build_prose(OUT / "prose")}
    flags = dict(zip(sys.argv[1:], sys.argv[2:]))  # --only "ARM|ARM" (trained even if marked untrained), --seeds 0,1,
    # --kinds "rkl|jsd|tvd"
    seeds = tuple(int(x) for x in flags.get("--seeds", "0,1").split(","))
    if set(flags.get("--kinds-from", "").split("|")) - {"", *(a[0] for a in ARMS)}:
        raise SystemExit(f'--kinds-from names caches by their arm, "A|B", of {[a[0] for a in ARMS]}')
    for name in names:
        setting = builders[name]()
        if "--only" in flags:
            setting = {**setting, "only": tuple(flags["--only"].split("|")), "untrained": ()}
        if "--kinds" in flags:  # --kinds "rkl|jsd|tvd": those losses trained online, from exact draws, and sketched
            setting = {**setting, "other_kinds": tuple(flags["--kinds"].split("|"))}
        if "--kinds-from" in flags:  # --kinds-from "ARM|ARM": the caches --kinds trains from
            setting = {**setting, "kinds_from": tuple(flags["--kinds-from"].split("|"))}
        result = run_setting(name, setting, seeds, gradients_only="--gradients-only" in sys.argv)
        name += "-only" if "--only" in flags else ""
        results = json.loads(path.read_text()) if path.exists() else {}  # another setting may have run meanwhile
        if "--gradients-only" in sys.argv and name in results:  # keep the trained arms' rows
            result["rows"] = results[name]["rows"]
        elif "--only" in flags and name in results:  # named arms add to (or replace) earlier --only runs' arms
            ran = {r["arm"] for r in result["rows"]}
            result["rows"] += [r for r in results[name]["rows"] if r["arm"] not in ran]
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(results | {name: result}, indent=1, default=str))
    results = {k: v for k, v in json.loads(path.read_text()).items() if not k.endswith("-only")}
    if results:  # the plot shows full runs only
        plot(
            results, ROOT / ("bench/akl_cache.png" if "real" in results else f"bench/akl_cache-{'-'.join(results)}.png")
        )
    return results


if __name__ == "__main__":
    if "--table" in sys.argv:
        print(markdown(json.loads((ROOT / "bench/out/akl_cache.json").read_text())))
    elif "--plot" in sys.argv:
        plot(json.loads((ROOT / "bench/out/akl_cache.json").read_text()), ROOT / "bench/akl_cache.png")
    else:
        main([a for a in sys.argv[1:] if a in ("real", "prose")] or ["real", "prose"])
