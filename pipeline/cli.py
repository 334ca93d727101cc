"""The `pipeline` command: a thin layer that turns options into a stage's config and calls it."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from dataclasses import MISSING

import click

from pipeline import config
from storage.backends import BACKENDS
from storage.part import ID_CODECS, LOGPROB_CODECS

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


def options(cls, optional=()):
    """The click options of a config dataclass's fields (pipeline.config): flag, help, choices, repeatable, required.
    Defaults stay in the dataclass: an option not given is not passed, and its default is only shown here."""

    def decorate(fn):
        for f in reversed(config.option_fields(cls)):
            fn = click.option(*declarations(f), **settings(f, required=f.name not in optional))(fn)
        return fn

    return decorate


def declarations(f) -> tuple[str, ...]:
    flag = config.flag_of(f)
    on_by_default = config.value_type(f)[0] is bool and f.default is True
    return (f"{flag}/--no-{flag[2:]}" if on_by_default else flag, config.key_of(f))


def settings(f, required: bool) -> dict:
    kind, repeatable = config.value_type(f)
    meta = f.metadata
    kw = {"help": meta["help"]}
    if f.default is MISSING and f.default_factory is MISSING:
        kw["required"] = required
    if kind is bool:
        return kw | {"is_flag": True, "default": f.default}
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    if default not in (None, (), MISSING):
        kw["help"] += f"  [default: {', '.join(map(str, default)) if repeatable else default}]"
    if meta.get("parse"):  # written as one string (I/N, 0,6,12) and parsed by the config
        return kw | {"type": str}
    if meta.get("choices"):  # checked by the config, so that a wrong one is a one-line error like every other
        kw["metavar"] = "[" + "|".join(meta["choices"]) + "]"
    return kw | {"type": kind, "multiple": repeatable}


def given(kw: dict) -> dict:
    """The options the user gave (the others take the config's defaults)."""
    return {k: v for k, v in kw.items() if v is not None and v != ()}


def pop_data(kw: dict):
    """The DataConfig of a command's data options (removed from `kw`); None without --data."""
    values = given({config.key_of(f): kw.pop(config.key_of(f), None) for f in config.option_fields(config.DataConfig)})
    return config.build(config.DataConfig, values) if values.get("data") else None


@click.group()
@click.version_option(package_name="distill-cache")
@click.option("--debug", is_flag=True, help="show the traceback of every error (also: DISTILL_DEBUG=1)")
def main(debug):
    """Cache a teacher's top-k distributions once; distill many students from the cache."""
    if debug:
        os.environ["DISTILL_DEBUG"] = "1"


@main.command("cache-teacher")
@options(config.CacheTeacherConfig)
@options(config.DataConfig)
@one_line_errors
def cache_teacher(**kw):
    """Run a teacher over a dataset and store its top-k log-probs, exact tail mass and target log-probs."""
    from stages import cache_teacher as stage

    data = pop_data(kw)
    options = given(kw)
    result = stage.run(config.build(config.CacheTeacherConfig, options | {"data": data, "stated": tuple(options)}))
    report_cache(result, data)
    return result


def report_cache(result: dict, data) -> None:
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
@options(config.TrainConfig)
@options(config.DataConfig, optional=("source",))
@click.option("--eval-data", help="held-out dataset for eval CE (the fields of --data)")
@click.option("--eval-split", help="its split (default: the --split default)")
@one_line_errors
def train(eval_data, eval_split, **kw):
    """Distill a student from a teacher cache (or the teacher online), or fine-tune it on a dataset (--loss ce)."""
    from stages import train as stage

    fields = {k: kw.get(k) for k in ("prompt_field", "response_field", "text_field", "text_end", "max_length")}
    data = pop_data(kw)
    held_out = pop_data(dict(fields, data=eval_data, split=eval_split)) if eval_data else None
    summary = stage.run(config.build(config.TrainConfig, given(kw) | {"data": data, "eval_data": held_out}))
    click.echo(
        f"trained {summary['steps']} steps ({summary['tokens']} tokens, {summary['nonfinite']} skipped) "
        f"in {summary['seconds']:.1f}s; model in {kw['out']}/final"
    )
    return summary


@main.command()
@options(config.EvalConfig)
@options(config.DataConfig)
@one_line_errors
def evaluate(**kw):
    """Held-out NLL/perplexity, ROUGE-L and exact match of greedy generations, KL to the teacher."""
    from stages import evaluate as stage

    data = pop_data(kw)
    metrics = stage.run(config.build(config.EvalConfig, given(kw) | {"data": data}))
    click.echo(" ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


@main.command()
@options(config.GenerateConfig)
@one_line_errors
def generate(**kw):
    """The student samples responses to prompts (on-policy data for cache-teacher)."""
    from stages import generate as stage

    r = stage.run(config.build(config.GenerateConfig, given(kw)))
    click.echo(f"wrote {r['samples']} samples, {r['tokens']} tokens ({r['tokens_per_s']:.0f} tok/s) to {r['path']}")
    return r


@main.command()
@click.argument("evals", nargs=-1, required=True)
@options(config.ReportConfig)
@one_line_errors
def report(evals, **kw):
    """Gather evaluation JSONs into a Markdown table with PNG plots."""
    from stages import report as stage

    click.echo(f"wrote {stage.run(config.build(config.ReportConfig, given(kw) | {'evals': list(evals)}))}")


@main.command("prepare-demo")
@options(config.DemoDataConfig)
@one_line_errors
def prepare_demo(**kw):
    """Generate the embedded default: instruction tasks with checkable answers, optional pretraining text (the
    standard library's sources) and a tokenizer trained on both."""
    from stages import prepare_demo as stage

    click.echo(json.dumps(stage.run(config.build(config.DemoDataConfig, given(kw)))))


@main.command("prepare-data")
@options(config.PrepareDataConfig)
@one_line_errors
def prepare_data(**kw):
    """Write train/test JSONL (prompt, response) from any datasets source."""
    from stages import prepare_data as stage

    click.echo(json.dumps(stage.run(config.build(config.PrepareDataConfig, given(kw)))))


@main.command("prepare-docstrings")
@options(config.DocstringDataConfig)
@one_line_errors
def prepare_docstrings(**kw):
    """Write train/test JSONL of instruction pairs from the standard library's docstrings (real text, offline)."""
    from stages import prepare_docstrings as stage

    click.echo(json.dumps(stage.run(config.build(config.DocstringDataConfig, given(kw)))))


@main.command("init-model")
@options(config.ModelConfig)
@one_line_errors
def init_model(**kw):
    """Save a freshly initialized small causal LM with a tokenizer (for the offline demo)."""
    from stages import prepare_demo as stage

    click.echo(stage.save_model(config.build(config.ModelConfig, given(kw))))


@main.command("init-student")
@options(config.InitStudentConfig)
@one_line_errors
def init_student(**kw):
    """Write a depth-pruned copy of a model (the kept layers, embeddings, final norm and head) to start a student."""
    from stages import prepare_model as stage

    r = stage.prune(config.build(config.InitStudentConfig, given(kw)))
    click.echo(f"wrote {r['path']}: {r['layers']} of {r['of']} layers, {r['parameters'] / 1e6:.1f}M parameters")
    return r


@main.command("export-model")
@click.argument("model")
@click.argument("out")
@options(config.ExportModelConfig)
@one_line_errors
def export_model(model, out, **kw):
    """Save a model (e.g. a .gguf file, dequantized) once as safetensors with its tokenizer, for fast loading."""
    from stages import prepare_model as stage

    r = stage.export(config.build(config.ExportModelConfig, given(kw) | {"model": model, "out": out}))
    click.echo(f"wrote {r['path']}: {r['parameters'] / 1e6:.1f}M parameters")
    return r


@main.command()
@click.argument("cache")
@click.argument("out")
@options(config.ExportConfig)
@one_line_errors
def export(cache, out, **kw):
    """Write a cache as Parquet tables of one row per sample (datasets, Polars, DuckDB), or in axolotl's KD layout."""
    from stages import export as stage

    r = stage.run(config.build(config.ExportConfig, given(kw) | {"cache": cache, "out": out}))
    click.echo(f"wrote {r['parts_written']} of {r['num_parts']} parts ({r['rows']} samples) to {r['path']}")
    return r


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
@click.option("--format", "fmt", type=click.Choice(list(BACKENDS)), help="default: the source's")
@click.option("--top-k", type=int, help="narrow the rows to at most this many entries")
@click.option("--top-p", type=float, help="narrow the rows to this mass")
@click.option("--min-k", type=int)
@click.option("--ids", "id_codec", type=click.Choice(list(ID_CODECS)))
@click.option("--logprob-dtype", type=click.Choice(list(LOGPROB_CODECS)))
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
