"""Hostile caches and bad values: each ends in one line `error: …` and exit 1, within bounded time and memory.

A crafted cache has checksums that match its crafted bytes (an attacker recomputes them), so only the format's own
checks stand between it and a reader: paths outside the part, sizes the decoders would allocate by, codec widths.
Each command runs in a child process with its address space capped at 3 GiB and a 60 s timeout."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from synthetic import write_cache

import storage
from pipeline.cli import main
from storage import part_folder

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{Path(__file__).parent}"}


def bounded(*args, limit_bytes=3 << 30, fsize=None):
    """The command line in a child process with capped memory (and file size), as a CompletedProcess."""

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limits,
    )


def one_error_line(res) -> str:
    lines = [line for line in res.stderr.strip().splitlines() if line.startswith("error:")]
    assert res.returncode == 1 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


def reseal(cache: Path, p: int = 0) -> None:
    """Recompute part p's recorded checksums and the manifest's, as a forger would."""
    folder = cache / "parts" / f"part-{p:06d}"
    record = json.loads((folder / "part.json").read_text())
    files = {
        f.relative_to(folder).as_posix(): f.read_bytes()
        for f in folder.rglob("*")
        if f.is_file() and not f.is_symlink() and f.name != "part.json"
    }
    for rel, data in files.items():
        record["files"][rel], record["xxh3_128"][rel], record["sizes"][rel] = (
            part_folder.sha256(data),
            part_folder.fast_hash(data),
            len(data),
        )
    text = json.dumps(record).encode()
    (folder / "part.json").write_bytes(text)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["parts"][folder.name]["sha256"] = part_folder.record_sha256(text, record)
    (cache / "manifest.json").write_text(json.dumps(manifest))


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


# -- crafted caches


def point_at_dev_zero(c: Path):
    edit_json(c / "parts/part-000000/part.json", lambda r: r["files"].update({"../../../../../dev/zero": "0" * 64}))
    reseal(c)


def link_to_dev_zero(c: Path):
    (c / "parts/part-000000/data.zarr/zero").symlink_to("/dev/zero")


def thirty_bit_codes(c: Path):
    edit_json(c / "manifest.json", lambda m: m["encoding"]["logprobs"].update(bits=30))


def huge_zarr_shape(c: Path):
    meta = c / "parts/part-000000/data.zarr/input_ids/zarr.json"
    edit_json(meta, lambda z: z.update(shape=[10**12]))
    reseal(c)


def huge_counts(c: Path):
    edit_json(c / "manifest.json", lambda m: m["parts"]["part-000000"]["counts"].update(tokens=10**12))


def huge_part_count(c: Path):
    edit_json(c / "manifest.json", lambda m: m.update(num_parts=10**12))


def text_not_utf8(c: Path):
    import zarr

    text = zarr.open_array(c / "parts/part-000000/data.zarr/text", mode="r+")
    text[0] = 0xFF  # never the first byte of a UTF-8 character
    reseal(c)


@pytest.mark.parametrize(
    "craft,expect",
    [
        (point_at_dev_zero, "part-000000: file ../../../../../dev/zero is missing"),
        (link_to_dev_zero, "part-000000: data.zarr/zero is not a regular file"),
        (thirty_bit_codes, "encoding: logprobs"),
        (huge_zarr_shape, "array input_ids has shape (1000000000000,)"),
        (huge_counts, "decoded bytes"),
        (huge_part_count, "num_parts 1000000000000 does not cover"),
    ],
)
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_crafted_cache_is_a_one_line_error_in_bounded_time_and_memory(tmp_path, craft, expect, command):
    write_cache(tmp_path / "c", num_rows=8, part_size=4, ids="bitpack", logprob_dtype="q8")
    craft(tmp_path / "c")
    assert expect in one_error_line(bounded(command, tmp_path / "c"))


def test_verify_finds_a_text_that_is_not_utf8(tmp_path):
    """Texts are written from strings, so only a forger makes one that is not UTF-8: verify names it (a student of
    another tokenizer decodes it, and would fail)."""
    write_cache(tmp_path / "c", num_rows=8, part_size=4, text=True)
    text_not_utf8(tmp_path / "c")
    assert "prompt or text is not UTF-8" in one_error_line(bounded("verify", tmp_path / "c"))


# -- values that are not sensible do not pass


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--temperature", "nan"], "--temperature nan must be finite and positive"),
        (["--temperature", "inf"], "--temperature inf must be finite and positive"),
        (["--top-k", "4", "--min-k", "8", "--top-p", "0.5"], "--min-k 8 must lie between 0 and --top-k 4"),
        (["--top-p", "0", "--min-k", "0", "--tail-draws", "0"], "holds no teacher information"),
    ],
)
def test_cache_teacher_refuses_values_that_make_no_sense(tmp_path, extra, expect):
    res = CliRunner().invoke(
        main,
        [
            "cache-teacher",
            "--teacher",
            str(tmp_path),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--text-field",
            "text",
            "--out",
            str(tmp_path / "c"),
            *extra,
        ],
    )
    assert res.exit_code == 1 and expect in res.output, res.output
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", [["cache-teacher", "--teacher"], ["train", "--loss", "ce", "--student"]])
def test_a_folder_that_holds_no_model_is_one_line_naming_it(tmp_path, command):
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "empty").mkdir()
    args = [
        *command,
        tmp_path / "empty",
        "--data",
        tmp_path / "d.jsonl",
        "--text-field",
        "text",
        "--out",
        tmp_path / "o",
    ]
    res = CliRunner().invoke(main, list(map(str, args)))
    assert res.exit_code == 1 and "cannot load" in res.output and "empty" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_convert_refuses_an_encoding_without_teacher_information(tmp_path):
    write_cache(tmp_path / "a")
    res = CliRunner().invoke(
        main, ["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--top-p", "0", "--min-k", "0"]
    )
    assert res.exit_code == 1 and "holds no teacher information" in res.output and not (tmp_path / "b").exists()


def test_mix_with_one_cache_is_refused(tmp_path):
    write_cache(tmp_path / "a")
    res = CliRunner().invoke(
        main,
        [
            "train",
            "--student",
            str(tmp_path),
            "--cache",
            str(tmp_path / "a"),
            "--mix",
            "0.5",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 1 and "with one cache it would be ignored" in res.output, res.output


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--loss", "uld", "--teacher-tokenizer", "gpt2"], "--teacher-tokenizer maps the teacher's vocabulary"),
        (["--loss", "fkl", "--alm-tau", "10"], "--alm-tau is alm's temperature; --loss fkl does not use it"),
    ],
)
def test_an_option_the_loss_does_not_use_is_refused(tmp_path, extra, expect):
    """An option that would be silently ignored is a one-line error before anything loads."""
    write_cache(tmp_path / "a")
    args = ["train", "--student", str(tmp_path), "--cache", str(tmp_path / "a"), "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(main, args + extra)
    assert res.exit_code == 1 and expect in res.output and not (tmp_path / "r").exists(), res.output


def test_a_failed_json_write_leaves_no_temporary(tmp_path):
    with pytest.raises(TypeError):
        storage.manifest.write_json_atomic(tmp_path / "manifest.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback_of_an_input_error(tmp_path):
    write_cache(tmp_path / "c")
    huge_part_count(tmp_path / "c")
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--debug", "verify", str(tmp_path / "c")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "Traceback" in res.stderr and "CorruptCache" in res.stderr
