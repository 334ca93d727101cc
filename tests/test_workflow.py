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


@pytest.mark.parametrize(
    "config", ["config/demo.yaml", "config/gpu_dolly.yaml", "config/slurm_70b.yaml", "config/real.yaml"]
)
def test_dry_run_resolves_the_whole_dag(config, tmp_path):
    counts = job_counts(
        snakemake(
            "-n", "--configfile", str(ROOT / config), "--config", f"work_dir={tmp_path}/w", f"results_dir={tmp_path}/r"
        )
    )
    c = yaml.safe_load(open(ROOT / config))
    per_student = len(c["students"]) * len(c["seeds"])
    runs = (len(c["losses"]) + bool(c.get("sft")) + len(c.get("online", []))) * per_student
    assert counts["cache_shard"] == 2 * c["cache"]["shards"] and counts["distill"] == len(c["losses"]) * per_student
    assert counts.get("distill_online", 0) == len(c.get("online", [])) * per_student
    rounds = c.get("onpolicy", {}).get("rounds", 0)
    onpolicy = rounds * len(c.get("onpolicy", {}).get("losses", [])) * per_student
    assert counts.get("train_round", 0) == counts.get("generate_round", 0) == counts.get("cache_round", 0) == onpolicy
    assert counts["evaluate"] == runs + 1 + onpolicy + (len(c["students"]) if rounds else 0) and counts["report"] == 1
    gguf = [
        r for r in ["teacher", *c["students"]] if (c["teacher"] if r == "teacher" else c["students"][r]).get("gguf")
    ]
    assert counts.get("export_model", 0) == len(gguf)
    assert counts.get("prune_student", 0) == sum(bool(s.get("prune")) for s in c["students"].values())


def test_scale_knobs_reach_the_commands(tmp_path):
    """tp, gpus_per_job, nodes, fsdp and packing become torchrun launches and flags."""
    out = snakemake(
        "-n",
        "-p",
        "--configfile",
        str(ROOT / "config/slurm_70b.yaml"),
        "--config",
        f"work_dir={tmp_path}/w",
        f"results_dir={tmp_path}/r",
        "nodes=2",
    )
    assert "torchrun --nproc-per-node 8 -m pipeline.cli cache-teacher --tp 8" in out
    assert "--shard 15/16" in out and "--batch-tokens 65536" in out
    train = [l for l in out.splitlines() if " train --student" in l and "--loss akl" in l]
    assert train and all("srun --ntasks-per-node 1 torchrun --nnodes 2 --nproc-per-node 8" in l for l in train)
    assert all("--fsdp --packing" in l for l in train)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    config = {
        "title": "mini",
        "work_dir": str(root / "work"),
        "results_dir": str(root / "results"),
        "data": {
            "generate": {
                "train_size": 120,
                "test_size": 16,
                "vocab_size": 300,
                "pretrain_size": 60,
                "pretrain_chars": 200,
            }
        },
        "teacher": {
            "init": {"arch": "llama", "layers": 1, "width": 32, "heads": 2},
            "pretrain": {"max_steps": 4, "batch_size": 8, "max_length": 64},
            "train": {"max_steps": 15, "batch_size": 16, "lr": 3.0e-3, "log_every": 5},
        },
        "students": {
            "tiny": {
                "init": {"arch": "gpt2", "layers": 1, "width": 32, "heads": 2},
                "finetune": {"max_steps": 3, "batch_size": 16},
            },
        },  # one student: every job is a process start of several seconds (the dry runs cover several students)
        "cache": {"shards": 2, "top_k": 8, "part_size": 32},
        "losses": ["fkl", "akl"],
        "sft": True,
        "seeds": [0],
        "onpolicy": {
            "rounds": 2,
            "lambda": 0.5,
            "prompts": 24,
            "losses": ["akl"],
            "sampling": {"max_new_tokens": 6, "temperature": 1.0},
        },
        "train": {"max_steps": 10, "batch_size": 16, "lr": 3.0e-3, "log_every": 2, "eval_every": 5},
        "evaluate": {"max_new_tokens": 8, "batch_size": 16},
        "gpus_per_job": 0,
    }
    (root / "mini.yaml").write_text(yaml.safe_dump(config))
    snakemake("--configfile", str(root / "mini.yaml"))
    return root, config


@pytest.mark.slow
def test_miniature_end_to_end_run_writes_the_report(mini):
    """Pretraining, teacher SFT, a fine-tuned start checkpoint, off-policy arms, two on-policy rounds mixing the fixed
    cache and each round's generations (λ = 0.5), evaluation of every round, the report and its plots."""
    root, _ = mini
    report = (root / "results/report.md").read_text()
    for row in (
        "| teacher |",
        "| start |",  # one student: rows named by the run alone
        "| sft |",
        "| fkl |",
        "| akl |",
        "| onpolicy-akl |",
    ):
        assert row in report
    for png in ("metrics_per_loss.png", "learning_curves.png", "akl_gaps.png", "onpolicy_rounds.png"):
        assert (root / "results" / png).stat().st_size > 1000
    akl = json.loads((root / "work/eval/tiny-akl-s0.json").read_text())
    assert {
        "nll",
        "ppl",
        "rougeL",
        "exact_match",
        "answer_accuracy",
        "fkl_to_teacher",
        "own_fkl_to_teacher",
    } <= akl.keys()
    manifest = json.loads((root / "work/cache/train/manifest.json").read_text())
    assert manifest["num_parts"] == 4 and manifest["counts"]["samples"] == 120
    arm = root / "work/onpolicy/tiny-onpolicy-akl-s0"
    gen2 = json.loads((arm / "gen-2.jsonl").read_text().splitlines()[0])
    assert gen2["round"] == 2 and gen2["generator"]["model"].endswith("round-1/final")
    cache2 = json.loads((arm / "cache-2/manifest.json").read_text())
    assert cache2["encoding"]["behavior_logprob"] and cache2["identity"]["dataset"]["generated_by"][0]["round"] == 2
    config = json.loads((arm / "round-2/run.json").read_text())["settings"]
    assert config["mix"] == [0.5] and len(config["cache"]) == 2 and config["student"].endswith("round-1/final")
    assert json.loads((root / "work/eval/tiny-onpolicy-akl-s0-r2.json").read_text())["round"] == 2


@pytest.mark.slow
def test_adding_a_loss_trains_only_the_new_student_and_reuses_the_cache(mini):
    root, config = mini
    (root / "more.yaml").write_text(yaml.safe_dump({**config, "losses": ["fkl", "akl", "tvd"]}))
    counts = job_counts(snakemake("-n", "--configfile", str(root / "more.yaml")))
    assert counts == {"distill": 1, "evaluate": 1, "report": 1, "all": 1, "total": 4}
