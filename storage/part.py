"""The columnar part: the in-memory form of one part of a cache, shared by every backend.

A part is a dict of flat numpy arrays (names as in FORMAT.md); samples are ragged, addressed by offsets.
"""
from __future__ import annotations

import numpy as np

LOGPROB_DTYPES = ("float16", "float32")


def id_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned integer type holding every id below vocab_size."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def array_names(n_temperatures: int) -> list[str]:
    names = ["sample_index", "token_offsets", "input_ids", "loss_mask", "position_offsets", "topk_ids"]
    for j in range(n_temperatures):
        names += [f"topk_logprobs_{j}", f"tail_logmass_{j}"]
    return names


def pack(samples: list[dict], k: int, n_temps: int, ids_dtype, logprob_dtype) -> dict[str, np.ndarray]:
    """Samples (dicts with sample_index, input_ids, loss_mask, topk_ids [P,k], topk_logprobs [T,P,k],
    tail_logmass [T,P]) → one columnar part."""
    def offsets(lengths):
        return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)

    def cat(arrs, dtype, shape_tail=()):
        return np.concatenate(arrs).astype(dtype) if arrs else np.zeros((0,) + shape_tail, dtype)

    part = {
        "sample_index": np.array([s["sample_index"] for s in samples], dtype=np.int64),
        "token_offsets": offsets([len(s["input_ids"]) for s in samples]),
        "input_ids": cat([np.asarray(s["input_ids"]) for s in samples], ids_dtype),
        "loss_mask": cat([np.asarray(s["loss_mask"]) for s in samples], np.uint8),
        "position_offsets": offsets([len(s["topk_ids"]) for s in samples]),
        "topk_ids": cat([np.asarray(s["topk_ids"]).reshape(-1, k) for s in samples], ids_dtype, (k,)),
    }
    for j in range(n_temps):
        part[f"topk_logprobs_{j}"] = cat([np.asarray(s["topk_logprobs"][j]).reshape(-1, k) for s in samples],
                                         logprob_dtype, (k,))
        part[f"tail_logmass_{j}"] = cat([np.asarray(s["tail_logmass"][j]) for s in samples], np.float32)
    for s in samples:
        if int(np.asarray(s["loss_mask"]).sum()) != len(s["topk_ids"]):
            raise ValueError(f"sample {s['sample_index']}: loss_mask has {int(np.asarray(s['loss_mask']).sum())} "
                             f"distilled positions but {len(s['topk_ids'])} teacher rows")
    return part


def n_samples(part) -> int:
    return len(part["sample_index"])


def sample(part: dict, i: int, temperature_index: int = 0) -> dict[str, np.ndarray]:
    t0, t1 = part["token_offsets"][i:i + 2]
    p0, p1 = part["position_offsets"][i:i + 2]
    return {
        "sample_index": int(part["sample_index"][i]),
        "input_ids": part["input_ids"][t0:t1],
        "loss_mask": part["loss_mask"][t0:t1],
        "topk_ids": part["topk_ids"][p0:p1],
        "topk_logprobs": part[f"topk_logprobs_{temperature_index}"][p0:p1],
        "tail_logmass": part[f"tail_logmass_{temperature_index}"][p0:p1],
    }


def counts(part: dict) -> dict[str, int]:
    return {
        "samples": n_samples(part),
        "tokens": int(part["token_offsets"][-1]),
        "distilled_positions": int(part["position_offsets"][-1]),
        "max_token_id": int(part["topk_ids"].max()) if part["topk_ids"].size else -1,
    }


def problems(part: dict, k: int, n_temps: int, vocab_size: int, dtypes: dict, tol: float) -> list[str]:
    """What is wrong with a decoded part: shapes, dtypes and values (empty list when it is sound)."""
    out = []
    missing = [n for n in array_names(n_temps) if n not in part]
    if missing:
        return [f"missing arrays {missing}"]
    s, t_off, p_off = n_samples(part), part["token_offsets"], part["position_offsets"]
    n_tok, n_pos = int(t_off[-1]), int(p_off[-1])
    want_dtype = {"input_ids": dtypes["token_ids"], "topk_ids": dtypes["topk_ids"], "loss_mask": "uint8"}
    for name, dt in want_dtype.items():
        if str(part[name].dtype) != dt:
            out.append(f"{name} has dtype {part[name].dtype}, manifest says {dt}")
    if len(t_off) != s + 1 or len(p_off) != s + 1 or np.any(np.diff(t_off) < 0) or np.any(np.diff(p_off) < 0):
        out.append("offsets are not monotone arrays of length samples + 1")
        return out
    if part["input_ids"].shape != (n_tok,) or part["loss_mask"].shape != (n_tok,):
        out.append(f"input_ids/loss_mask length {part['input_ids'].shape} differs from token offsets ({n_tok})")
    if part["topk_ids"].shape != (n_pos, k):
        out.append(f"topk_ids shape {part['topk_ids'].shape} != ({n_pos}, {k})")
    mask = part["loss_mask"].astype(np.int64)
    per_sample = np.add.reduceat(mask, t_off[:-1]) if n_tok and s else np.zeros(s, np.int64)
    per_sample = np.where(np.diff(t_off) > 0, per_sample, 0)
    if not np.array_equal(per_sample, np.diff(p_off)):
        out.append("loss_mask counts differ from the number of teacher rows per sample")
    if part["topk_ids"].size and int(part["topk_ids"].max()) >= vocab_size:
        out.append(f"token id {int(part['topk_ids'].max())} >= vocab_size {vocab_size}")
    for j in range(n_temps):
        lp = part[f"topk_logprobs_{j}"].astype(np.float32)
        tail = part[f"tail_logmass_{j}"]
        if str(part[f"topk_logprobs_{j}"].dtype) != dtypes["topk_logprobs"] or str(tail.dtype) != dtypes["tail_logmass"]:
            out.append(f"temperature {j}: dtypes differ from the manifest")
        if lp.shape != (n_pos, k) or tail.shape != (n_pos,):
            out.append(f"temperature {j}: logprob shapes {lp.shape}, {tail.shape} differ from ({n_pos}, {k})")
            continue
        if np.isnan(lp).any() or np.isnan(tail).any():
            out.append(f"temperature {j}: NaN log-probabilities")
        if (lp > 0).any() or (tail > 0).any():
            out.append(f"temperature {j}: positive log-probabilities")
        if (np.diff(lp, axis=1) > 0).any():
            out.append(f"temperature {j}: top-k log-probabilities are not sorted descending")
        if n_pos:
            total = np.exp(lp.astype(np.float64)).sum(1) + np.exp(tail.astype(np.float64))
            worst = float(np.abs(total - 1).max())
            if worst > tol:
                out.append(f"temperature {j}: top-k mass + tail mass is off 1 by {worst:.3g} (tolerance {tol})")
    return out
