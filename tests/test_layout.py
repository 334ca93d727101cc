"""The code's shape, as the README's module map states it: imports only go down the layers (storage at the bottom,
the command at the top), no function runs past a screen, and no module outside a package reaches for its private
names."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
OURS = ("pipeline", "stages", "storage")
LAYERS = [  # lowest first; a module imports only from layers below its own
    ["storage"],
    ["pipeline.errors", "pipeline.compat"],
    ["pipeline.config", "pipeline.alignment", "pipeline.cross_losses"],
    ["pipeline.losses", "pipeline.models", "pipeline.run_folder", "pipeline.batches", "pipeline.parallel"],
    ["pipeline.data", "pipeline.checkpoint", "pipeline.scoring"],
    ["pipeline.sources"],
    ["pipeline.cross_tokenizer"],
    ["pipeline.teachers", "pipeline.hf"],
    ["stages"],
    ["pipeline.cli"],
]
MAX_FUNCTION_LINES = 60


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    if module == "pipeline":  # the package itself: its __version__
        return 0
    raise LookupError(f"{module} is in no layer of tests/test_layout.py (and the README's module map)")


def modules(*folders):
    for folder in folders:
        for path in sorted((ROOT / folder).glob("*.py")):
            yield f"{folder}.{path.stem}", path, ast.parse(path.read_text())


def imports(tree: ast.AST, package: str) -> set[str]:
    """Our modules a module imports, anywhere in it (imports inside functions too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in OURS}
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.add(package)  # storage's relative imports stay within storage
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if (ROOT / (full.replace(".", "/") + ".py")).exists() else node.module)
    return out


@pytest.mark.parametrize("module, path, tree", list(modules(*OURS)), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_go_down_the_layers(module, path, tree):
    if module.endswith("__init__"):
        return
    package = module.split(".")[0]
    for target in imports(tree, package):
        if package == "storage":
            assert target.split(".")[0] == "storage", f"{module} imports {target}: storage knows nothing of the rest"
            continue
        if module == target or target == "pipeline":
            continue
        assert layer(target) < layer(module), f"{module} (layer {layer(module)}) imports {target} ({layer(target)})"


def test_storage_and_losses_keep_to_themselves():
    """storage knows nothing of torch; losses know nothing of storage."""
    for module, _, tree in modules("storage"):
        assert not any("torch" in name for name in _imported_roots(tree)), module
    losses = ast.parse((ROOT / "pipeline/losses.py").read_text())
    assert "storage" not in _imported_roots(losses)


def _imported_roots(tree):
    return {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }


def test_no_function_runs_past_a_screen():
    long = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, _, tree in modules(*OURS)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_nothing_outside_a_module_uses_its_private_names():
    """`module._name` and `from module import _name` of our modules, in the library and the benchmarks."""
    found = []
    for module, _, tree in [*modules("pipeline", "stages"), *modules("bench")]:
        ours = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in OURS:
                found += [f"{module}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
                ours |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                ours |= {a.asname or a.name for a in node.names if a.name.split(".")[0] in OURS}
        found += [
            f"{module}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in ours and _private(node.attr)
        ]  # fmt: skip
    assert found == []


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_options_are_stated_once_in_the_config_dataclasses():
    """Each option's default, choice list and range check is written in pipeline/config.py: the command passes no
    default or literal choice list of its own (an option it does not get from a config has none), and no stage
    declares a config dataclass."""
    cli = ast.parse((ROOT / "pipeline/cli.py").read_text())
    for node in ast.walk(cli):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "click.option":
            stated = {k.arg: k.value for k in node.keywords}
            assert "default" not in stated, ast.unparse(node)
            choice = stated.get("type")
            assert not (isinstance(choice, ast.Call) and isinstance(choice.args[0], ast.List)), ast.unparse(node)
    for module, path, tree in modules("stages", "pipeline"):
        if module == "pipeline.config":
            continue
        names = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name.endswith("Config")]
        assert not names, f"{module} declares {names}: configs belong in pipeline/config.py"


def test_every_config_field_is_an_option_or_says_why_not():
    """The command line is derived from the configs: every field of a stage's config is on it (under its flag),
    a sub-config, or marked cli=False (set by the command itself, such as data, or by the library only)."""
    from dataclasses import fields, is_dataclass

    from pipeline import config

    for cls in [getattr(config, n) for n in dir(config) if n.endswith("Config")]:
        if not is_dataclass(cls):
            continue
        for f in fields(cls):
            assert f.metadata.get("group") or "cli" in f.metadata, f"{cls.__name__}.{f.name} is a plain field"
