"""Benchmark of ssft_jax.matching solvers vs a Python loop over scipy.

Usage:
  python bench/bench_matching.py            # full table, B=256
  python bench/bench_matching.py --quick    # tiny smoke run

Prints a markdown table: compile time, median time per jitted call (block_until_ready),
iterations (mean / max) for iterative solvers, the fraction of problems whose total
equals scipy's optimum (float64 reference on the same float32 costs), the fraction
certified optimal, and the scipy loop time as reference.  Runs on the default backend
with whatever devices jax sees (CPU, one device, unless you configure otherwise).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from ssft_jax import matching as mm  # noqa: E402

SHAPES = ((6, 4), (8, 8), (12, 6), (16, 8), (32, 32), (64, 64))
BENCH_METHODS = (*mm.SOLVERS, "auto")  # every registered solver, so a new one is benchmarked (and smoke-tested)


def scipy_loop(c):
    out = np.empty(c.shape[0])
    for b in range(c.shape[0]):
        r, k = linear_sum_assignment(c[b])
        out[b] = c[b][r, k].sum()
    return out


def timeit(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny run: B=16, the 6x4 shape, 2 repeats")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(BENCH_METHODS))
    ap.add_argument("--shapes", default=None, help="e.g. 6x4,16x8")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shapes = SHAPES
    B, repeats = args.batch, args.repeats
    if args.quick:
        shapes, B, repeats = ((6, 4),), 16, 2
    if args.shapes:
        shapes = tuple(tuple(int(x) for x in s.split("x")) for s in args.shapes.split(","))
    methods = tuple(args.methods.split(","))
    for m in methods:
        mm.resolve_method("auto" if m == "auto" else m, 64, 1)  # validates the name

    print(f"backend={jax.default_backend()} devices={jax.device_count()} B={B} repeats={repeats} "
          f"jax={jax.__version__}\n")
    print("| N x M | method | compile s | ms / call | iters mean / max | exact vs scipy | certified optimal |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(args.seed)
    for n, m in shapes:
        c = rng.random((B, n, m)).astype(np.float32)
        opt = scipy_loop(c.astype(np.float64))
        t_scipy = timeit(lambda: scipy_loop(c), repeats)
        print(f"| {n}x{m} | scipy loop (reference) | - | {1e3 * t_scipy:.2f} | - | 100% | - |", flush=True)
        x = jnp.asarray(c)
        tol = 1e-5 * m * np.maximum(1.0, np.abs(opt))
        for method in methods:
            label = method if method != "auto" else f"auto ({mm.resolve_method('auto', n, m)})"
            if method == "bruteforce" and mm.num_candidates(n, m) > mm.BRUTEFORCE_MAX_CANDIDATES:
                print(f"| {n}x{m} | {label} | skipped: {mm.num_candidates(n, m):.3g} candidates > "
                      f"{mm.BRUTEFORCE_MAX_CANDIDATES} | | | | |", flush=True)
                continue
            fn = jax.jit(lambda v, method=method: mm.match(v, method=method))
            t = time.perf_counter()
            compiled = fn.lower(x).compile()
            t_compile = time.perf_counter() - t
            res = jax.block_until_ready(compiled(x))
            t_call = timeit(lambda: jax.block_until_ready(compiled(x)), repeats)
            total = np.asarray(res.total_cost, np.float64)
            exact = np.mean(np.abs(total - opt) <= tol)
            cert = np.mean(np.asarray(res.status) == mm.STATUS_OPTIMAL)
            it = np.asarray(res.iterations)
            iters = f"{it.mean():.1f} / {it.max()}" if it.max() > 0 else "-"
            print(f"| {n}x{m} | {label} | {t_compile:.2f} | {1e3 * t_call:.2f} | {iters} | "
                  f"{100 * exact:.1f}% | {100 * cert:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
