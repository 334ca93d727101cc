"""The benchmarks drive the stages as a user does: through the `pipeline` command (options named as its flags)."""

from pathlib import Path

from pipeline.cli import main

# cache-teacher's flags for rows of --top-k tokens in float16 (its default before 0.2, with top-k 64)
TOP_K_ROWS = {"top_p": 1, "tail_draws": 0, "ids": "plain", "logprob_dtype": "float16"}


def pipeline(command: str, *arguments, **options):
    """Run `pipeline COMMAND ARGUMENT… --flag value …` in this process and return the stage's result. True is a bare
    flag, a tuple repeats its flag, None and False are left out."""
    args = [command, *map(str, arguments)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if v is True:
                args.append(flag)
            elif v is not None and v is not False:
                args += [flag, str(v)]
    return main(args, standalone_mode=False)


def exported_real_teacher() -> Path:
    """SmolLM2-135M-Instruct exported from its GGUF file once (bench/out/real/smollm2): the dequantization takes ~20 s
    a load, the export's safetensors load at once."""
    from tiny import smollm2_gguf  # tests/ on the path, as for every benchmark that uses the real teacher

    path = Path(__file__).parent / "out/real/smollm2"
    if not (path / "config.json").exists():
        pipeline("export-model", smollm2_gguf(), path)
    return path
