"""The `pipeline` command: a thin layer that turns options into a stage's config and calls it."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys

import click

LOGPROB_CHOICES = ("float16", "float32", "q8", "q6", "q5", "q4", "q3", "q2")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def one_line_errors(fn):
    """Bad input (the project's own errors) and a full disk print one line `error: …` and exit 1; anything else is a
    bug or a machine failure and keeps its traceback. --debug shows the traceback of every error."""
    from pipeline.errors import ONE_LINE

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        try:
            return fn(*args, **kw)
        except ONE_LINE as e:
            fail(e, str(e))
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            fail(
                e,
                f"a write{' to ' + str(e.filename) if e.filename else ''} failed: {os.strerror(e.errno)}; free "
                "space (or raise the limit) and run the command again: finished parts and checkpoints are kept",
            )

    return wrapper


def fail(error: BaseException, message: str):
    if os.environ.get("DISTILL_DEBUG"):
        raise error
    lines = message.strip().splitlines()
    click.echo(f"error: {lines[0] if lines else type(error).__name__}", err=True)
    sys.exit(1)


def data_options(fn, required=True):
    for opt in reversed(
        [
            click.option(
                "--data",
                "source",
                required=required,
                help="jsonl/json/parquet/csv/arrow file, saved dataset folder, or hub name",
            ),
            click.option("--split", default="train", show_default=True),
            click.option("--prompt-field"),
            click.option("--response-field"),
            click.option("--text-field"),
            click.option("--max-length", default=1024, show_default=True, type=int),
            click.option("--limit", type=int, help="use only the first N samples"),
            click.option("--response-ids-field", help="generated rows: the response's token ids, used as they are"),
            click.option("--behavior-field", help="generated rows: the sampler's log-prob of each response token"),
        ]
    ):
        fn = opt(fn)
    return fn


DATA_KEYS = (
    "source",
    "split",
    "prompt_field",
    "response_field",
    "text_field",
    "max_length",
    "limit",
    "response_ids_field",
    "behavior_field",
)


def pop_data_options(kw: dict) -> dict:
    """The data options' values, removed from a command's options."""
    return {k: kw.pop(k, None) for k in DATA_KEYS}


def data_config(values: dict, **changes):
    """The DataConfig of data option values, with `changes`; None without a source."""
    from pipeline.data import DataConfig

    values = {**values, **changes}
    return DataConfig(**{k: v for k, v in values.items() if v is not None}) if values["source"] else None


def parse_shard(value):
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not of the form I/N, e.g. 0/4")
    return (i, n)


@click.group()
@click.version_option(package_name="distill-cache")
@click.option("--debug", is_flag=True, help="show the traceback of every error (also: DISTILL_DEBUG=1)")
def main(debug):
    """Cache a teacher's top-k distributions once; distill many students from the cache."""
    if debug:
        os.environ["DISTILL_DEBUG"] = "1"


@main.command("cache-teacher")
@click.option("--teacher", required=True, help="Hugging Face causal LM: local path or hub name")
@data_options
@click.option("--top-k", default=64, show_default=True, type=int, help="largest row width")
@click.option(
    "--top-p", type=float, help="keep per row the smallest teacher-sorted prefix with this mass (ragged rows)"
)
@click.option("--min-k", default=1, show_default=True, type=int, help="narrowest row with --top-p")
@click.option(
    "--ids",
    type=click.Choice(["plain", "bitpack"]),
    default="plain",
    show_default=True,
    help="token id encoding: narrowest integer, or ceil(log2 V) bits",
)
@click.option(
    "--logprob-dtype",
    type=click.Choice(list(LOGPROB_CHOICES)),
    default="float16",
    show_default=True,
    help="float16/float32, or qB: B-bit power quantization (rows still sum to 1 with the exact tail)",
)
@click.option(
    "--tail-draws",
    default=0,
    show_default=True,
    type=int,
    help="tokens drawn per row from the teacher's tail (Random-Sampling KD); 0: none",
)
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the tail draws")
@click.option("--temperature", "temperatures", multiple=True, type=float, help="repeatable; default 1.0")
@click.option("--format", type=click.Choice(["zarr", "arrow"]), default="zarr", show_default=True)
@click.option("--out", help="cache folder")
@click.option("--cache-root", help="folder of caches named by cache key (instead of --out)")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--batch-tokens", type=int, help="padded-token budget per batch (instead of --batch-size)")
@click.option(
    "--dtype", default="auto", show_default=True, help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16"
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option(
    "--tp",
    default=1,
    show_default=True,
    type=int,
    help="tensor-parallel size under torchrun: WORLD_SIZE / TP groups each fill their own shard",
)
@click.option("--device-map", help="spread the teacher over this process's devices: auto, balanced, sequential")
@click.option("--max-memory", help="with --device-map: per-device limits, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
@click.option("--shard", help="I/N: fill only parts p with p mod N = I (torchrun groups split it further)")
@click.option("--part-size", default=256, show_default=True, type=int, help="samples per part")
@click.option("--num-proc", default=1, show_default=True, type=int, help="tokenizer processes")
@click.option(
    "--overwrite",
    is_flag=True,
    help="replace a different cache at --out (the old one stays until the new one is whole)",
)
@click.option("--strict", is_flag=True, help="abort on non-finite teacher logits instead of skipping the sample")
@click.option("--trust-remote-code", is_flag=True)
@one_line_errors
def cache_teacher(temperatures, shard, **kw):
    """Run a teacher over a dataset and store its top-k log-probs, exact tail mass and target log-probs."""
    from stages import cache_teacher as stage

    data = data_config(pop_data_options(kw))
    cfg = stage.CacheTeacherConfig(
        data=data, temperatures=tuple(temperatures) or (1.0,), shard=parse_shard(shard), **kw
    )
    result = stage.run(cfg)
    if result["status"] == "hit":
        click.echo(f"cache hit: {result['path']} (key {result['manifest']['cache_key'][:16]})")
        return
    if not result.get("writer", True):  # the other ranks of a tensor-parallel group write nothing
        return
    m = result["manifest"]
    wrote = (
        f"{result['status']}: {result['path']}; wrote {result['parts_written']} parts, {result['samples']} samples, "
        f"{result['tokens']} tokens in {result['seconds']:.1f}s"
    )
    if not m:
        click.echo(wrote + "; other shards still to finish")
        return
    click.echo(
        f"{wrote}; {m['counts']['samples']} samples in all, {m['counts'].get('truncated_samples', 0)} truncated at "
        f"--max-length {data.max_length}, {m['counts'].get('skipped_samples', 0)} skipped"
    )


@main.command()
@click.option(
    "--student", required=True, help="Hugging Face model (path or hub name), or a config with --init-from-config"
)
@click.option("--out", required=True, help="run folder")
@click.option(
    "--loss",
    default="fkl",
    show_default=True,
    help="ce, fkl, rkl, akl, jsd, tvd, sfkl, srkl, or pg (reverse-KL policy gradient on generated tokens)",
)
@click.option("--cache", multiple=True, help="teacher cache to distill from; repeat to mix several (with --mix)")
@click.option(
    "--mix",
    multiple=True,
    type=float,
    help="share of each --cache per micro-batch; with two caches one value: the second's share λ (GKD)",
)
@click.option("--teacher", help="run this teacher online over --data instead of a cache (the fidelity reference)")
@click.option("--online-topk", type=int, help="with --teacher: top-k + exact tail computed on the fly (default: dense)")
@click.option("--teacher-device-map", help="with --teacher: spread it over devices (auto), e.g. beside the student")
@lambda fn: data_options(fn, required=False)
@click.option(
    "--init-from-config", is_flag=True, help="initialize the student from --student's config, not its weights"
)
@click.option("--tokenizer", help="tokenizer for --init-from-config")
@click.option("--kd-ratio", type=float, help="weight of KD in (1 - r)·CE + r·KD; default 1 (0 for ce)")
@click.option("--mu", default=0.5, show_default=True, type=float, help="AKL head mass")
@click.option("--beta", default=0.5, show_default=True, type=float, help="JSD mixture weight")
@click.option("--alpha", default=0.1, show_default=True, type=float, help="skew KL weight")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="must be one the cache holds")
@click.option(
    "--tail",
    type=click.Choice(["bucket", "renormalize"]),
    default="bucket",
    show_default=True,
    help="the teacher's tail as one exact bin, or dropped with the head renormalized (the peers' default)",
)
@click.option(
    "--lr",
    default=2e-5,
    show_default=True,
    type=float,
    help="peak learning rate (a pretrained student's; the demo sets its own)",
)
@click.option("--min-lr-ratio", default=0.1, show_default=True, type=float, help="cosine floor as a fraction of --lr")
@click.option("--warmup-steps", default=10, show_default=True, type=int)
@click.option("--weight-decay", default=0.01, show_default=True, type=float)
@click.option("--grad-clip", default=1.0, show_default=True, type=float)
@click.option(
    "--batch-size", default=8, show_default=True, type=int, help="samples per micro-batch, all ranks together"
)
@click.option("--batch-tokens", type=int, help="padded-token budget per micro-batch (instead of --batch-size)")
@click.option("--grad-accum", default=1, show_default=True, type=int)
@click.option("--epochs", default=1, show_default=True, type=int)
@click.option("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--packing", is_flag=True, help="pack samples into rows of --pack-length tokens, no padding")
@click.option("--pack-length", default=2048, show_default=True, type=int)
@click.option(
    "--part-size",
    default=256,
    show_default=True,
    type=int,
    help="with --data: the cache-teacher part size whose epoch plan to follow",
)
@click.option("--fsdp", is_flag=True, help="shard the student with FSDP2 (under torchrun)")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--attn-implementation", help="transformers attention: sdpa, eager, flash_attention_2, …")
@click.option("--eval-cache", help="held-out teacher cache for eval loss")
@click.option("--eval-data", help="held-out dataset for eval CE (same fields as --data)")
@click.option("--eval-split", default="train", show_default=True)
@click.option("--eval-every", default=0, show_default=True, type=int)
@click.option("--eval-samples", default=256, show_default=True, type=int)
@click.option("--save-every", default=0, show_default=True, type=int, help="checkpoint interval in steps")
@click.option("--log-every", default=10, show_default=True, type=int)
@click.option("--max-nonfinite", default=10, show_default=True, type=int, help="abort after this many skipped steps")
@click.option("--num-workers", default=0, show_default=True, type=int)
@click.option("--num-proc", default=1, show_default=True, type=int, help="tokenizer processes for --data")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto: bf16 on GPU, float32 on CPU")
@click.option("--resume", is_flag=True, help="continue from the run's latest checkpoint")
@click.option("--overwrite", is_flag=True, help="replace another run in --out (its checkpoints, model and metrics)")
@click.option("--allow-tokenizer-mismatch", is_flag=True)
@click.option(
    "--allow-offpolicy-pg",
    is_flag=True,
    help="--loss pg on a cache of data the student did not generate (its gradient is then biased)",
)
@click.option("--trust-remote-code", is_flag=True)
@one_line_errors
def train(eval_data, eval_split, **kw):
    """Distill a student from a teacher cache (or the teacher online), or fine-tune it on a dataset (--loss ce)."""
    from stages import train as stage

    fields = pop_data_options(kw)
    data = data_config(fields)
    held_out = dict(source=eval_data, split=eval_split, limit=None, response_ids_field=None, behavior_field=None)
    eval_cfg = data_config(fields, **held_out) if eval_data else None
    summary = stage.run(stage.TrainConfig(data=data, eval_data=eval_cfg, **kw))
    click.echo(
        f"trained {summary['steps']} steps ({summary['tokens']} tokens, {summary['nonfinite']} skipped) "
        f"in {summary['seconds']:.1f}s; model in {kw['out']}/final"
    )


@main.command()
@click.option("--model", required=True, help="model folder (e.g. RUN/final) or hub name")
@data_options
@click.option("--out", required=True, help="metrics JSON")
@click.option("--teacher-cache", help="cache of this split, for KL to the teacher (top-k + tail bucket)")
@click.option("--teacher", help="the teacher model, for the exact full-vocabulary KL on this split")
@click.option("--answer-field", default="answer", show_default=True, help="column with a checkable answer, if any")
@click.option("--max-new-tokens", default=48, show_default=True, type=int)
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--no-generate", is_flag=True, help="skip generation (NLL and KL only)")
@click.option("--label", help="row name in the report (default: the run folder's name)")
@click.option("--run", help="training run folder, for learning curves in the report")
@click.option("--round", type=int, help="on-policy round of this model, for the per-round plot")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@one_line_errors
def evaluate(no_generate, **kw):
    """Held-out NLL/perplexity, ROUGE-L and exact match of greedy generations, KL to the teacher."""
    from stages import evaluate as stage

    cfg = stage.EvalConfig(data=data_config(pop_data_options(kw)), generate=not no_generate, **kw)
    metrics = stage.run(cfg)
    click.echo(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))


@main.command()
@click.option("--model", required=True, help="the student that samples (a folder, e.g. RUN/final)")
@click.option("--data", "source", required=True, help="prompts: any dataset --data accepts")
@click.option("--prompt-field", required=True)
@click.option("--split", default="train", show_default=True)
@click.option("--limit", type=int)
@click.option("--out", required=True, help="JSONL of rows: the prompt row + response, token ids, log-probs")
@click.option("--samples-per-prompt", default=1, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=float, help="0: greedy")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--max-new-tokens", default=128, show_default=True, type=int)
@click.option("--max-prompt-length", default=1024, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--round", "round_", default=0, show_default=True, type=int, help="recorded in every row")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--teacher", help="with --alpha: sample each token from α·p_T + (1−α)·q_S (MiniLLM)")
@click.option("--alpha", default=0.0, show_default=True, type=float)
@click.option("--response-field", default="response", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--trust-remote-code", is_flag=True)
@one_line_errors
def generate(
    model,
    source,
    prompt_field,
    split,
    limit,
    out,
    samples_per_prompt,
    temperature,
    top_p,
    top_k,
    max_new_tokens,
    max_prompt_length,
    seed,
    round_,
    batch_size,
    teacher,
    alpha,
    response_field,
    device,
    dtype,
    trust_remote_code,
):
    """The student samples responses to prompts (on-policy data for cache-teacher)."""
    from stages import generate as stage

    r = stage.run(
        stage.GenerateConfig(
            model=model,
            source=source,
            prompt_field=prompt_field,
            out=out,
            split=split,
            limit=limit,
            max_prompt_length=max_prompt_length,
            samples_per_prompt=samples_per_prompt,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            seed=seed,
            round=round_,
            batch_size=batch_size,
            teacher=teacher,
            alpha=alpha,
            response_field=response_field,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    )
    click.echo(f"wrote {r['samples']} samples, {r['tokens']} tokens ({r['tokens_per_s']:.0f} tok/s) to {r['path']}")


@main.command()
@click.argument("evals", nargs=-1, required=True)
@click.option("--out", default="results/report.md", show_default=True)
@click.option("--title", default="Distillation report", show_default=True)
@one_line_errors
def report(evals, out, title):
    """Gather evaluation JSONs into a Markdown table with PNG plots."""
    from stages import report as stage

    click.echo(f"wrote {stage.run(stage.ReportConfig(list(evals), out, title))}")


@main.command("prepare-demo")
@click.option("--out", required=True)
@click.option("--train-size", default=2000, show_default=True, type=int)
@click.option("--test-size", default=200, show_default=True, type=int)
@click.option("--vocab-size", default=600, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--pretrain-size",
    default=0,
    show_default=True,
    type=int,
    help="also write pretrain.jsonl: this many chunks of the Python standard library's sources",
)
@click.option("--pretrain-chars", default=600, show_default=True, type=int)
@one_line_errors
def prepare_demo(out, train_size, test_size, vocab_size, seed, pretrain_size, pretrain_chars):
    """Generate the embedded default: instruction tasks with checkable answers, optional pretraining text (the
    standard library's sources) and a tokenizer trained on both."""
    from stages import prepare_demo as stage

    click.echo(
        json.dumps(
            stage.run(stage.DemoDataConfig(out, train_size, test_size, vocab_size, seed, pretrain_size, pretrain_chars))
        )
    )


@main.command("prepare-data")
@click.option("--data", "source", required=True)
@click.option("--out", required=True)
@click.option("--prompt-field", default="instruction", show_default=True)
@click.option("--response-field", default="response", show_default=True)
@click.option("--context-field", help="appended to the prompt when present (dolly's `context`)")
@click.option("--split", default="train", show_default=True)
@click.option("--test-size", default=500, show_default=True, type=int)
@click.option("--limit", type=int)
@one_line_errors
def prepare_data(source, out, prompt_field, response_field, context_field, split, test_size, limit):
    """Write train/test JSONL (prompt, response) from any datasets source."""
    from stages import prepare_data as stage

    click.echo(
        json.dumps(
            stage.run(
                stage.PrepareDataConfig(
                    source, out, prompt_field, response_field, context_field, split, test_size, limit
                )
            )
        )
    )


@main.command("init-model")
@click.option("--tokenizer", required=True)
@click.option("--out", required=True)
@click.option("--arch", type=click.Choice(["gpt2", "llama"]), default="llama", show_default=True)
@click.option("--layers", default=2, show_default=True, type=int)
@click.option("--width", default=64, show_default=True, type=int)
@click.option("--heads", default=2, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@one_line_errors
def init_model(tokenizer, out, arch, layers, width, heads, seed):
    """Save a freshly initialized small causal LM with a tokenizer (for the offline demo)."""
    from stages import prepare_demo as stage

    click.echo(stage.save_model(out, tokenizer, arch, layers, width, heads, seed))


@main.command()
@click.argument("cache")
@one_line_errors
def verify(cache):
    """Check checksums, shapes, dtypes and values of every part; name the first bad one."""
    import storage

    m = storage.verify(cache)
    click.echo(
        f"ok: {cache}: {m['num_parts']} parts, {m['counts']['samples']} samples, "
        f"{m['counts']['distilled_positions']} distilled positions"
    )


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="print the statistics as JSON")
@one_line_errors
def inspect(cache, as_json):
    """Print the manifest summary and statistics of a cache."""
    import storage

    click.echo(json.dumps(storage.statistics(cache), indent=1) if as_json else storage.describe(cache))


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--format", "fmt", type=click.Choice(["zarr", "arrow"]), help="default: the source's")
@click.option("--top-k", type=int, help="narrow the rows to at most this many entries")
@click.option("--top-p", type=float, help="narrow the rows to this mass")
@click.option("--min-k", type=int)
@click.option("--ids", "id_codec", type=click.Choice(["plain", "bitpack"]))
@click.option("--logprob-dtype", type=click.Choice(list(LOGPROB_CHOICES)))
@click.option("--overwrite", is_flag=True)
@one_line_errors
def convert(src, dst, fmt, top_k, top_p, min_k, id_codec, logprob_dtype, overwrite):
    """Rewrite a cache (any version) as the current format, in another backend and/or encoding."""
    import storage

    m = storage.convert(
        src, dst, fmt, overwrite, top_k=top_k, top_p=top_p, min_k=min_k, ids=id_codec, logprobs=logprob_dtype
    )
    click.echo(f"converted {src} → {dst} ({m['backend']}, {m['encoding']['logprobs']['name']}, {m['num_parts']} parts)")


if __name__ == "__main__":
    main()
