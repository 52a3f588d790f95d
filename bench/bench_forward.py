"""Compile time and steady-state forward throughput of our decoder on the real SmolLM2-135M, on this machine.

    python bench/bench_forward.py [--batch 4 --seq 256 --dtype float32 --iters 5]
    python bench/bench_forward.py --quick     # smoke run
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssft_jax import gguf_convert, hf_io, model as M


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 x 32 tokens, 1 iteration")
    a = p.parse_args()
    if a.quick:
        a.batch, a.seq, a.iters = 1, 32, 1

    cfg, params = hf_io.load_hf_params(gguf_convert.ensure_smollm2_hf())
    cfg = cfg.replace(dtype=a.dtype)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (a.batch, a.seq)), jnp.int32)
    # Hidden states, not logits: the SSFT step never materialises [B, T, V] logits (chunked log-sum-exp).
    fwd = jax.jit(lambda p, t: M.forward(cfg, p, t, return_hidden=True))

    t0 = time.perf_counter()
    compiled = fwd.lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    compiled(params, tokens).block_until_ready()
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        compiled(params, tokens).block_until_ready()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"| model | devices | batch x seq | dtype | compile s | forward s (median of {a.iters}) | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| SmolLM2-135M | {jax.device_count()} x {jax.devices()[0].platform} | {a.batch} x {a.seq} | {a.dtype} | "
          f"{compile_s:.2f} | {med:.3f} | {a.batch * a.seq / med:,.0f} |")


if __name__ == "__main__":
    main()
