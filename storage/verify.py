"""Checking, describing and converting finished caches."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import manifest as M
from . import part as P
from .reader import open_cache
from .writer import CacheWriter

TOLERANCE = {"float16": 5e-3, "float32": 1e-4}


class VerifyError(ValueError):
    pass


def verify(path) -> dict:
    """Check every part's checksum, shapes, dtypes and values; raise VerifyError naming the first bad part."""
    cache = open_cache(path, max_parts_in_memory=1)
    m = cache.manifest
    tol = TOLERANCE[m["dtypes"]["topk_logprobs"]]
    totals = {}
    for p in range(m["num_parts"]):
        name = M.part_name(p)
        folder = cache.part_folder(p)
        if not folder.is_dir():
            raise VerifyError(f"{name}: missing")
        if M.folder_sha256(folder) != m["parts"][name]["sha256"]:
            record = M.read_json(folder / M.PART_RECORD)
            bad = [f for f, h in record["files"].items() if not (folder / f).exists() or M.file_sha256(folder / f) != h]
            raise VerifyError(f"{name}: checksum mismatch" + (f" in {bad[0]}" if bad else " (part record changed)"))
        try:
            arrays = cache.backend.read(folder, P.array_names(len(m["temperatures"])))
        except Exception as e:  # a corrupt file can fail inside any decoder
            raise VerifyError(f"{name}: cannot be decoded ({type(e).__name__}: {e})") from e
        issues = P.problems(arrays, m["k"], len(m["temperatures"]), m["vocab_size"], m["dtypes"], tol)
        if issues:
            raise VerifyError(f"{name}: {issues[0]}")
        counts = P.counts(arrays)
        for key in ("samples", "tokens", "distilled_positions"):
            if counts[key] != m["parts"][name]["counts"][key]:
                raise VerifyError(f"{name}: holds {counts[key]} {key}, manifest says {m['parts'][name]['counts'][key]}")
            totals[key] = totals.get(key, 0) + counts[key]
    for key, v in totals.items():
        if m["counts"][key] != v:
            raise VerifyError(f"manifest totals say {m['counts'][key]} {key}, the parts hold {v}")
    return m


def disk_bytes(path) -> int:
    return sum(f.stat().st_size for f in M.folder_files(Path(path) / M.PARTS))


def statistics(path, temperature=None, max_positions: int = 1_000_000) -> dict:
    """Summary figures: sizes, bytes per distilled position, tail mass and a top-1 mass histogram."""
    cache = open_cache(path, temperature, max_parts_in_memory=1)
    m = cache.manifest
    j = cache.temperature_index
    tails, top1 = [], []
    seen = 0
    for _, arrays in cache.iter_parts():
        if seen >= max_positions:
            break
        tails.append(np.exp(arrays[f"tail_logmass_{j}"].astype(np.float64)))
        top1.append(np.exp(arrays[f"topk_logprobs_{j}"][:, :1].astype(np.float64)).ravel())
        seen += len(tails[-1])
    tails = np.concatenate(tails) if tails else np.zeros(0)
    top1 = np.concatenate(top1) if top1 else np.zeros(0)
    hist, edges = np.histogram(top1, bins=10, range=(0, 1))
    nbytes = disk_bytes(path)
    n_pos = m["counts"]["distilled_positions"]
    return {
        "samples": m["counts"]["samples"], "tokens": m["counts"]["tokens"], "distilled_positions": n_pos,
        "truncated_samples": m["counts"].get("truncated_samples", 0), "skipped_samples": m["counts"].get("skipped_samples", 0),
        "bytes_on_disk": nbytes, "bytes_per_distilled_position": nbytes / n_pos if n_pos else float("nan"),
        "mean_tail_mass": float(tails.mean()) if tails.size else float("nan"),
        "top1_mass_histogram": {"edges": edges.round(2).tolist(), "counts": hist.tolist()},
        "temperature": m["temperatures"][j], "positions_sampled": int(tails.size),
    }


def describe(path) -> str:
    """The text `pipeline inspect` prints."""
    m = open_cache(path).manifest
    s = statistics(path)
    ident = m["identity"]
    lines = [
        f"cache       {Path(path)}  ({m['backend']}, format v{m['format_version']}, key {m['cache_key'][:16]})",
        f"teacher     {ident.get('teacher', {}).get('name_or_path', '?')}",
        f"dataset     {ident.get('dataset', {}).get('source', '?')} [{ident.get('dataset', {}).get('split', '?')}]",
        f"top-k       {m['k']}   temperatures {m['temperatures']}   vocab {m['vocab_size']}   dtypes "
        f"ids={m['dtypes']['topk_ids']} logprobs={m['dtypes']['topk_logprobs']}",
        f"samples     {s['samples']}  (truncated {s['truncated_samples']}, skipped {s['skipped_samples']})",
        f"tokens      {s['tokens']}   distilled positions {s['distilled_positions']}",
        f"on disk     {s['bytes_on_disk'] / 1e6:.2f} MB = {s['bytes_per_distilled_position']:.1f} B per distilled position",
        f"tail mass   mean {s['mean_tail_mass']:.4f} at T={s['temperature']}",
        "top-1 mass histogram:",
    ]
    counts = s["top1_mass_histogram"]["counts"]
    edges = s["top1_mass_histogram"]["edges"]
    peak = max(counts) or 1
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"  {lo:.1f}-{hi:.1f} {'#' * round(40 * c / peak):<40} {c}")
    return "\n".join(lines)


def convert(src, dst, backend: str, overwrite: bool = False) -> dict:
    """Rewrite a finished cache in another backend, part by part; contents are identical."""
    cache = open_cache(src, max_parts_in_memory=1)
    plan = {k: v for k, v in cache.manifest.items() if k not in ("counts", "parts", "complete")}
    plan["backend"] = backend
    writer = CacheWriter(dst, plan, overwrite=overwrite)
    n_t = len(plan["temperatures"])
    for p, arrays in cache.iter_parts(writer.missing_parts()):
        samples = []
        for j in range(P.n_samples(arrays)):
            rows = [P.sample(arrays, j, t) for t in range(n_t)]
            samples.append({**rows[0], "topk_logprobs": [r["topk_logprobs"] for r in rows],
                            "tail_logmass": [r["tail_logmass"] for r in rows]})
        extra = {k: v for k, v in cache.manifest["parts"][M.part_name(p)]["counts"].items()
                 if k not in ("samples", "tokens", "distilled_positions", "max_token_id")}
        writer.write_part(p, samples, extra)
    return writer.finalize()
