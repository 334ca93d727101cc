"""A cache's teacher sketch on disk: the folder `sketch/` beside `parts/`, written once per cache like a part (files
with their checksums in part.json, renamed into place whole) and sealed by the manifest's `sketch.sha256`.

It holds the principal directions fitted on the teacher's final hidden states: `mean` [d], `components` [r·d] (the
writers project each position's hidden state with these) and `basis` [(r + 1)·V], whose rows turn a position's
coefficients into approximate logits ([1, c] · basis). All float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import backends, part_folder
from . import manifest as manifest_io
from .errors import CorruptCache

SKETCH_ARRAYS = ("mean", "components", "basis")


def shapes(plan: dict, hidden_size: int) -> dict:
    r, v = plan["encoding"]["sketch"]["rank"], plan["vocab_size"]
    return {"mean": (hidden_size,), "components": (r * hidden_size,), "basis": ((r + 1) * v,)}


def check(arrays: dict, plan: dict) -> None:
    """Raise CorruptCache unless the arrays are a sketch of the plan's rank and vocabulary, finite."""
    if set(arrays) != set(SKETCH_ARRAYS):
        raise CorruptCache(f"sketch: arrays {sorted(arrays)}, want {list(SKETCH_ARRAYS)}")
    want = shapes(plan, int(np.asarray(arrays["mean"]).size))
    for name, shape in want.items():
        a = np.asarray(arrays[name])
        if a.shape != shape or a.dtype != np.float32 or not np.isfinite(a).all():
            raise CorruptCache(f"sketch: {name} is {a.dtype} {a.shape}, want finite float32 {shape}")


def read(path, plan: dict, sha256: str | None, full: bool = False) -> dict:
    """The sketch of the cache at path: {mean [d], components [r, d], basis [r + 1, V]}, checked against its recorded
    checksums (and the manifest's sha256 when given)."""
    folder = Path(path) / manifest_io.SKETCH
    if not folder.is_dir():
        raise CorruptCache(f"{path}: the encoding declares a teacher sketch but {manifest_io.SKETCH}/ is missing")
    _, files = part_folder.read(folder, sha256, full)
    backend = backends.get(plan["backend"])
    arrays = backend.decode(files, list(SKETCH_ARRAYS), {})
    check(arrays, plan)
    r, d = plan["encoding"]["sketch"]["rank"], arrays["mean"].size
    return {
        "mean": arrays["mean"],
        "components": arrays["components"].reshape(r, d),
        "basis": arrays["basis"].reshape(r + 1, plan["vocab_size"]),
    }


def sealed_sha256(path) -> str:
    """The sketch folder's sha256 from its part.json (checked against its files first), for the manifest."""
    folder = Path(path) / manifest_io.SKETCH
    part_folder.read(folder, None)
    raw, record = part_folder.read_record(folder)
    return part_folder.record_sha256(raw, record)
