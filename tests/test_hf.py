"""A cache and our losses inside transformers.Trainer: the same per-step losses as `pipeline train` on the same
batches, gradient accumulation normalized over the whole accumulated batch, LoRA students, Accelerate DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from tiny import build
from transformers import AutoModelForCausalLM, TrainingArguments

from pipeline import models
from pipeline.config import DataConfig, TrainConfig
from pipeline.hf import CacheDataset, DistillCollator, distill_loss
from stages import cache_teacher as ct
from stages import train as tr

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = build(root, train_size=96, test_size=8, archs=("gpt2", "llama"))
    data = DataConfig(paths["train"], prompt_field="prompt", response_field="response")
    tr.run(
        TrainConfig.of(
            student=paths["gpt2"],
            out=str(root / "teacher"),
            loss="ce",
            data=data,
            max_steps=30,
            lr=3e-3,
            batch_size=16,
            progress=False,
            log_every=30,
        )
    )
    ct.run(
        ct.CacheTeacherConfig(
            teacher=str(root / "teacher/final"),
            data=data,
            out=str(root / "cache"),
            top_k=16,
            part_size=32,
            progress=False,
        )
    )
    paths.update(root=root, cache=str(root / "cache"))
    return paths


def optimizer(model, lr, total):
    decay = [p for p in model.parameters() if p.ndim >= 2 and p.requires_grad]
    no_decay = [p for p in model.parameters() if p.ndim < 2 and p.requires_grad]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, tr.lr_lambda(10, total, 0.1))


def args(out, steps, batch, accum=1):
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_grad_norm=1.0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        accelerator_config={"dispatch_batches": False},
    )


def trainer_losses(world, out, kind="akl", steps=20, batch=8, accum=1, model=None, cache=None):
    from transformers import Trainer

    model = model or AutoModelForCausalLM.from_pretrained(world["llama"])
    data = CacheDataset(cache or world["cache"])
    t = Trainer(
        model=model,
        args=args(out, steps, batch, accum),
        train_dataset=data.plan_order(0, batch),
        data_collator=DistillCollator(models.load_tokenizer(world["llama"])),
        compute_loss_func=distill_loss(kind, sketch_basis=data.sketch_basis),
        optimizers=optimizer(model, 3e-3, steps),
    )
    t.train()
    return [h["loss"] for h in t.state.log_history if "loss" in h], model


@pytest.mark.parametrize("sketched", [False, True])
def test_trainer_with_these_pieces_follows_pipeline_train_step_for_step(world, tmp_path, sketched):
    """With a teacher sketch too: its basis reaches distill_loss from CacheDataset.sketch_basis."""
    cache = world["cache"]
    if sketched:
        cache = str(tmp_path / "sketched")
        data = DataConfig(world["train"], prompt_field="prompt", response_field="response")
        ct.run(
            ct.CacheTeacherConfig(
                teacher=str(world["root"] / "teacher/final"), data=data, out=cache, top_p=0.5, tail_draws=8,
                sketch_rank=8, part_size=32, progress=False,
            )
        )  # fmt: skip
    got, _ = trainer_losses(world, tmp_path / "hf", cache=cache)
    tr.run(
        TrainConfig.of(
            student=world["llama"],
            out=str(tmp_path / "ours"),
            loss="akl",
            cache=cache,
            max_steps=20,
            batch_size=8,
            lr=3e-3,
            progress=False,
            log_every=1,
        )
    )
    want = [json.loads(l)["loss"] for l in open(tmp_path / "ours/metrics.jsonl")]
    assert len(got) == len(want) == 20
    for g, w in zip(got, want):
        assert abs(g - w) <= 2e-3 * abs(w) + 1e-4, (got, want)


def test_accumulation_normalizes_over_the_accumulated_batch(world, tmp_path):
    """2 micro-batches of 4 accumulate to the step of one batch of 8: token-weighted, not a mean of means."""
    a, _ = trainer_losses(world, tmp_path / "a", batch=8, steps=4)
    b, _ = trainer_losses(world, tmp_path / "b", batch=4, accum=2, steps=4)
    for x, y in zip(a, b):
        assert abs(x - y) <= 2e-3 * abs(x) + 1e-4, (a, b)


def test_a_lora_student_trains_its_adapters_only(world, tmp_path):
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(world["llama"])
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    data, collate, loss = (
        CacheDataset(world["cache"]),
        DistillCollator(models.load_tokenizer(world["llama"])),
        distill_loss("akl"),
    )
    fixed = collate([data[i] for i in range(16)])

    def fixed_loss():
        with torch.no_grad():
            inputs = {k: v for k, v in fixed.items() if k != "labels"}
            return float(loss(model(**inputs), fixed["labels"]))

    start = fixed_loss()
    trainer_losses(world, tmp_path / "lora", steps=30, model=model)
    assert fixed_loss() < 0.95 * start
    adapters = [n for n, p in model.named_parameters() if "lora_B" in n]
    assert adapters and all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    changed = {
        n
        for n, p in model.named_parameters()
        if "lora_" not in n
        and not torch.equal(p, before[n.replace("base_model.model.", "").replace(".base_layer", "")])
    }
    assert not changed, changed


def test_packed_batches_and_the_distill_trainer(world, tmp_path):
    from pipeline.hf import DistillTrainer

    model = AutoModelForCausalLM.from_pretrained(world["llama"])
    tok = models.load_tokenizer(world["llama"])
    t = DistillTrainer(
        model=model,
        args=args(tmp_path, 3, 8),
        train_dataset=CacheDataset(world["cache"]),
        data_collator=DistillCollator(tok, pack_length=256),
        loss_func=distill_loss("fkl", 0.5),
        plan_seed=0,
    )
    t.train()
    assert len([h for h in t.state.log_history if "loss" in h]) == 3


ACCELERATE = """
import sys, json, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from pipeline import models
from pipeline.hf import CacheDataset, DistillCollator, distill_loss
model = AutoModelForCausalLM.from_pretrained({llama!r})
args = TrainingArguments(output_dir={out!r}, max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                         remove_unused_columns=False)
t = Trainer(model=model, args=args, train_dataset=CacheDataset({cache!r}),
            data_collator=DistillCollator(models.load_tokenizer({llama!r})), compute_loss_func=distill_loss("akl"))
t.train()
if t.args.process_index == 0:
    print(json.dumps({{"world": t.args.world_size, "losses": [h["loss"] for h in t.state.log_history if "loss" in h]}}))
"""


@pytest.mark.distributed
def test_accelerate_launches_ddp_on_two_cpu_processes(world, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        ACCELERATE.format(
            root=str(ROOT),
            tests=str(ROOT / "tests"),
            llama=world["llama"],
            out=str(tmp_path / "o"),
            cache=world["cache"],
        )
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(tiny.free_port()),
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])
    assert out["world"] == 2 and len(out["losses"]) == 3 and all(x == x for x in out["losses"])


def test_trl_sft_trainer_runs_the_distillation_loss(world, tmp_path):
    """The README's TRL example: SFTTrainer with its dataset preparation skipped and compute_loss overridden."""
    trl = pytest.importorskip("trl")

    class DistillSFTTrainer(trl.SFTTrainer):
        loss_func = staticmethod(distill_loss("akl"))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = self.loss_func(outputs, labels, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    tok = models.load_tokenizer(world["llama"])
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
        accelerator_config={"dispatch_batches": False},
    )
    t = DistillSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(world["llama"]),
        args=args,
        train_dataset=CacheDataset(world["cache"]).to_hf_dataset(),
        data_collator=DistillCollator(tok),
        processing_class=tok,
    )
    t.train()
    got = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(got) == 4 and all(0 < x < 10 for x in got)


def test_distill_loss_refuses_an_unknown_kind_and_out_of_range_values():
    from pipeline.hf import distill_loss

    with pytest.raises(ValueError, match="unknown loss kind 'xyz'"):
        distill_loss("xyz")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        distill_loss("ce", kd_ratio=2.0)
    distill_loss("pg"), distill_loss("ce")  # no divergence, still accepted
