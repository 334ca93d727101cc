"""Stage: a cache as per-sample tables for the ecosystem's tools, one Parquet file per part (storage/tables.py).

Streamed part by part (one decoded part in memory), each file written whole under a temporary name and renamed into
place, so that an interrupted export resumes with the parts it lacks. `export.json` says what the folder holds: the
source cache's key, the layout, the temperature, what the layout drops, and `complete` once every part is there.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import storage
from pipeline.config import ExportConfig
from pipeline.errors import OptionError
from storage import manifest as manifest_io
from storage.tables import TABLES

INFO = "export.json"
DROPPED = {"parquet": [], "axolotl": ["tail_logmass", "target_logprob", "drawn tokens", "sketch"]}


def part_file(p: int) -> str:
    return f"part-{p:06d}.parquet"


def run(cfg: ExportConfig) -> dict:
    cache = storage.open_cache(cfg.cache, cfg.temperature)
    out, t = Path(cfg.out), cache.temperature_index
    info = {
        "source_cache_key": cache.manifest["cache_key"],
        "layout": cfg.to,
        "temperature": cache.temperatures[t],
        "num_parts": cache.num_parts,
        "dropped": DROPPED[cfg.to],
        "complete": False,
    }
    claim(out, info)
    todo = [p for p in range(cache.num_parts) if not (out / part_file(p)).exists()]
    tokens = [cache.manifest["parts"][manifest_io.part_name(p)]["counts"]["tokens"] for p in todo]
    bar = tqdm(total=sum(tokens), unit="tok", unit_scale=True, desc=f"export {cfg.to}", disable=not cfg.progress)
    rows = 0
    for p, n in zip(todo, tokens):
        table = TABLES[cfg.to](cache.decode(p), t)
        manifest_io.write_atomic(out / part_file(p), parquet_bytes(table))
        rows += table.num_rows
        bar.update(n)
    bar.close()
    manifest_io.write_json_atomic(out / INFO, {**info, "complete": True})
    return {"path": str(out), "parts_written": len(todo), "rows": rows, "num_parts": cache.num_parts}


def claim(out: Path, info: dict) -> None:
    """The folder for this export: new, or holding an unfinished or finished export of the same cache and layout."""
    if (out / INFO).exists():
        old = manifest_io.read_json(out / INFO)
        if any(old.get(k) != info[k] for k in ("source_cache_key", "layout", "temperature")):
            raise OptionError(
                f"{out} holds an export of another cache, layout or temperature ({old.get('layout')}); choose a "
                "new folder (nothing there is replaced)"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OptionError(f"{out} already exists and is not an export; choose a new folder (nothing there is replaced)")
    out.mkdir(parents=True, exist_ok=True)
    for p in range(info["num_parts"]):
        manifest_io.remove_temporaries(out, part_file(p))
    if not (out / INFO).exists():
        manifest_io.write_json_atomic(out / INFO, info)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
