"""init-student and export-model: a depth-pruned student is the teacher's kept layers, embeddings, norm and head,
and runs (its KV cache included) like any model; an exported model is the same weights in a plain checkpoint."""

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import build
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    paths = build(root, train_size=8, test_size=4)
    for arch in ("gpt2", "llama"):  # four layers, so that pruning has something to choose
        model = AutoModelForCausalLM.from_pretrained(paths[arch])
        config = model.config
        config.num_hidden_layers = 4
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:1] * 4
        torch.manual_seed(1)
        deep = AutoModelForCausalLM.from_config(config)
        deep.save_pretrained(root / f"{arch}4")
        AutoTokenizer.from_pretrained(paths[arch]).save_pretrained(root / f"{arch}4")
        paths[f"{arch}4"] = str(root / f"{arch}4")
    return paths


def layer_key(name: str, arch: str) -> tuple[str, int] | None:
    """(name with the layer number cut out, layer number) of a decoder layer's weight, else None."""
    stack = "transformer.h." if arch == "gpt2" else "model.layers."
    if not name.startswith(stack):
        return None
    number, rest = name[len(stack) :].split(".", 1)
    return rest, int(number)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_pruned_student_is_the_teachers_kept_layers_embeddings_norm_and_head(tiny, tmp_path, arch):
    res = CliRunner().invoke(
        main, ["init-student", "--from", tiny[f"{arch}4"], "--layers", "0,2,3", "--out", str(tmp_path / "s")]
    )
    assert res.exit_code == 0, res.output
    assert "3 of 4 layers" in res.output
    teacher = load_file(f"{tiny[f'{arch}4']}/model.safetensors")
    student = load_file(tmp_path / "s/model.safetensors")
    kept = {0: 0, 2: 1, 3: 2}
    for name, w in teacher.items():
        key = layer_key(name, arch)
        if key is None:
            assert torch.equal(student[name], w), name  # embeddings, final norm, head
        elif key[1] in kept:
            new = name.replace(f".{key[1]}.{key[0]}", f".{kept[key[1]]}.{key[0]}")
            assert torch.equal(student[new], w), name
    assert len(student) == len(teacher) - len([n for n in teacher if (k := layer_key(n, arch)) and k[1] == 1])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_pruned_student_generates_with_its_kv_cache_as_without(tiny, tmp_path, arch):
    """Each kept layer is renumbered: with the teacher's numbers, layer 3 would look for a KV cache slot that a
    three-layer model does not have."""
    CliRunner().invoke(main, ["init-student", "--from", tiny[f"{arch}4"], "--layers", "1,3", "--out", str(tmp_path)])
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[5, 17, 9, 33]])
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    ids = prompt
    for _ in range(6):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize(
    "layers,expect",
    [
        ("0,4", "layer 4 is outside the model's 4 layers, 0 to 3"),
        ("2,1", "must be distinct and ascending"),
        ("1,1", "must be distinct and ascending"),
        ("0,x", "is not a comma-separated list of layer numbers"),
        ("-1,2", "--layers -1 must be at least 0"),
    ],
)
def test_a_bad_layer_list_is_a_one_line_error_that_writes_nothing(tiny, tmp_path, layers, expect):
    res = CliRunner().invoke(
        main, ["init-student", "--from", tiny["llama4"], "--layers", layers, "--out", str(tmp_path / "s")]
    )
    assert res.exit_code == 1 and expect in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "s").exists()


def test_an_existing_folder_is_not_replaced(tiny, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    for cmd in (["init-student", "--from", tiny["llama4"], "--layers", "0", "--out"], ["export-model", tiny["gpt2"]]):
        res = CliRunner().invoke(main, [*cmd, str(tmp_path)])
        assert res.exit_code == 1 and "already exists" in res.output, res.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_an_exported_model_holds_the_same_weights(tiny, tmp_path):
    res = CliRunner().invoke(main, ["export-model", tiny["llama"], str(tmp_path / "copy")])
    assert res.exit_code == 0, res.output
    a, b = load_file(f"{tiny['llama']}/model.safetensors"), load_file(tmp_path / "copy/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_gguf_model_without_the_gguf_package_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code = (
        "import sys; sys.modules['gguf'] = None; import importlib.util; importlib.util.find_spec = lambda n, *a: "
        "None if n == 'gguf' else _find(n, *a)"
    )
    run = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; _find = u.find_spec; " + code + "\n"
         "from pipeline.cli import main; main(['export-model', sys.argv[1], sys.argv[2]])",
         str(tmp_path / "m.gguf"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 1 and "needs the gguf package: pip install" in run.stderr, run.stderr


def test_a_missing_gguf_file_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(main, ["export-model", str(tmp_path / "none.gguf"), str(tmp_path / "out")])
    assert res.exit_code == 1 and "does not exist" in res.output, res.output


def test_gguf_file_joins_the_model_folder_or_hub_repository_it_names(tmp_path):
    """--gguf-file NAME with a model folder or hub repository means the one model name FOLDER/NAME.gguf, for every
    command's model (the teacher, student, model or --from); a name that is not a .gguf file is refused in one line,
    and a hub repository's file that cannot be had is a one-line error naming it."""
    from pipeline.config import CacheTeacherConfig, DataConfig, EvalConfig, InitStudentConfig, LossConfig, TrainConfig

    folder = str(tmp_path / "models")
    assert CacheTeacherConfig(teacher=folder, gguf_file="m.gguf", out="c").teacher == f"{folder}/m.gguf"
    data = DataConfig("d", text_field="text")
    train = TrainConfig(student=folder + "/", gguf_file="m.gguf", out="r", loss=LossConfig(kind="ce"), data=data)
    assert train.student == f"{folder}/m.gguf"
    assert EvalConfig(model="owner/repo", gguf_file="m.gguf", out="e.json").model == "owner/repo/m.gguf"
    assert InitStudentConfig(teacher=folder, gguf_file="m.gguf", layers=(0,), out="s").teacher == f"{folder}/m.gguf"
    for bad in ("m.safetensors", "sub/m.gguf"):
        res = CliRunner().invoke(main, ["init-student", "--from", folder, "--gguf-file", bad, "--layers", "0",
                                        "--out", str(tmp_path / "s")])  # fmt: skip
        assert res.exit_code == 1 and "is not a .gguf file name" in res.output and len(res.output.splitlines()) == 1
    hub = ["init-student", "--from", "nobody-here/no-repo", "--gguf-file", "m.gguf", "--layers", "0"]
    res = CliRunner().invoke(main, [*hub, "--out", str(tmp_path / "s")])  # offline: conftest.py
    assert res.exit_code == 1 and "nobody-here/no-repo/m.gguf" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
