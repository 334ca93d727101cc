"""Instruction data nobody here wrote: the Python standard library's own documentation. Each pair asks what a
public function or class of a standard module does, and answers with the first paragraph of its docstring, as
CPython ships it. Deterministic: the same interpreter gives the same pairs."""

from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

from pipeline.config import DocstringDataConfig

MODULES = (
    "argparse base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal difflib enum "
    "fnmatch fractions functools glob gzip hashlib heapq html inspect ipaddress itertools json logging math operator "
    "os os.path pathlib pprint queue random re secrets shlex shutil statistics string struct subprocess tarfile "
    "tempfile textwrap threading time typing unittest urllib.parse uuid zipfile zlib"
).split()


def pairs(max_chars: int) -> list[dict]:
    """(prompt, response, name) for every public function and class with a docstring of some substance."""
    out = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            doc = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
            if 40 <= len(doc) <= max_chars and not doc.startswith(f"{name}("):
                kind = "class" if inspect.isclass(obj) else "function"
                out.append(
                    {
                        "prompt": f"What does the Python {kind} {module_name}.{name} do?",
                        "response": doc,
                        "name": f"{module_name}.{name}",
                    }
                )
    return list({p["name"]: p for p in out}.values())  # a name re-exported by two modules once


def run(cfg: DocstringDataConfig) -> dict:
    rows = pairs(cfg.max_chars)
    random.Random(cfg.seed).shuffle(rows)
    if cfg.limit:
        rows = rows[: cfg.limit]
    n_test = min(cfg.test_size, len(rows) // 5)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, part in (("test", rows[:n_test]), ("train", rows[n_test:])):
        paths[split] = str(out / f"{split}.jsonl")
        with open(paths[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return {**paths, "train_size": len(rows) - n_test, "test_size": n_test}
