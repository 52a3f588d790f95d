"""Timing helpers shared by the benchmarks (bench_train_step.py, accelerator.py): interleaved rounds, medians."""
from __future__ import annotations

import statistics
import time

import jax


def block(x):
    return jax.block_until_ready(x)


def interleaved(fns: dict, rounds: int, warmup: int, per_round: int = 1) -> dict[str, list[float]]:
    """Each round calls every fn `per_round` times in a row (same order); `warmup` untimed rounds first. Returns
    seconds per call, one entry per round (the median of that round's calls). Interleaving makes machine noise
    (clocks, other processes) hit every variant alike; each fn must block on its own result."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            ts = []
            for _ in range(per_round):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            out[k].append(statistics.median(ts))
    return out


def med(xs):
    return statistics.median(xs)


def ratio(a, b):
    """Median of per-round ratios a[i] / b[i] (same round, same machine state)."""
    return med([x / y for x, y in zip(a, b)])
