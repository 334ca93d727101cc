"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically
(a temporary folder renamed into place, then the `latest.json` pointer)."""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

LATEST = "latest.json"


def _optimizer_split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def save(folder: Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = folder / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_split(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    with open(tmp / "state.json", "w") as f:
        json.dump({"step": step, "trainer": trainer_state, "optimizer": opt_meta, "rng": rng_meta,
                   "scheduler": scheduler.state_dict()}, f)
    for p in tmp.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = folder / f".{LATEST}.{uuid.uuid4().hex[:8]}"
    pointer.write_text(json.dumps({"checkpoint": name, "step": step}))
    os.replace(pointer, folder / LATEST)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    return folder / json.loads(pointer.read_text())["checkpoint"]


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place; returns the trainer state."""
    load_model(model, str(path / "model.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(load_file(str(path / "rng.safetensors")), meta["rng"])
    return {"step": meta["step"], **meta["trainer"]}
