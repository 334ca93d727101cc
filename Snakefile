# One teacher cache, many students: data → (teacher SFT) → cache-teacher (sharded) → one run per
# student × loss × seed → evaluate → report.   snakemake --cores N [--configfile config/gpu_dolly.yaml]
from pathlib import Path

import yaml

if not config:  # --configfile X replaces the default instead of merging into it
    config.update(yaml.safe_load(open("config/demo.yaml")))

W, R = config["work_dir"], config["results_dir"]
LOSSES, SEEDS, STUDENTS = config["losses"], config["seeds"], config["students"]
SHARDS = config["cache"]["shards"]
GPUS = config.get("gpus_per_job", 0)
RUNS = expand("{student}-{loss}-s{seed}", student=STUDENTS, loss=LOSSES + (["sft"] if config.get("sft") else []),
              seed=SEEDS)
DATA_FIELDS = "--prompt-field prompt --response-field response"

wildcard_constraints:
    split="train|test", shard=r"\d+", seed=r"\d+", loss="|".join(LOSSES), student="|".join(STUDENTS)


def opts(d):
    """A config mapping → command-line options ({max_steps: 5} → --max-steps 5; lists repeat)."""
    out = []
    for k, v in (d or {}).items():
        flag = "--" + k.replace("_", "-")
        for x in (v if isinstance(v, list) else [v]):
            out.append(flag if x is True else f"{flag} {x}")
    return " ".join(out)


LAUNCH = f"torchrun --nproc-per-node {GPUS} -m pipeline.cli" if GPUS >= 1 else "pipeline"


def model_path(role):
    """Where a model comes from: the SFT'd teacher, a freshly initialized config, or a path/hub name."""
    c = config["teacher"] if role == "teacher" else STUDENTS[role]
    if role == "teacher" and c.get("train"):
        return f"{W}/teacher/final"
    return f"{W}/init/{role}" if c.get("init") else c["model"]


def label(run):
    """Report row of a run: the loss, prefixed by the student when there are several."""
    student, loss = run.rsplit("-s", 1)[0].split("-", 1)
    return loss if len(STUDENTS) == 1 else f"{student}/{loss}"


def local(path):
    return [path] if path.startswith(W) else []


rule all:
    input:
        f"{R}/report.md",


if config["data"].get("generate"):

    rule data:
        output:
            train=f"{W}/data/train.jsonl",
            test=f"{W}/data/test.jsonl",
            tokenizer=directory(f"{W}/data/tokenizer"),
        params:
            opts(config["data"]["generate"]),
        shell:
            "pipeline prepare-demo --out {W}/data {params}"

else:

    rule data:
        output:
            train=f"{W}/data/train.jsonl",
            test=f"{W}/data/test.jsonl",
        params:
            opts(config["data"]),
        shell:
            "pipeline prepare-data --out {W}/data {params}"


rule init_model:
    input:
        rules.data.output,
    output:
        directory(f"{W}/init/{{role}}"),
    wildcard_constraints:
        role="|".join(["teacher", *STUDENTS]),
    params:
        lambda wc: opts((config["teacher"] if wc.role == "teacher" else STUDENTS[wc.role])["init"]),
    shell:
        "pipeline init-model --tokenizer {W}/data/tokenizer --out {output} {params}"


rule teacher_sft:
    input:
        data=f"{W}/data/train.jsonl",
        base=local(f"{W}/init/teacher") if config["teacher"].get("init") else [],
    output:
        directory(f"{W}/teacher/final"),
    params:
        base=f"{W}/init/teacher" if config["teacher"].get("init") else config["teacher"].get("model"),
        train=opts(config["teacher"].get("train") if isinstance(config["teacher"].get("train"), dict) else {}),
    resources:
        gpu=GPUS,
    shell:
        "{LAUNCH} train --loss ce --student {params.base} --data {input.data} {DATA_FIELDS} "
        "--out {W}/teacher {params.train}"


rule cache_shard:
    input:
        data=f"{W}/data/{{split}}.jsonl",
        teacher=local(model_path("teacher")),
    output:
        touch(f"{W}/flags/cache-{{split}}-{{shard}}.done"),
    params:
        teacher=model_path("teacher"),
        cache=opts({k: v for k, v in config["cache"].items() if k != "shards"}),
    resources:
        gpu=min(GPUS, 1),
    shell:
        "pipeline cache-teacher --teacher {params.teacher} --data {input.data} {DATA_FIELDS} "
        "--out {W}/cache/{wildcards.split} --shard {wildcards.shard}/{SHARDS} {params.cache}"


rule cache_verify:
    input:
        expand(f"{W}/flags/cache-{{{{split}}}}-{{shard}}.done", shard=range(SHARDS)),
    output:
        touch(f"{W}/flags/cache-{{split}}.verified"),
    shell:
        "pipeline verify {W}/cache/{wildcards.split} && pipeline inspect {W}/cache/{wildcards.split}"


rule distill:
    input:
        cache=f"{W}/flags/cache-train.verified",
        eval_cache=f"{W}/flags/cache-test.verified",
        student=lambda wc: local(model_path(wc.student)),
    output:
        directory(f"{W}/runs/{{student}}-{{loss}}-s{{seed}}/final"),
    params:
        student=lambda wc: model_path(wc.student),
        run=lambda wc, output: Path(output[0]).parent,
        train=opts(config["train"]),
    resources:
        gpu=GPUS,
    shell:
        "{LAUNCH} train --student {params.student} --cache {W}/cache/train --loss {wildcards.loss} "
        "--seed {wildcards.seed} --eval-cache {W}/cache/test --out {params.run} {params.train}"


rule sft:
    input:
        data=f"{W}/data/train.jsonl",
        eval_cache=f"{W}/flags/cache-test.verified",
        student=lambda wc: local(model_path(wc.student)),
    output:
        directory(f"{W}/runs/{{student}}-sft-s{{seed}}/final"),
    params:
        student=lambda wc: model_path(wc.student),
        run=lambda wc, output: Path(output[0]).parent,
        train=opts(config["train"]),
    resources:
        gpu=GPUS,
    shell:
        "{LAUNCH} train --loss ce --student {params.student} --data {input.data} {DATA_FIELDS} "
        "--seed {wildcards.seed} --eval-cache {W}/cache/test --out {params.run} {params.train}"


rule evaluate:
    input:
        model=lambda wc: local(model_path("teacher")) if wc.name == "teacher" else f"{W}/runs/{wc.name}/final",
        cache=f"{W}/flags/cache-test.verified",
        data=f"{W}/data/test.jsonl",
    output:
        f"{W}/eval/{{name}}.json",
    params:
        model=lambda wc: model_path("teacher") if wc.name == "teacher" else f"{W}/runs/{wc.name}/final",
        label=lambda wc: "teacher" if wc.name == "teacher" else label(wc.name),
        run=lambda wc: f"{W}/teacher" if wc.name == "teacher" else f"{W}/runs/{wc.name}",
        eval=opts(config.get("evaluate")),
    resources:
        gpu=min(GPUS, 1),
    shell:
        "pipeline evaluate --model {params.model} --data {input.data} {DATA_FIELDS} --teacher-cache {W}/cache/test "
        "--label {params.label} --run {params.run} --out {output} {params.eval}"


rule report:
    input:
        expand(f"{W}/eval/{{name}}.json", name=["teacher"] + RUNS),
    output:
        f"{R}/report.md",
    shell:
        "pipeline report {input} --out {output} --title '{config[title]}'"
