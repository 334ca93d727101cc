"""Stage: a cache as per-sample tables for the ecosystem's tools, one Parquet file per part (storage/tables.py): every
decoded field, or axolotl's KD dataset columns."""

from __future__ import annotations

from pipeline.config import ExportConfig
from storage import tables


def run(cfg: ExportConfig) -> dict:
    return tables.export(cfg.cache, cfg.out, cfg.to, cfg.temperature, cfg.progress)
