"""SmolLM2-135M-Instruct's train step on this machine (issue 34): the SSFT / SFT-mixed step ratio of the trainer's
own jitted steps against their FLOP floor, and our plain SFT step against transformers' PyTorch
LlamaForCausalLM + AdamW on the same rows and weights.

Usage:
  python bench/bench_smollm2_step.py            # configs/demo_real.py's run (P, T fitted to its data), ~10 minutes
  python bench/bench_smollm2_step.py --quick    # smoke run: SmolLM2 cut to 2 layers, 1 timed round

Everything comes from the trainer's pieces: `assembly.build_inputs` (the converted SmolLM2 folder, its tokenizer and
text tags, the demo_real task), `assembly.make_step` (the very step `make demo-real` runs: cost layout, remat,
logprob chunk as configured), on ONE CPU device. Steps are timed in interleaved rounds (compile excluded; every
call blocks on its result), ratios are medians of per-round ratios. The PyTorch comparison is
`bench_train_step.torch_vs_jax`: each framework in a process of its own, back to back in pairs, the machine load
printed before each.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ssft_jax import (  # noqa: E402
    assembly,
    config as config_lib,
    data as data_lib,
    demo,
    flops,
    mesh as mesh_lib,
    rows as rows_lib,  # noqa: E402
)

import bench_train_step as B  # noqa: E402
from timing_helpers import interleaved, med, ratio  # noqa: E402


def build(args):
    # --quick: the config's 'tiny' data (48 questions to tokenize and fit budgets to, not 1024); same model and task
    c = config_lib.load_config("demo_real", "tiny" if args.quick else "")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.batch_size = args.batch
    demo.fit_budgets(c)  # P, T, L as the demo runs them
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    inp = assembly.build_inputs(c, mesh)
    cfg, params = inp.model_config, inp.params
    if args.quick:  # the first two layers: the same vocabulary, head and data, a tenth of the compute
        cfg = cfg.replace(num_hidden_layers=2)
        params = {**params, "layers": jax.tree.map(lambda x: x[:2], params["layers"])}
    it = data_lib.make_iterator(inp.questions, inp.layout, inp.tag_table, inp.tag_lengths, seed=0)
    host = [next(it) for _ in range(args.batches)]
    return dict(config=c, mesh=mesh, cfg=cfg, params=params, layout=inp.layout, table=inp.tag_table,
                lengths=inp.tag_lengths, host_batches=host, batches=[mesh_lib.to_global(b, mesh) for b in host],
                tok=inp.tokenizer, tags=inp.tags)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=4, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="questions per step (configs/demo_real.py: 4)")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--torch-steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2, help="jax/torch process pairs")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batches, args.torch_steps, args.pairs, args.batch = 1, 1, 1, 1, 1, 2
    t_start = time.perf_counter()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {B.cores()}")
    S = build(args)
    cfg, lay = S["cfg"], S["layout"]
    N, M = lay.num_tags, lay.num_traces
    nparams = sum(x.size for x in jax.tree.leaves(S["params"]))
    print(f"model: SmolLM2-135M-Instruct{' cut to 2 layers (--quick)' if args.quick else ''}: {cfg.num_hidden_layers}"
          f" layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {nparams / 1e6:.1f}M params; remat "
          f"{cfg.remat}; {S['config'].ssft.tag_mode} tags; cost layout {S['config'].ssft.cost_layout}")
    P, Lt, T, Le = lay.max_prompt_len, lay.tag_len, lay.max_trace_len, lay.cost_slot_len
    print(f"layout: N={N} M={M} B={args.batch} | P={P} Lt={Lt} T={T} L=Le={Le} | train row {lay.train_row_len} "
          f"slots; cost rows {N * M} x {lay.pair_block_len} slots reading a prompt cache of {P}")

    # FLOP floor of the ratio: (cost pass + train fwd/bwd) / train fwd/bwd, the shapes the graph computes.
    fwd = lambda rows, q, kv=None: flops.forward_flops(cfg, rows, q, kv)  # noqa: E731
    total = lambda f: f["layers"] + f["head"]  # noqa: E731
    train_f = total(fwd(M, lay.train_row_len))
    blocks = fwd(N * M, Lt + Le, P + Lt + Le)
    cost_f = fwd(1, P)["layers"] + blocks["layers"] + blocks["head"]
    floor = 1 + cost_f / (3 * train_f)

    runs = {}
    for method in ("sft_mixed", "ssft"):  # the config's cost layout and diagnostics, as `make demo-real` runs them
        step = B.compile_step(S, method, cost=S["config"].ssft.cost_layout)
        runs[method] = step["run"]
        print(f"{method}: compiled in {step['compile_s']:.1f} s")
    times = interleaved(runs, args.steps, args.warmup)
    r = ratio(times["ssft"], times["sft_mixed"])
    counts = [data_lib.batch_token_counts(b) for b in S["host_batches"]]
    real = float(np.mean([c["train_real"] for c in counts]))
    print(f"\n## SSFT / SFT-mixed step, the trainer's jitted steps ({args.steps} interleaved rounds after "
          f"{args.warmup} warm-up)\n")
    print("| step | median s | real train tokens/s |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med(v):.2f} | {real / med(v):.0f} |")
    print(f"\nssft / sft_mixed = {r:.3f}; FLOP floor (prompt-cache cost pass, dense attention) 1 + F_cost/(3 F_train) "
          f"= {floor:.3f}; measured / floor = {r / floor:.3f}")

    if not args.no_torch:
        import torch
        print("\n## Plain SFT step: ours vs transformers' PyTorch LlamaForCausalLM + AdamW (same rows, same weights)\n")
        tag0 = jnp.zeros(S["batches"][0]["train"]["trace_valid"].shape, jnp.int32)
        rows = jax.jit(lambda t_: jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), rows_lib.fill_tags(
            S["batches"][0]["train"], t_, jnp.asarray(S["table"]), jnp.asarray(S["lengths"]))))(tag0)
        B.torch_vs_jax({"cfg": cfg, "params": S["params"], "config": S["config"]}, rows,
                       argparse.Namespace(quick=args.quick, torch_steps=args.torch_steps, warmup=2), torch,
                       pairs=args.pairs)
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
