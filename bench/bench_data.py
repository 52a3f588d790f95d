"""Benchmark of the SSFT data pipeline (ssft_jax.data) on this CPU, with the SmolLM2 tokenizer.

Usage:
  python bench/bench_data.py              # 512 synthetic questions, N=6 M=4 L=128 T=1024 P=256 B=8, 2 epochs
  python bench/bench_data.py --quick      # 64 questions, 1 epoch

Synthetic records shaped like the paper's setting scaled down: questions of ~60-180 words, 1..4 traces of
~200-1100 words each (a few exceed T and get truncated). Prints
  * tokenization (validation + chat rendering + trace encoding, done once up front): questions/s, tokens/s;
  * the Grain pipeline (shuffle -> repeat -> map(layout) -> batch -> iterator): batches/s, questions/s, real and
    slot tokens/s of the cost and train views;
  * fill_tags + cost_matrix_from_token_nll jitted on the CPU (per batch);
  * the cost view's token budget with prompt sharing vs repeating the prompt N*M times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ssft_jax import (  # noqa: E402
    data as D,  # noqa: E402
    gguf_convert,
    rows as rows_lib,
    tokenization,
)

WORDS = ("the of and to a in is that it for as with was on be by this are we step so then answer number let "
         "compute check sum total value equals therefore because first second next finally times plus minus "
         "divide result case each both since thus hence square root prime factor").split()


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rs = np.random.RandomState(seed)

    def text(lo, hi):
        k = rs.randint(lo, hi)
        words = rs.choice(WORDS, k)
        nums = rs.randint(0, 1000, k)
        return " ".join(f"{w} {x}" if r < 0.15 else str(w) for w, x, r in zip(words, nums, rs.rand(k)))

    recs = []
    for i in range(n):
        nt = int(rs.choice([1, 2, 3, 4], p=[0.05, 0.1, 0.15, 0.7]))
        recs.append({"id": f"s{i}", "question": text(25, 90),
                     "traces": [{"text": text(120, 700), "source": f"teacher{j}"} for j in range(nt)]})
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--questions", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="grain ReadOptions.num_threads")
    ap.add_argument("-N", type=int, default=6)
    ap.add_argument("-M", type=int, default=4)
    ap.add_argument("-L", type=int, default=128)
    ap.add_argument("-T", type=int, default=1024)
    ap.add_argument("-P", type=int, default=256)
    ap.add_argument("-B", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.questions, args.epochs = 64, 1

    import grain

    t0 = time.perf_counter()
    tok = tokenization.load_tokenizer(gguf_convert.ensure_smollm2_hf())
    print(f"tokenizer: SmolLM2-135M-Instruct ({len(tok)} tokens), loaded in {time.perf_counter() - t0:.2f}s; "
          f"jax {jax.__version__}, grain ReadOptions(num_threads={args.threads}), {os.cpu_count()} CPUs")
    tags = tokenization.ForkingTags.for_tokenizer(tok, args.N)
    cfg = D.LayoutConfig.for_tokenizer(tok, tags, num_traces=args.M, cost_len=args.L, max_prompt_len=args.P,
                                       max_trace_len=args.T, batch_size=args.B)
    table, lengths = D.tag_table(tok, tags)
    print(f"layout: N={cfg.num_tags} M={cfg.num_traces} L={cfg.cost_len} P={cfg.max_prompt_len} "
          f"T={cfg.max_trace_len} Lt={cfg.tag_len} B={cfg.batch_size}; tag 1 = {tags.tag_string(0)!r} "
          f"-> {tags.tag_ids(tok, 0)}")

    recs = synthetic_records(args.questions)
    t0 = time.perf_counter()
    qs, rep = D.tokenize_records(recs, tok, tags, cfg, on_bad_record="skip")
    dt_tok = time.perf_counter() - t0
    n_tok = sum(len(q.prompt_ids) + sum(len(t) for t in q.trace_ids) for q in qs)
    print(f"\n[tokenize] {len(recs)} records -> {len(qs)} questions, "
          f"{sum(len(q.trace_ids) for q in qs)} traces, {n_tok} tokens in {dt_tok:.2f}s: "
          f"{len(recs) / dt_tok:.0f} questions/s, {n_tok / dt_tok / 1e3:.0f}k tokens/s")
    print(f"[tokenize] report: {rep.summary().splitlines()[0]}")

    ro = grain.ReadOptions(num_threads=args.threads, prefetch_buffer_size=2 * args.B if args.threads else 0)
    it = D.make_iterator(qs, cfg, table, lengths, seed=0, epochs=args.epochs, read_options=ro)
    t0 = time.perf_counter()
    first = next(it)
    t_first = time.perf_counter() - t0
    times, counts = [], []
    t_prev = time.perf_counter()
    for batch in it:
        now = time.perf_counter()
        times.append(now - t_prev)
        counts.append(D.batch_token_counts(batch))
        t_prev = time.perf_counter()  # counting is not pipeline time
    n_b = len(times)
    dt = sum(times)
    tot = {k: sum(c[k] for c in counts) for k in counts[0]}
    print(f"\n[pipeline] {n_b} batches after the first ({t_first * 1e3:.1f} ms): {dt:.2f}s, "
          f"median {statistics.median(times) * 1e3:.2f} ms/batch, {n_b / dt:.1f} batches/s, "
          f"{n_b * args.B / dt:.0f} questions/s")
    print(f"[pipeline] tokens/s: cost view real {tot['cost_real'] / dt / 1e6:.2f}M (slots "
          f"{tot['cost_slots'] / dt / 1e6:.2f}M), train view real {tot['train_real'] / dt / 1e6:.2f}M (slots "
          f"{tot['train_slots'] / dt / 1e6:.2f}M), train loss tokens {tot['train_loss_tokens'] / dt / 1e6:.2f}M")
    shapes = {f"{v}.{k}": tuple(x.shape) for v in ("cost", "train") for k, x in first[v].items() if x.ndim >= 2}
    print(f"[pipeline] batch: cost.tokens {shapes['cost.tokens']}, train.tokens {shapes['train.tokens']}; "
          f"fill: cost {tot['cost_real'] / tot['cost_slots']:.1%} real, "
          f"train {tot['train_real'] / tot['train_slots']:.1%}"
          " real (before tags)")

    # In-graph helpers on this CPU (what the train step adds per batch).
    N, M = cfg.num_tags, cfg.num_traces
    assign = np.tile(np.arange(M, dtype=np.int32), (args.B, 1))
    fill = jax.jit(rows_lib.fill_tags)
    cmat = jax.jit(lambda nll, cv: rows_lib.cost_matrix_from_token_nll(nll, cv, N, M))
    nll = np.random.RandomState(0).rand(*first["cost"]["tokens"].shape).astype(np.float32)
    jax.block_until_ready((fill(first["train"], assign, table, lengths), cmat(nll, first["cost"])))
    ts_f, ts_c = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fill(first["train"], assign, table, lengths))
        ts_f.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(cmat(nll, first["cost"]))
        ts_c.append(time.perf_counter() - t0)
    print(f"\n[jit, cpu] fill_tags {statistics.median(ts_f) * 1e3:.2f} ms/batch, "
          f"cost_matrix_from_token_nll {statistics.median(ts_c) * 1e3:.2f} ms/batch")

    shared, repeated = cfg.cost_row_len, cfg.cost_tokens_repeated_prompt
    print(f"\n[budget] per question: cost view P + N*M*(Lt+Le) = {cfg.max_prompt_len} + {cfg.num_pairs}*"
          f"({cfg.tag_len}+{cfg.cost_slot_len}) = {shared} slots (one row) vs repeating the prompt N*M*(P+Lt+Le) = "
          f"{repeated} slots ({repeated / shared:.2f}x); train view M*(P+Lt+T) = {cfg.num_traces}*"
          f"{cfg.train_row_len} = {cfg.num_traces * cfg.train_row_len} slots")
    real_prompt = np.mean([len(q.prompt_ids) for q in qs])
    real_cost = tot["cost_real"] / (n_b * args.B)
    print(f"[budget] real tokens per question (this data): cost view {real_cost:.0f} with sharing vs "
          f"{real_cost + (cfg.num_pairs - 1) * real_prompt:.0f} if each of the N*M continuations repeated its "
          f"{real_prompt:.0f}-token prompt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
