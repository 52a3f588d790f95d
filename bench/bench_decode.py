"""Decode throughput of `sampling.generate_forked` (questions x tags x samples), with and without the shared prompt
cache.

    python bench/bench_decode.py [--models smollm2,demo] [--questions 2] [--samples 1] [--new_tokens 32] [--repeats 2]
    python bench/bench_decode.py --quick    # smoke run (demo model only)

For each model: B questions x N=6 forking tags x S samples rows, stop tokens disabled so every row decodes
`new_tokens` tokens. Timings are after a warm-up call (compile excluded), best of `repeats`:
  prefill   = a call with max_new_tokens=1 (prompt prefill [+ per-row tag prefill] + one sampled token)
  total     = a call with max_new_tokens=new_tokens
  decode tok/s = rows * (new_tokens - 1) / (total - prefill)
  end-to-end tok/s = rows * new_tokens / total
shared = prompt prefilled once per question and its cache repeated to the N*S rows; per-row = prompt+tag prefilled
from scratch in every row. Models: SmolLM2-135M-Instruct (converted GGUF; a GSM8K-sized chat prompt, text tags) and
the demo config's default-size model (random init; char tokenizer, special tags; a synthetic question).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from ssft_jax import assembly, config as config_lib, mesh as mesh_lib, sampling, tokenization  # noqa: E402

GSM8K_Q = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
           "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
           "egg. How much in dollars does she make every day at the farmers' market?")


def _time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(name, cfg, params, prompts, tag_ids, *, samples, new_tokens, repeats, modes=(True, False)):
    """Prints a line per mode (share_prefix True / False) and returns {share: (prefill_s, total_s, decode_tok_s)}."""
    rows = len(prompts) * len(tag_ids) * samples
    results = {}
    for share in modes:
        def run(n, share=share):
            out = sampling.generate_forked(cfg, params, prompts, tag_ids, num_samples=samples, max_new_tokens=n,
                                           eos_token_ids=[-1], temperature=0.7, top_p=0.95, seed=0,
                                           share_prefix=share)
            assert all(len(g.tokens) == n for q in out for t in q for g in t)
        t0 = time.perf_counter()
        run(1), run(new_tokens)  # compile both shapes
        compile_s = time.perf_counter() - t0
        prefill = _time(lambda: run(1), repeats)
        total = _time(lambda: run(new_tokens), repeats)
        decode_tps = rows * (new_tokens - 1) / max(total - prefill, 1e-9)
        results[share] = (prefill, total, decode_tps)
        print(f"{name:8s} {'shared' if share else 'per-row':8s} rows={rows:3d} prompt={max(map(len, prompts)):4d} "
              f"tag<={max(map(len, tag_ids))} prefill {prefill * 1e3:8.1f} ms  total {total:6.2f} s  "
              f"decode {decode_tps:8.1f} tok/s  end-to-end {rows * new_tokens / total:8.1f} tok/s  "
              f"(warm-up incl. compile {compile_s:.1f} s)", flush=True)
    if len(results) < 2:
        return results
    (ps, ts, ds), (pu, tu, du) = results[True], results[False]
    print(f"{name:8s} shared-prefix effect: prefill x{pu / ps:.2f} faster, total x{tu / ts:.2f}, decode tok/s "
          f"x{ds / du:.2f}", flush=True)
    return results


def single_stream(name, cfg, params, prompt, *, new_tokens, repeats):
    def run(n):
        sampling.generate(cfg, params, [prompt], max_new_tokens=n, eos_token_ids=[-1])
    run(1), run(new_tokens)
    prefill, total = _time(lambda: run(1), repeats), _time(lambda: run(new_tokens), repeats)
    print(f"{name:8s} 1 row greedy: decode {(new_tokens - 1) / (total - prefill):8.1f} tok/s "
          f"({(total - prefill) / (new_tokens - 1) * 1e3:.1f} ms/token)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,demo")
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: the demo model only, 8 new tokens, 1 repeat")
    a = p.parse_args()
    if a.quick:
        a.models, a.new_tokens, a.repeats = "demo", 8, 1
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus); B={a.questions} questions "
          f"x N=6 tags x S={a.samples} samples, {a.new_tokens} new tokens, temperature 0.7 top-p 0.95", flush=True)
    for name in a.models.split(","):
        # The trainer's own assembly builds each model (weights from the folder, or initialised from the seed).
        configs = {"smollm2": ("smollm2_gsm8k", GSM8K_Q), "demo": ("demo", "What is 47 + 385 + 12 + 66?")}
        if name not in configs:
            raise SystemExit(f"unknown model {name!r}; known: {sorted(configs)}")
        config_name, question = configs[name]
        c = config_lib.load_config(config_name)
        pieces = assembly.build(c, mesh=mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]), remat="none")
        cfg, params, tok, tags = pieces.model_config, pieces.params, pieces.tokenizer, pieces.tags
        n_params = sum(x.size for x in jax.tree.leaves(params))
        print(f"{name}: {n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
              f"{tags.mode} tags", flush=True)
        prompt = tokenization.render_example(tok, question, None, tags, None).prompt_ids
        prompts = [list(prompt)] * a.questions
        tag_ids = tags.all_tag_ids(tok)
        single_stream(name, cfg, params, list(prompt) + tag_ids[0], new_tokens=a.new_tokens, repeats=a.repeats)
        bench(name, cfg, params, prompts, tag_ids, samples=a.samples, new_tokens=a.new_tokens, repeats=a.repeats)


if __name__ == "__main__":
    main()
