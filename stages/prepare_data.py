"""Turn any datasets source into train/test JSONL files with prompt/response fields: the Snakefile's data step
for user data (the embedded default generates its own, see prepare_demo)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import DataConfig, PrepareDataConfig
from pipeline.data import load_rows


def run(cfg: PrepareDataConfig) -> dict:
    rows = load_rows(DataConfig(cfg.source, cfg.split, cfg.prompt_field, cfg.response_field, limit=cfg.limit))
    rows = rows.shuffle(seed=cfg.seed)
    n_test = min(cfg.test_size, len(rows) // 5)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("test", rows.select(range(n_test))), ("train", rows.select(range(n_test, len(rows))))):
        paths[name] = str(out / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for r in part:
                prompt = r[cfg.prompt_field]
                if cfg.context_field and r.get(cfg.context_field):
                    prompt = f"{prompt}\n\n{r[cfg.context_field]}"
                f.write(json.dumps({"prompt": prompt, "response": r[cfg.response_field]}) + "\n")
    return paths
