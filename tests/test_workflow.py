import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def snakemake(*args, cwd=ROOT, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2", *args]
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(res.stdout[-3000:] + res.stderr[-3000:])
    return res.stdout + res.stderr


def job_counts(out: str) -> dict:
    block = out.split("Job stats:")[1].split("\n\n")[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", block, re.M)}


@pytest.mark.parametrize("config", ["config/demo.yaml", "config/gpu_dolly.yaml"])
def test_dry_run_resolves_the_whole_dag(config, tmp_path):
    counts = job_counts(snakemake("-n", "--configfile", str(ROOT / config), "--config", f"work_dir={tmp_path}/w",
                                  f"results_dir={tmp_path}/r"))
    c = yaml.safe_load(open(ROOT / config))
    per_student = len(c["students"]) * len(c["seeds"])
    runs = (len(c["losses"]) + bool(c.get("sft"))) * per_student
    assert counts["cache_shard"] == 2 * c["cache"]["shards"] and counts["distill"] == len(c["losses"]) * per_student
    assert counts["evaluate"] == runs + 1 and counts["report"] == 1


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    config = {
        "title": "mini", "work_dir": str(root / "work"), "results_dir": str(root / "results"),
        "data": {"generate": {"train_size": 120, "test_size": 16, "vocab_size": 300}},
        "teacher": {"init": {"arch": "llama", "layers": 1, "width": 32, "heads": 2},
                    "train": {"max_steps": 15, "batch_size": 16, "lr": 3.0e-3, "log_every": 5}},
        "students": {"tiny": {"init": {"arch": "gpt2", "layers": 1, "width": 32, "heads": 2}},
                     "wide": {"init": {"arch": "llama", "layers": 1, "width": 48, "heads": 2}}},
        "cache": {"shards": 2, "top_k": 8, "part_size": 32},
        "losses": ["fkl", "akl"], "sft": True, "seeds": [0],
        "train": {"max_steps": 10, "batch_size": 16, "lr": 3.0e-3, "log_every": 2, "eval_every": 5},
        "evaluate": {"max_new_tokens": 8, "batch_size": 16}, "gpus_per_job": 0,
    }
    (root / "mini.yaml").write_text(yaml.safe_dump(config))
    snakemake("--configfile", str(root / "mini.yaml"))
    return root, config


def test_miniature_end_to_end_run_writes_the_report(mini):
    root, _ = mini
    report = (root / "results/report.md").read_text()
    for row in ("| teacher |", "| tiny/sft |", "| tiny/fkl |", "| wide/akl |"):
        assert row in report
    for png in ("metrics_per_loss.png", "learning_curves.png", "akl_gaps.png"):
        assert (root / "results" / png).stat().st_size > 1000
    akl = json.loads((root / "work/eval/wide-akl-s0.json").read_text())
    assert {"nll", "ppl", "rougeL", "exact_match", "answer_accuracy", "fkl_to_teacher"} <= akl.keys()
    manifest = json.loads((root / "work/cache/train/manifest.json").read_text())
    assert manifest["num_parts"] == 4 and manifest["counts"]["samples"] == 120


def test_adding_a_loss_trains_only_the_new_student_and_reuses_the_cache(mini):
    root, config = mini
    (root / "more.yaml").write_text(yaml.safe_dump({**config, "losses": ["fkl", "akl", "tvd"]}))
    counts = job_counts(snakemake("-n", "--configfile", str(root / "more.yaml")))
    assert counts == {"distill": 2, "evaluate": 2, "report": 1, "all": 1, "total": 6}
