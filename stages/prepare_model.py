"""Models to start from: a depth-pruned copy of a teacher as a student (init-student), and a slow-loading model
(a .gguf file, dequantized on every load) saved once as safetensors (export-model)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import checkpoint, compat, models
from pipeline.config import ExportModelConfig, InitStudentConfig
from pipeline.errors import OptionError


def prune(cfg: InitStudentConfig) -> dict:
    """The teacher's layers cfg.layers, its embeddings, final norm and head, saved with its tokenizer."""
    check_new(cfg.out)
    n = compat.text_config(models.load_config(cfg.teacher, cfg.trust_remote_code)).num_hidden_layers
    models.check_layers(cfg.layers, n)  # before the weights load
    model = models.load_model(cfg.teacher, torch.float32, torch.device("cpu"), cfg.trust_remote_code)
    tok = models.load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    models.depth_pruned(models.without_gguf(model), cfg.layers)
    checkpoint.save_final(Path(cfg.out), model, tok)
    return {"path": cfg.out, "layers": len(cfg.layers), "of": n, "parameters": parameters(model)}


def export(cfg: ExportModelConfig) -> dict:
    check_new(cfg.out)
    model = models.load_model(cfg.model, torch.float32, torch.device("cpu"), cfg.trust_remote_code)
    tok = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    checkpoint.save_final(Path(cfg.out), models.without_gguf(model), tok)
    return {"path": cfg.out, "parameters": parameters(model)}


def check_new(out: str) -> None:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OptionError(f"{out} already exists; choose a new folder (nothing there is replaced)")


def parameters(model) -> int:
    """Distinct parameters (tied embeddings once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
