# One teacher cache, many students: data → (teacher SFT) → cache-teacher (sharded) → one run per
# student × loss × seed → evaluate → report.   snakemake --cores N [--configfile config/gpu_dolly.yaml]
import yaml

if not config:  # --configfile X replaces the default instead of merging into it
    config.update(yaml.safe_load(open("config/demo.yaml")))

W, R = config["work_dir"], config["results_dir"]
LOSSES, SEEDS = config["losses"], config["seeds"]
SHARDS = config["cache"]["shards"]
GPUS = config.get("gpus_per_job", 0)
RUNS = expand("{loss}-s{seed}", loss=LOSSES + (["sft"] if config.get("sft") else []), seed=SEEDS)
DATA_FIELDS = "--prompt-field prompt --response-field response"

wildcard_constraints:
    split="train|test", shard=r"\d+", seed=r"\d+", loss="|".join(LOSSES)


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
    c = config[role]
    if role == "teacher" and c.get("train"):
        return f"{W}/teacher/final"
    return f"{W}/init/{role}" if c.get("init") else c["model"]


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
        role="teacher|student",
    params:
        lambda wc: opts(config[wc.role]["init"]),
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
        student=local(model_path("student")),
    output:
        directory(f"{W}/runs/{{loss}}-s{{seed}}/final"),
    params:
        student=model_path("student"),
        train=opts(config["train"]),
    resources:
        gpu=GPUS,
    shell:
        "{LAUNCH} train --student {params.student} --cache {W}/cache/train --loss {wildcards.loss} "
        "--seed {wildcards.seed} --eval-cache {W}/cache/test --out {W}/runs/{wildcards.loss}-s{wildcards.seed} "
        "{params.train}"


rule sft:
    input:
        data=f"{W}/data/train.jsonl",
        eval_cache=f"{W}/flags/cache-test.verified",
        student=local(model_path("student")),
    output:
        directory(f"{W}/runs/sft-s{{seed}}/final"),
    params:
        student=model_path("student"),
        train=opts(config["train"]),
    resources:
        gpu=GPUS,
    shell:
        "{LAUNCH} train --loss ce --student {params.student} --data {input.data} {DATA_FIELDS} "
        "--seed {wildcards.seed} --eval-cache {W}/cache/test --out {W}/runs/sft-s{wildcards.seed} {params.train}"


rule evaluate:
    input:
        model=lambda wc: local(model_path("teacher")) if wc.name == "teacher" else f"{W}/runs/{wc.name}/final",
        cache=f"{W}/flags/cache-test.verified",
        data=f"{W}/data/test.jsonl",
    output:
        f"{W}/eval/{{name}}.json",
    params:
        model=lambda wc: model_path("teacher") if wc.name == "teacher" else f"{W}/runs/{wc.name}/final",
        label=lambda wc: wc.name.rsplit("-s", 1)[0],
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
