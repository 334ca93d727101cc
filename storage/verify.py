"""Checking, describing and converting finished caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import manifest as manifest_io
from . import part as part_io
from .errors import CacheMismatch, VerifyError
from .reader import open_cache
from .writer import CacheWriter, make_plan

TOLERANCE = {"float16": 5e-3, "float32": 1e-4, "power": 1e-4}


def verify(path) -> dict:
    """Check every part's files against their sha256, then its shapes, dtypes, decoding and values; raise
    VerifyError (CorruptCache) naming the first bad part."""
    cache = open_cache(path, max_parts_in_memory=1, full_checks=True)
    m, enc = cache.manifest, cache.encoding
    temps = list(range(len(m["temperatures"])))
    tol = TOLERANCE[enc["logprobs"]["codec"]]
    totals = {}
    cache.sketch()  # checksums, shapes, finite values; None without one
    for p in range(m["num_parts"]):
        name = manifest_io.part_name(p)
        decoded = cache.decode(p, temps)
        issues = part_io.problems(decoded, enc, temps, m["vocab_size"], tol)
        if issues:
            raise VerifyError(f"{name}: {issues[0]}")
        counts = part_io.counts(decoded)
        for key in ("samples", "tokens", "distilled_positions"):
            if counts[key] != m["parts"][name]["counts"][key]:
                raise VerifyError(f"{name}: holds {counts[key]} {key}, manifest says {m['parts'][name]['counts'][key]}")
            totals[key] = totals.get(key, 0) + counts[key]
    for key, v in totals.items():
        if m["counts"][key] != v:
            raise VerifyError(f"manifest totals say {m['counts'][key]} {key}, the parts hold {v}")
    return m


def disk_bytes(path, folder: str = manifest_io.PARTS) -> int:
    return sum(f.stat().st_size for f in (Path(path) / folder).rglob("*") if f.is_file())


def statistics(path, temperature=None, max_positions: int = 1_000_000) -> dict:
    """Summary figures: sizes, bytes per distilled position, widths, tail mass, decode error, top-1 histogram."""
    cache = open_cache(path, temperature, max_parts_in_memory=1)
    m, j = cache.manifest, cache.temperature_index
    tails, top1, widths, drawn = [], [], [], []
    seen = 0
    for _, part in cache.iter_parts():
        if seen >= max_positions:
            break
        off = part["topk_offsets"]
        w = np.diff(off)
        widths.append(w)
        tails.append(np.exp(part[f"tail_logmass_{j}"].astype(np.float64)))
        top1.append(np.exp(part[f"topk_logprobs_{j}"][off[:-1][w > 0]].astype(np.float64)))
        if f"drawn_offsets_{j}" in part:
            drawn.append(np.diff(part[f"drawn_offsets_{j}"]))
        seen += len(w)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    tails, top1, widths, drawn = cat(tails), cat(top1), cat(widths), cat(drawn)
    hist, edges = np.histogram(top1, bins=10, range=(0, 1))
    nbytes = disk_bytes(path)
    c = m["counts"]
    n_pos = c["distilled_positions"]
    out = {
        "samples": c["samples"],
        "tokens": c["tokens"],
        "distilled_positions": n_pos,
        "truncated_samples": c.get("truncated_samples", 0),
        "skipped_samples": c.get("skipped_samples", 0),
        "bytes_on_disk": nbytes,
        "bytes_per_distilled_position": nbytes / n_pos if n_pos else float("nan"),
        "mean_width": float(widths.mean()) if widths.size else float("nan"),
        "mean_tail_mass": float(tails.mean()) if tails.size else float("nan"),
        "top1_mass_histogram": {"edges": edges.round(2).tolist(), "counts": hist.tolist()},
        "temperature": m["temperatures"][j],
        "positions_sampled": int(tails.size),
        "encoding": cache.encoding,
        "sketch_bytes": disk_bytes(path, manifest_io.SKETCH) if cache.encoding.get("sketch") else 0,
    }
    if f"decode_kl_sum_{j}" in c and n_pos:
        out["decode_kl_mean"] = c[f"decode_kl_sum_{j}"] / n_pos
        out["decode_kl_max"] = c[f"decode_kl_max_{j}"]
    if drawn.size:
        out["mean_drawn_width"] = float(drawn.mean())
    return out


def encoding_text(enc: dict) -> str:
    width = f"top-k {enc['top_k']}" + (f", top-p {enc['top_p']} (min {enc['min_k']})" if enc["top_p"] else "")
    ids = enc["ids"]["codec"] + (
        f" {enc['ids']['bits']} bits" if enc["ids"]["codec"] == "bitpack" else f" {enc['ids']['dtype']}"
    )
    lp = enc["logprobs"]
    lp_text = lp["codec"] if lp["codec"] != "power" else f"{lp['bits']}-bit power (γ={lp['gamma']:g})"
    draws = ""
    if enc.get("draws"):
        draws = f", {enc['draws']['n']} tail draws ({'exact' if part_io.exact_draws(enc) else 'counted'})"
    sketch = f", sketch rank {enc['sketch']['rank']} × {enc['sketch']['bits']} bits" if enc.get("sketch") else ""
    target = "yes" if enc["target_logprob"] else "no"
    return f"{width}; ids {ids}; log-probs {lp_text}{draws}{sketch}; target log-prob {target}"


def describe(path) -> str:
    """The text `pipeline inspect` prints."""
    cache = open_cache(path)
    m = cache.manifest
    s = statistics(path)
    ident = m["identity"]
    backend = m["backend"] + (", one row per sample" if m.get("layout") == "samples" else "")
    lines = [
        f"cache       {Path(path)}  ({backend}, format v{m['format_version']}, key {m['cache_key'][:16]})",
        f"teacher     {ident.get('teacher', {}).get('name_or_path', '?')}",
        f"dataset     {ident.get('dataset', {}).get('source', '?')} [{ident.get('dataset', {}).get('split', '?')}]",
        f"encoding    {encoding_text(cache.encoding)}",
        f"            temperatures {m['temperatures']}   vocab {m['vocab_size']}",
        f"samples     {s['samples']}  (truncated {s['truncated_samples']}, skipped {s['skipped_samples']})",
        f"tokens      {s['tokens']}   distilled positions {s['distilled_positions']}   mean row width "
        f"{s['mean_width']:.1f}"
        + (f"   mean drawn tokens {s['mean_drawn_width']:.1f}" if "mean_drawn_width" in s else ""),
        f"on disk     {s['bytes_on_disk'] / 1e6:.2f} MB = "
        f"{s['bytes_per_distilled_position']:.1f} B per distilled position"
        + (f", and the sketch's basis {s['sketch_bytes'] / 1e6:.2f} MB once" if s["sketch_bytes"] else ""),
        f"tail mass   mean {s['mean_tail_mass']:.4f} at T={s['temperature']}",
    ]
    if "decode_kl_mean" in s:
        lines.append(
            f"decode err  KL(exact ‖ decoded bins) mean {s['decode_kl_mean']:.2e}, max {s['decode_kl_max']:.2e} nats"
        )
    lines.append("top-1 mass histogram:")
    counts = s["top1_mass_histogram"]["counts"]
    edges = s["top1_mass_histogram"]["edges"]
    peak = max(counts) or 1
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"  {lo:.1f}-{hi:.1f} {'#' * round(40 * c / peak):<40} {c}")
    return "\n".join(lines)


def convert(
    src,
    dst,
    backend: str | None = None,
    overwrite: bool = False,
    *,
    top_k=None,
    top_p=None,
    min_k=None,
    ids: str | None = None,
    logprobs: str | None = None,
) -> dict:
    """Rewrite a finished cache part by part in another backend and/or encoding (always as the current format
    version). With the encoding unchanged the encoded arrays are copied as they are; otherwise each part is
    decoded and encoded again, so a lossy encoding's decode error is measured against the source's values."""
    check_apart(src, dst)
    cache = open_cache(src, max_parts_in_memory=1)
    m, old = cache.manifest, cache.encoding
    if top_k is not None and top_k > m["k"]:
        raise CacheMismatch(f"--top-k {top_k} is wider than the source's {m['k']}; rerun cache-teacher for wider rows")
    narrower = top_p is not None or (min_k is not None and min_k != old["min_k"]) or (top_k or m["k"]) < m["k"]
    if old.get("draws") and narrower:
        raise CacheMismatch(
            "cannot narrow the rows of a cache with drawn tail tokens: the draws came from the old tail; "
            "rerun cache-teacher with the new --top-p"
        )
    plan = make_plan(
        backend=backend or m["backend"],
        k=top_k or m["k"],
        temperatures=m["temperatures"],
        vocab_size=m["vocab_size"],
        num_rows=m["num_rows"],
        part_size=m["part_size"],
        identity=m["identity"],
        logprob_dtype=logprobs or old["logprobs"]["name"],
        top_p=top_p if top_p is not None else old["top_p"],
        min_k=min_k if min_k is not None else min(old["min_k"], top_k or m["k"]),
        ids=ids or old["ids"]["codec"],
        draws=cache.draws,
        target_logprob=old["target_logprob"],
        **{flag: old.get(flag, False) for flag in ("behavior_logprob", "text")},
        exact_draws=part_io.exact_draws(old),
        **{f"sketch_{k}": v for k, v in (old.get("sketch") or {}).items()},
        package_version=m.get("package_version", "0"),
    )
    writer = CacheWriter(dst, plan, overwrite=overwrite)
    sketch = cache.sketch()
    if sketch is not None:
        writer.store_sketch({k: v.ravel() for k, v in sketch.items()})
    temps = list(range(len(m["temperatures"])))
    copy = cache.version == manifest_io.FORMAT_VERSION and plan["encoding"] == old
    for p in writer.missing_parts():
        source_counts = m["parts"][manifest_io.part_name(p)]["counts"]
        if copy:
            writer.write_arrays(p, cache.read_encoded(p), source_counts)
        else:
            samples = part_io.samples_for_encoding(cache.decode(p, temps), temps, m["k"], cache.draws)
            extra = {k: v for k, v in source_counts.items() if k in ("truncated_samples", "skipped_samples")}
            writer.write_part(p, samples, extra)
    return writer.finalize()


def check_apart(src, dst) -> None:
    """A conversion reads src while it writes dst: neither may be, or hold, the other."""
    a, b = Path(src).resolve(), Path(dst).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise CacheMismatch(
            f"convert would write {dst} {'over' if a == b else 'inside' if a in b.parents else 'around'}"
            f" its source {src}; choose a destination outside the source"
        )
