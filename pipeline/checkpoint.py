"""Training checkpoints without pickle: model and optimizer tensors through torch.distributed.checkpoint into
safetensors files (under FSDP every rank writes its own shard; the state is resharded on load), everything else
in JSON. A checkpoint folder appears by rename once whole, then the `latest.json` pointer moves to it."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from pipeline import parallel

LATEST = "latest.json"
TENSORS = "tensors"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _tensors(student, optimizer) -> tuple[dict, dict, list]:
    """The flat dict DCP saves and loads in place (model.{fqn}, optim.{fqn}.{name}; a tensor shared by several names,
    like tied embeddings, under its first name only), the other names of shared tensors, and the param groups."""
    osd = student.optimizer_state(optimizer)
    flat, aliases, seen = {}, {}, {}
    for k, v in student.model_state().items():
        local = v.to_local() if hasattr(v, "to_local") else v
        ptr = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if ptr in seen:
            aliases[f"model.{k}"] = seen[ptr]
            continue
        seen[ptr] = f"model.{k}"
        flat[f"model.{k}"] = v
    for fqn, entry in osd["state"].items():
        for name, v in entry.items():
            flat[f"optim.{fqn}.{name}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return flat, aliases, osd["param_groups"]


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process even when told so; in one process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
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


def save(folder: Path, step: int, student, optimizer, scheduler, trainer_state: dict, keep: int = 2) -> Path:
    """Every rank calls this (a collective under DDP/FSDP). A failed save (a full disk) leaves the previous
    checkpoint as the latest and no partial folder behind."""
    tmp = folder / f".tmp-step-{step:08d}"
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    parallel.barrier()
    try:
        return _save(folder, tmp, step, student, optimizer, scheduler, trainer_state, keep)
    except BaseException as e:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error_inside(e) or e


def _os_error_inside(e: BaseException) -> OSError | None:
    """The file system's own error that torch.distributed.checkpoint wrapped (a full disk is one), if any."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException):
        for exc, _ in e.failures.values():
            if isinstance(exc, OSError):
                return exc
    return None


def _save(folder, tmp, step, student, optimizer, scheduler, trainer_state, keep) -> Path:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    rank, name = _rank(), f"step-{step:08d}"
    flat, _, groups = _tensors(student, optimizer)
    with _single_process_quiet():
        dcp.save(
            flat,
            storage_writer=HuggingFaceStorageWriter(str(tmp / TENSORS), save_distributed=True),
            no_dist=not dist.is_initialized(),
        )
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / f"rng-{rank}.safetensors"))
    (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_meta))
    if rank == 0:
        (tmp / "state.json").write_text(
            json.dumps(
                {"step": step, "trainer": trainer_state, "param_groups": groups, "scheduler": scheduler.state_dict()}
            )
        )
    parallel.barrier()
    if rank == 0:
        for p in tmp.rglob("*"):
            if p.is_file():
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
    parallel.barrier()
    return folder / name


def latest(folder: Path) -> Path | None:
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    return folder / json.loads(pointer.read_text())["checkpoint"]


def latest_step(folder: Path) -> int | None:
    pointer = folder / LATEST
    return json.loads(pointer.read_text())["step"] if pointer.exists() else None


def remove_stale(folder: Path) -> None:
    """Partial checkpoint folders and pointer temporaries that a killed or failed save left (rank 0, before any
    save)."""
    for tmp in [*folder.glob(".tmp-step-*"), *folder.glob(f".{LATEST}.*")]:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def save_final(path: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """The trained model in transformers' layout, written beside and renamed into place."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(path: Path, student, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG states in place; returns the trainer state."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    flat, aliases, _ = _tensors(student, optimizer)
    with _single_process_quiet():
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / TENSORS)), no_dist=not dist.is_initialized())
    model = {k: v for k, v in flat.items() if k.startswith("model.")} | {k: flat[v] for k, v in aliases.items()}
    student.load_model_state({k[len("model.") :]: v for k, v in model.items()})
    state: dict[str, dict] = {}
    for key, v in flat.items():
        if key.startswith("optim."):
            fqn, name = key[len("optim.") :].rsplit(".", 1)
            state.setdefault(fqn, {})[name] = v
    meta = json.loads((path / "state.json").read_text())
    student.load_optimizer_state(optimizer, {"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    rank = _rank() if (path / f"rng-{_rank()}.json").exists() else 0
    set_rng_state(load_file(str(path / f"rng-{rank}.safetensors")), json.loads((path / f"rng-{rank}.json").read_text()))
    return {"step": meta["step"], **meta["trainer"]}
