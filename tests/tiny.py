"""Tiny real models and data for tests: a trained tokenizer and save_pretrained GPT-2 / Llama models."""
import json
from pathlib import Path

from stages import prepare_demo


def build(root, train_size=48, test_size=12, archs=("gpt2", "llama")):
    root = Path(root)
    paths = prepare_demo.run(prepare_demo.DemoDataConfig(str(root / "data"), train_size, test_size, vocab_size=400))
    for arch in archs:
        paths[arch] = prepare_demo.save_model(root / arch, paths["tokenizer"], arch, layers=2, width=32, heads=2)
    with open(root / "data/plain.jsonl", "w") as f:
        for line in open(paths["train"]):
            r = json.loads(line)
            f.write(json.dumps({"text": r["prompt"] + " . " + r["response"]}) + "\n")
    paths["plain"] = str(root / "data/plain.jsonl")
    return paths
