import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import build
from transformers import AutoModelForCausalLM

import storage
from pipeline import batches, losses, models, scoring, teachers
from pipeline.cli import main
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.errors import Diverged, OptionError
from stages import cache_teacher as ct
from stages import prepare_demo
from stages import train as tr

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher fine-tuned by SFT (so it is far from uniform), its caches of train and test, a fresh student."""
    root = tmp_path_factory.mktemp("train")
    paths = build(root, train_size=96, test_size=16, archs=("gpt2", "llama"))
    train_data = DataConfig(paths["train"], prompt_field="prompt", response_field="response")
    tr.run(
        TrainConfig.of(
            student=paths["gpt2"],
            out=str(root / "teacher"),
            loss="ce",
            data=train_data,
            max_steps=40,
            lr=3e-3,
            batch_size=16,
            progress=False,
            log_every=40,
        )
    )
    paths["teacher"] = str(root / "teacher/final")
    for split in ("train", "test"):
        ct.run(
            ct.CacheTeacherConfig(
                teacher=paths["teacher"],
                data=DataConfig(paths[split], prompt_field="prompt", response_field="response"),
                out=str(root / f"cache-{split}"),
                top_k=16,
                top_p=1,  # rows of 16 in float16: the online twin tests compare against them
                tail_draws=0,
                ids="plain",
                logprob_dtype="float16",
                temperatures=(1.0, 2.0),
                part_size=32,
                progress=False,
            )
        )
        paths[f"cache_{split}"] = str(root / f"cache-{split}")
    paths["root"] = root
    return paths


def heldout_kl(model_path, cache):
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tok = models.load_tokenizer(model_path)
    head = models.PositionLogits(model, len(tok))
    return scoring.score(head, model, teachers.cached([cache]), tok.pad_token_id, torch.device("cpu"), ("fkl",))["fkl"]


def distill(world, out, loss="fkl", **kw):
    cfg = dict(
        student=world["llama"],
        out=str(out),
        loss=loss,
        cache=world["cache_train"],
        max_steps=30,
        lr=3e-3,
        batch_size=8,
        progress=False,
        log_every=5,
    )
    return tr.run(TrainConfig.of(**{**cfg, **kw}))


# -- every loss brings the student closer to the teacher


@pytest.mark.parametrize("loss", losses.KINDS)
def test_every_loss_lowers_heldout_kl_to_the_teacher(world, tmp_path, loss):
    before = heldout_kl(world["llama"], world["cache_test"])
    distill(world, tmp_path / "run", loss)
    after = heldout_kl(str(tmp_path / "run/final"), world["cache_test"])
    assert after < 0.8 * before, (before, after)
    rows = [json.loads(l) for l in open(tmp_path / "run/metrics.jsonl")]
    assert rows[-1]["step"] == 30 and all(k in rows[-1] for k in ("loss", "ce", "kd", "lr", "tokens_per_s"))
    if loss == "akl":
        assert all(0 <= r["w_head"] <= 1 and r["g_head"] >= 0 and r["g_tail"] >= 0 for r in rows)


def test_sft_without_a_cache_lowers_ce(world, tmp_path):
    data = DataConfig(world["train"], prompt_field="prompt", response_field="response")
    tr.run(
        TrainConfig.of(
            student=world["llama"],
            out=str(tmp_path / "sft"),
            loss="ce",
            data=data,
            max_steps=30,
            lr=3e-3,
            progress=False,
            log_every=1,
        )
    )
    rows = [json.loads(l) for l in open(tmp_path / "sft/metrics.jsonl")]
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.5


def test_init_from_config_and_kd_mix_and_accumulation(world, tmp_path):
    s = distill(
        world,
        tmp_path / "r",
        "akl",
        student=world["llama"],
        init_from_config=True,
        tokenizer=world["tokenizer"],
        kd_ratio=0.5,
        grad_accum=2,
        batch_tokens=300,
        max_steps=4,
        eval_cache=world["cache_test"],
        eval_every=2,
    )
    assert s["steps"] == 4
    rows = [json.loads(l) for l in open(tmp_path / "r/metrics.jsonl")]
    assert any("eval_kd" in r for r in rows)
    AutoModelForCausalLM.from_pretrained(tmp_path / "r/final")


def test_accumulation_normalizes_over_the_whole_step(world, tmp_path):
    """2 micro-batches of 4 accumulate to the same update as one batch of 8 (token-weighted mean)."""
    distill(world, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3)
    distill(world, tmp_path / "b", batch_size=4, grad_accum=2, max_steps=3)
    a, b = load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# -- interruption: a killed run resumed ends bit-identical to an uninterrupted one


def test_sigkill_and_resume_is_bit_identical(world, tmp_path):
    args = [
        "train",
        "--student",
        world["gpt2"],
        "--cache",
        world["cache_train"],
        "--loss",
        "akl",
        "--max-steps",
        "150",
        "--batch-size",
        "4",
        "--save-every",
        "20",
        "--lr",
        "1e-3",
        "--log-every",
        "5",
    ]
    ref = CliRunner().invoke(main, args + ["--out", str(tmp_path / "ref")])
    assert ref.exit_code == 0, ref.output
    cmd = [sys.executable, "-m", "pipeline.cli"] + args + ["--out", str(tmp_path / "run")]
    env = tiny.killed_after_saves(tmp_path / "hook", 2)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((tmp_path / "run/checkpoints/latest.json").read_text())["step"] == 40
    assert not (tmp_path / "run/final").exists()
    subprocess.run(cmd + ["--resume"], cwd=ROOT, check=True, capture_output=True)
    a, b = load_file(tmp_path / "ref/final/model.safetensors"), load_file(tmp_path / "run/final/model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(l) for l in open(tmp_path / "run/metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(5, 151, 5))


PREVIOUS_SETTINGS = (  # the flat TrainConfig of the version before the grouped one, less resume/overwrite/progress
    "student out loss cache mix data teacher online_topk teacher_device_map init_from_config tokenizer kd_ratio mu "
    "beta alpha temperature tail lr min_lr_ratio warmup_steps weight_decay grad_clip batch_size batch_tokens "
    "grad_accum epochs max_steps seed packing pack_length part_size fsdp gradient_checkpointing attn_implementation "
    "eval_cache eval_data eval_every eval_samples save_every log_every max_nonfinite num_workers num_proc "
    "shuffle_window device dtype allow_offpolicy_pg allow_tokenizer_mismatch trust_remote_code"
)


def test_a_run_saved_by_the_previous_version_resumes(world, tmp_path):
    """Its run.json holds the settings as the flat config of that version wrote them (no --text-end, no cache: null
    for SFT); a plain-text SFT run started by it resumes and finishes."""
    data = DataConfig(world["train"], prompt_field="prompt", response_field="response")
    sft = dict(student=world["llama"], loss="ce", data=data, max_steps=4, save_every=2, progress=False)
    tr.run(TrainConfig.of(out=str(tmp_path / "r"), **sft))
    run = json.loads((tmp_path / "r/run.json").read_text())
    assert set(run["settings"]) == set(PREVIOUS_SETTINGS.split())
    assert run["settings"]["cache"] is None and "text_end" not in run["settings"]["data"]
    (tmp_path / "r/final").rename(tmp_path / "final")  # as if killed after the step-2 checkpoint
    assert tr.run(TrainConfig.of(out=str(tmp_path / "r"), resume=True, **sft))["steps"] == 4


def test_resume_with_other_settings_is_refused(world, tmp_path):
    distill(world, tmp_path / "r", max_steps=4, save_every=2)
    with pytest.raises(ValueError, match="different settings.*lr"):
        distill(world, tmp_path / "r", max_steps=4, save_every=2, lr=1e-2, resume=True)


# -- DDP: two CPU processes with gloo match one process


@pytest.mark.distributed
def test_ddp_two_processes_match_one(world, tmp_path):
    args = [
        "train",
        "--student",
        world["llama"],
        "--cache",
        world["cache_train"],
        "--loss",
        "jsd",
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
    ]
    single = CliRunner().invoke(main, args + ["--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    torchrun(args, tmp_path / "two")
    a, b = load_file(tmp_path / "one/final/model.safetensors"), load_file(tmp_path / "two/final/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two/summary.json").read_text())["world_size"] == 2


# -- refusals


def test_vocabulary_mismatched_student_is_refused(world, tmp_path):
    prepare_demo.save_tokenizer(tmp_path / "tok", ["completely different text " * 5], 280)
    small = prepare_demo.save_model(ModelConfig(tmp_path / "s", tmp_path / "tok", "llama", 1, 16, 2))
    res = CliRunner().invoke(
        main, ["train", "--student", small, "--cache", world["cache_train"], "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 1 and res.output.count("error:") == 1
    assert "cache holds token ids up to" in res.output or "tokenizer differs" in res.output
    assert not (tmp_path / "r/final").exists()


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--temperature", "3.0"], "temperature 3.0 is not in this cache; cached temperatures: 1.0, 2.0"),
        (["--loss", "kl"], "unknown --loss 'kl'; choose one of ce, fkl"),
        (["--loss", "akl", "--mu", "2"], "--mu 2.0 must lie in [0, 1]"),
    ],
)
def test_bad_training_options_are_one_line_errors(world, tmp_path, extra, expect):
    res = CliRunner().invoke(
        main,
        ["train", "--student", world["llama"], "--cache", world["cache_train"], "--out", str(tmp_path / "r")] + extra,
    )
    assert res.exit_code == 1 and expect in res.output and res.output.count("error:") == 1, res.output


def test_non_finite_losses_are_skipped_then_abort(world, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(world["llama"])
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    models.load_tokenizer(world["llama"]).save_pretrained(tmp_path / "nan")
    with pytest.raises(Diverged, match="non-finite losses"):
        with pytest.warns(UserWarning, match="step skipped"):
            distill(world, tmp_path / "r", student=str(tmp_path / "nan"), max_nonfinite=2)


def test_dataloader_workers_give_the_same_run(world, tmp_path):
    distill(world, tmp_path / "w0", max_steps=3)
    distill(world, tmp_path / "w2", max_steps=3, num_workers=2)
    a, b = load_file(tmp_path / "w0/final/model.safetensors"), load_file(tmp_path / "w2/final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_padded_embedding_rows_are_outside_the_softmax(world, tmp_path):
    """A student whose tables are padded past the tokenizer trains; the padded lm_head rows get no gradient."""
    tok = models.load_tokenizer(world["llama"])
    padded = prepare_demo.save_model(
        ModelConfig(tmp_path / "padded", world["tokenizer"], "llama", 2, 32, 2), vocab_size=len(tok) + 13
    )
    distill(world, tmp_path / "r", student=padded, max_steps=3, weight_decay=0.0)
    before = load_file(tmp_path / "padded/model.safetensors")["lm_head.weight"]
    after = load_file(tmp_path / "r/final/model.safetensors")["lm_head.weight"]
    assert after.shape[0] == len(tok) + 13
    assert torch.equal(before[len(tok) :], after[len(tok) :]) and not torch.equal(before[: len(tok)], after[: len(tok)])


# -- FSDP2 over 2 gloo processes, gradient checkpointing


def torchrun(args, out, env=None, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(tiny.free_port()), "-m", "pipeline.cli"] + args + ["--out", str(out)]  # fmt: skip
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, check=check, capture_output=True, timeout=300)


def weights(run):
    return load_file(Path(run) / "final/model.safetensors")


@pytest.mark.distributed
def test_fsdp_matches_one_process_and_resumes_bit_identically(world, tmp_path):
    """FSDP2 with gradient checkpointing on 2 ranks ends where one process without either does; killed with SIGKILL
    and resumed from its sharded checkpoint, it ends exactly where the uninterrupted FSDP run does; the final model
    is a consolidated folder from_pretrained loads."""
    args = [
        "train",
        "--student",
        world["llama"],
        "--cache",
        world["cache_train"],
        "--loss",
        "akl",
        "--max-steps",
        "24",
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--log-every",
        "4",
    ]
    single = CliRunner().invoke(main, args + ["--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    sharded = args + ["--fsdp", "--gradient-checkpointing", "--save-every", "4"]
    torchrun(sharded, tmp_path / "fsdp")
    a, b = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)
    AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp/final")

    killed = torchrun(sharded, tmp_path / "killed", env=tiny.killed_after_saves(tmp_path / "hook", 1), check=False)
    assert killed.returncode != 0 and not (tmp_path / "killed/final").exists(), "the kill did not land mid-run"
    assert json.loads((tmp_path / "killed/checkpoints/latest.json").read_text())["step"] == 4
    assert len(list((tmp_path / "killed/checkpoints").glob("step-*/tensors/*.safetensors"))) == 2, "a shard per rank"
    torchrun(sharded + ["--resume"], tmp_path / "killed")
    c = weights(tmp_path / "killed")
    for k in b:
        assert torch.equal(b[k], c[k]), k


def test_gradient_checkpointing_changes_nothing_but_memory(world, tmp_path):
    distill(world, tmp_path / "a", max_steps=3)
    distill(world, tmp_path / "b", max_steps=3, gradient_checkpointing=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# -- packing


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_batches_give_the_padded_loss_and_gradient(world, arch):
    """The same samples packed into rows with restarting position ids: same losses, same gradients; packed into one
    row they carry no padding at all."""
    teacher = teachers.cached([world["cache_train"]])
    samples = [teacher.source[i] for i in range(7)]
    total = sum(len(s["input_ids"]) for s in samples)
    model = AutoModelForCausalLM.from_pretrained(world[arch])
    tok = models.load_tokenizer(world[arch])
    head = models.PositionLogits(model, len(tok))
    out = {}
    for pack in (None, 128, total):
        b = batches.collate(samples, tok.pad_token_id, pack)
        model.zero_grad()
        terms = losses.batch_losses(scoring.forward(head, b, False), b, teacher.fields(b), "akl")
        (terms["kd"] + terms["ce"]).backward()
        out[pack] = (terms, {n: p.grad.clone() for n, p in model.named_parameters()}, b["input_ids"].shape)
    assert out[total][2] == (1, total) and out[128][2][0] > 1
    pad, g_pad, _ = out[None]
    for pack in (128, total):
        for key in ("kd", "ce"):
            torch.testing.assert_close(pad[key], out[pack][0][key], rtol=1e-5, atol=1e-5)
        for n in g_pad:
            torch.testing.assert_close(g_pad[n], out[pack][1][n], rtol=1e-4, atol=1e-6)


def test_packed_training_matches_padded_training(world, tmp_path):
    distill(world, tmp_path / "pad", max_steps=3)
    distill(world, tmp_path / "pack", max_steps=3, packing=True, pack_length=96)
    a, b = weights(tmp_path / "pad"), weights(tmp_path / "pack")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# -- the online teacher and the tail options


def train_data(world):
    return DataConfig(world["train"], prompt_field="prompt", response_field="response")


def test_online_teacher_sees_the_cache_runs_batches(world, tmp_path):
    """--teacher over the data with top-k + tail on the fly follows the cache run step for step: same batches, same
    schedule, the same losses up to the cache's float16 log-probs."""
    distill(world, tmp_path / "cache", loss="akl", max_steps=4, log_every=1)
    distill(
        world,
        tmp_path / "online",
        loss="akl",
        max_steps=4,
        log_every=1,
        cache=None,
        teacher=world["teacher"],
        data=train_data(world),
        online_topk=16,
        part_size=32,
    )
    a = [json.loads(l) for l in open(tmp_path / "cache/metrics.jsonl")]
    b = [json.loads(l) for l in open(tmp_path / "online/metrics.jsonl")]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["tokens_per_s"] and abs(x["loss"] - y["loss"]) < 2e-3 * abs(x["loss"]), (x, y)


def test_dense_online_reference_lowers_heldout_kl(world, tmp_path):
    before = heldout_kl(world["llama"], world["cache_test"])
    distill(
        world,
        tmp_path / "run",
        "fkl",
        cache=None,
        teacher=world["teacher"],
        data=train_data(world),
        eval_data=DataConfig(world["test"], prompt_field="prompt", response_field="response"),
        eval_every=30,
    )
    assert heldout_kl(str(tmp_path / "run/final"), world["cache_test"]) < 0.8 * before
    rows = [json.loads(l) for l in open(tmp_path / "run/metrics.jsonl")]
    assert "eval_kd" in rows[-1]


def test_renormalized_tail_trains_and_differs_from_the_bucket(world, tmp_path):
    distill(world, tmp_path / "bucket", max_steps=3)
    distill(world, tmp_path / "renorm", max_steps=3, tail="renormalize")
    a, b = weights(tmp_path / "bucket"), weights(tmp_path / "renorm")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_a_cache_with_drawn_tail_tokens_trains_every_kind(world, tmp_path):
    ct.run(
        ct.CacheTeacherConfig(
            teacher=world["teacher"],
            data=train_data(world),
            out=str(tmp_path / "c"),
            top_k=8,
            top_p=0.9,
            ids="bitpack",
            logprob_dtype="q8",
            tail_draws=16,
            part_size=32,
            progress=False,
        )
    )
    for kind in ("fkl", "akl", "jsd"):
        s = distill(world, tmp_path / kind, kind, cache=str(tmp_path / "c"), max_steps=2)
        assert s["nonfinite"] == 0


@pytest.mark.parametrize("loss", ["akl", "rkl"])
def test_a_cache_with_exact_draws_and_a_sketch_lowers_heldout_kl(world, tmp_path, loss):
    """The sketch (and its basis) reach the loss through the cached teacher: the student-weighted losses learn
    from it."""
    ct.run(
        ct.CacheTeacherConfig(
            teacher=world["teacher"], data=train_data(world), out=str(tmp_path / "c"), top_p=0.5, tail_draws=16,
            ids="bitpack", logprob_dtype="q8", sketch_rank=16, part_size=32, progress=False,
        )
    )  # fmt: skip
    before = heldout_kl(world["llama"], world["cache_test"])
    distill(world, tmp_path / "run", loss, cache=str(tmp_path / "c"))
    assert heldout_kl(str(tmp_path / "run/final"), world["cache_test"]) < 0.8 * before


def test_a_cache_of_draws_alone_trains_teacher_weighted_kinds_and_refuses_the_others(world, tmp_path):
    """Random-Sampling KD (no head): fkl learns from the draws; rkl/akl would see one bucket holding all the mass."""
    ct.run(
        ct.CacheTeacherConfig(
            teacher=world["teacher"],
            data=train_data(world),
            out=str(tmp_path / "c"),
            top_k=8,
            top_p=0.0,
            min_k=0,
            ids="bitpack",
            logprob_dtype="q8",
            tail_draws=16,
            part_size=32,
            progress=False,
        )
    )
    assert distill(world, tmp_path / "fkl", "fkl", cache=str(tmp_path / "c"), max_steps=2)["nonfinite"] == 0
    for kind, extra in (("rkl", {}), ("akl", {}), ("tvd", {}), ("jsd", {"beta": 1.0})):
        with pytest.raises(OptionError, match=f"--loss {kind}.* gets its signal from terms weighted by the student"):
            distill(world, tmp_path / kind, kind, cache=str(tmp_path / "c"), max_steps=2, **extra)
    with pytest.raises(OptionError, match="--tail renormalize renormalizes the head, and this cache has none"):
        distill(world, tmp_path / "renorm", "fkl", cache=str(tmp_path / "c"), max_steps=2, tail="renormalize")


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--fsdp"], "--fsdp runs under torchrun"),
        (["--teacher", "t"], "give --cache (a cached teacher) or --teacher (run online), not both"),
        (["--tail", "drop"], "unknown --tail 'drop'; choose one of bucket, renormalize"),
    ],
)
def test_bad_scaling_options_are_one_line_errors(world, tmp_path, extra, expect):
    res = CliRunner().invoke(
        main,
        ["train", "--student", world["llama"], "--cache", world["cache_train"], "--out", str(tmp_path / "r")] + extra,
    )
    assert res.exit_code != 0 and expect in res.output, res.output


# -- a run folder holds one run: never an input, never another run's checkpoints, resumed only on its own inputs


def cli_train(world, out, *extra, student=None, cache=None):
    return CliRunner().invoke(
        main,
        [
            "train",
            "--student",
            student or world["llama"],
            "--cache",
            cache or world["cache_train"],
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--log-every",
            "1",
            *extra,
        ],
    )


def test_an_out_that_is_or_touches_an_input_is_refused(world, tmp_path):
    shutil.copytree(world["llama"], tmp_path / "student")
    for out in (tmp_path / "student", tmp_path / "student/run", Path(world["cache_train"]) / "run"):
        res = cli_train(world, out, student=str(tmp_path / "student"))
        assert res.exit_code == 1 and "choose a run folder apart from the inputs" in res.output, res.output
    AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    storage.verify(world["cache_train"])


def test_another_runs_folder_is_refused_unless_overwritten(world, tmp_path):
    assert cli_train(world, tmp_path / "r", "--save-every", "1", "--max-steps", "3").exit_code == 0
    res = cli_train(world, tmp_path / "r", "--save-every", "1", "--max-steps", "3", "--lr", "1e-4")
    assert res.exit_code == 1 and "holds another run (it differs in lr)" in res.output, res.output
    res = cli_train(world, tmp_path / "r", "--save-every", "1", "--max-steps", "3")
    assert res.exit_code == 1 and "pass --resume to continue it or --overwrite" in res.output, res.output
    (tmp_path / "r/notes.txt").write_text("mine")
    assert cli_train(world, tmp_path / "r", "--lr", "1e-4", "--overwrite").exit_code == 0
    assert not (tmp_path / "r/checkpoints").exists() and (tmp_path / "r/notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "r/run.json").read_text())["settings"]["lr"] == 1e-4


def test_resume_is_refused_when_its_inputs_changed_or_nothing_was_saved(world, tmp_path):
    shutil.copytree(world["cache_train"], tmp_path / "cache")
    assert (
        cli_train(
            world, tmp_path / "r", "--save-every", "1", "--max-steps", "3", cache=str(tmp_path / "cache")
        ).exit_code
        == 0
    )
    ct.run(
        ct.CacheTeacherConfig(
            teacher=world["teacher"],
            data=train_data(world),
            out=str(tmp_path / "cache"),
            top_k=16,
            temperatures=(1.0, 2.0),
            part_size=32,
            progress=False,
            logprob_dtype="q8",
            overwrite=True,
        )
    )
    res = cli_train(
        world, tmp_path / "r", "--save-every", "1", "--max-steps", "3", "--resume", cache=str(tmp_path / "cache")
    )
    assert res.exit_code == 1 and "was started on other inputs (train:" in res.output, res.output
    assert cli_train(world, tmp_path / "fresh", "--save-every", "5").exit_code == 0
    res = cli_train(world, tmp_path / "fresh", "--save-every", "5", "--resume")
    assert res.exit_code == 1 and "holds no checkpoint yet" in res.output, res.output
    res = cli_train(world, tmp_path / "none", "--resume")
    assert res.exit_code == 1 and "holds no training run" in res.output, res.output


def test_a_damaged_cache_stops_training_with_one_line(world, tmp_path):
    """A deleted Zarr chunk read back as zeros (ids 0, tails 0) before reads were checked; now it names the part."""
    shutil.copytree(world["cache_train"], tmp_path / "cache")
    next((tmp_path / "cache/parts/part-000001/data.zarr/tail_logmass_0").rglob("c/*")).unlink()
    res = cli_train(world, tmp_path / "r", "--max-steps", "30", cache=str(tmp_path / "cache"))
    assert res.exit_code == 1 and "part-000001: file data.zarr/tail_logmass_0/c/0 is missing" in res.output, res.output


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing_half_written(world, tmp_path):
    """The file-size limit makes the checkpoint's tensor file fail to write (EFBIG), as a full disk would (ENOSPC)."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        "--student",
        world["llama"],
        "--cache",
        world["cache_train"],
        "--out",
        str(tmp_path / "r"),
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--batch-size",
        "4",
    ]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert res.returncode == 1 and len(lines) == 1 and "File too large" in lines[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and not list((tmp_path / "r").rglob(".tmp-*"))


def test_a_resumed_run_clears_what_a_killed_save_left(world, tmp_path):
    assert cli_train(world, tmp_path / "r", "--save-every", "1", "--max-steps", "3").exit_code == 0
    (tmp_path / "r/checkpoints/.tmp-step-00000009/tensors").mkdir(parents=True)
    (tmp_path / "r/checkpoints/.latest.json.dead0000").write_text("{}")
    assert cli_train(world, tmp_path / "r", "--save-every", "1", "--max-steps", "4", "--resume").exit_code == 1
    assert cli_train(world, tmp_path / "r", "--save-every", "1", "--max-steps", "3", "--resume").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "r/checkpoints").iterdir()) == [
        "latest.json",
        "step-00000001",
        "step-00000002",
    ]


def test_evaluate_scores_a_student_of_another_tokenizer_on_the_chunks_it_shares(world, tmp_path):
    """Another tokenizer (here: another chat template) cannot read the cache's ids: evaluate reports the chunk
    divergences of pipeline.cross_tokenizer instead of KL over the ids."""
    shutil.copytree(world["llama"], tmp_path / "student")
    tok = models.load_tokenizer(world["llama"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(tmp_path / "student")
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--model",
            str(tmp_path / "student"),
            "--data",
            world["test"],
            "--prompt-field",
            "prompt",
            "--response-field",
            "response",
            "--no-generate",
            "--teacher-cache",
            world["cache_test"],
            "--out",
            str(tmp_path / "e.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["chunk_alm_to_teacher"] > 0 and "fkl_to_teacher" not in metrics
