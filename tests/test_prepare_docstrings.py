"""prepare-docstrings: instruction pairs whose answers are the standard library's own documentation."""

import importlib
import inspect
import json

from click.testing import CliRunner

from pipeline.cli import main
from stages.prepare_docstrings import pairs


def test_every_answer_is_the_first_paragraph_of_the_named_objects_docstring():
    rows = pairs(300)
    assert len(rows) > 300
    for r in rows[::25]:
        module, _, name = r["name"].rpartition(".")
        doc = inspect.getdoc(getattr(importlib.import_module(module), name))
        assert r["response"] == " ".join(doc.split("\n\n")[0].split())
        assert r["prompt"].startswith("What does the Python ") and r["name"] in r["prompt"]
        assert 40 <= len(r["response"]) <= 300


def test_the_split_is_the_same_every_time_and_holds_out_test_size(tmp_path):
    for run in ("a", "b"):
        res = CliRunner().invoke(main, ["prepare-docstrings", "--out", str(tmp_path / run), "--test-size", "30"])
        assert res.exit_code == 0, res.output
    for split in ("train", "test"):
        assert (tmp_path / f"a/{split}.jsonl").read_text() == (tmp_path / f"b/{split}.jsonl").read_text()
    test = [json.loads(line) for line in open(tmp_path / "a/test.jsonl")]
    train = {json.loads(line)["name"] for line in open(tmp_path / "a/train.jsonl")}
    assert len(test) == 30 and not train & {r["name"] for r in test}
