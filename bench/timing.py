"""Timings side by side: the steps compared run in alternation, round after round, so that each round's times see
the same machine (a shared one's speed drifts by ±25 % over minutes), and ratios are taken round by round."""

import time

import numpy as np


def interleaved(fns: dict, repeats: int) -> dict:
    """Each function's times over `repeats` rounds after a warm-up; within a round they run one after the other, so
    that each round's times see the same machine (this one's speed drifts by ±25 % over minutes)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: np.array(t) for name, t in times.items()}


def ratio(times: dict, a: str, b: str) -> dict:
    """time(a) ÷ time(b), round by round: the median and range."""
    r = times[a] / times[b]
    return {"ratio": float(np.median(r)), "ratio_min": float(r.min()), "ratio_max": float(r.max()), "rounds": len(r)}
