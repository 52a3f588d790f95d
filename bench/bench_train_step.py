"""Step time of the SSFT train step vs the SFT-mixed baseline, and where the difference goes (issue 5).

Usage:
  python bench/bench_train_step.py            # full run (a few minutes on 2 CPU cores)
  python bench/bench_train_step.py --quick    # smoke run: tiny model; the step variants other than ssft and
                                              # sft_mixed are traced, not compiled or timed

Everything is built from the trainer's own pieces (configs/demo.py model, `ssft_jax.assembly` for the model, layout
and jitted step, the data pipeline) on ONE CPU device, on the synthetic task ('hard': 4-6
operands of 2-4 digits; char tokenizer, so a token is a character). N=6, M=4, L = round(mean trace length / 8).
Timings exclude compilation; every timed call ends with `block_until_ready`; variants are timed in interleaved
rounds (one call of each per round) so machine noise hits them alike, and ratios are medians of per-round ratios.

Tables:
 1. step time ssft vs sft_mixed, the measured ratio next to the arithmetic floors, and a decomposition: ssft
    without the second-best-gap diagnostics, the cost pass replaced by other layouts (repeated prompt, prompt in a KV
    cache), the pieces alone (cost pass, matching, gap, train forward+backward), and whether the other layouts pick
    the same assignments;
 2. the share of the step spent in matching;
 3. compiled memory (`memory_analysis()`) of the ssft and sft_mixed steps;
 4. tokens/s of our jitted SFT step vs transformers' PyTorch Qwen2ForCausalLM + AdamW on the same rows and
    weights, each framework in a process of its own (in one process their thread pools contend), back to back in
    pairs, with the machine load printed before each process.
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs.demo import get_config  # noqa: E402
from ssft_jax import (  # noqa: E402  # noqa: E402
    assembly,
    data as data_lib,  # noqa: E402
    datasets,
    flops,
    losses,
    memory_plan,
    mesh as mesh_lib,
    rows as rows_lib,
    train_state,
)
from ssft_jax.logprobs import token_logprobs  # noqa: E402
from ssft_jax.model import forward, output_embedding  # noqa: E402
from ssft_jax.plan_check import memory_figures  # noqa: E402

import train_step_variants as V  # noqa: E402
from timing_helpers import block, interleaved, med, ratio  # noqa: E402


def cores() -> str:
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return f"{os.cpu_count()} logical CPUs ({aff} usable by this process)"


def mb(n):
    return f"{n / 2**20:.2f}"


# ----------------------------------------------------------------------------------------------------------------
# Setup from the trainer's pieces
# ----------------------------------------------------------------------------------------------------------------

def make_config(args, cost_len: int, max_prompt_len: int, max_trace_len: int):
    c = get_config()
    # The model and cost layout every figure of this benchmark (README) was measured with, whatever the demo's
    # default has since become.
    c.model.init.update(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32)
    c.ssft.update(num_tags=args.N, max_traces=args.M, cost_prefix_len=cost_len, cost_layout="packed")
    c.data.update(max_prompt_len=max_prompt_len, max_trace_len=max_trace_len)
    c.data.name = "synthetic"  # the task (and so the row lengths) of those figures: the demo's is now the styles set
    c.data.synthetic.update(num_questions=args.questions, heldout=8, difficulty=args.difficulty)
    c.batch_size = args.batch
    if args.tiny_model:
        c.model.init.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8)
    return c


def lengthen(records, repeat: int):
    """Longer traces when asked: each trace followed by `repeat - 1` re-checks of itself (distinct stays distinct)."""
    if repeat <= 1:
        return records
    out = []
    for r in records:
        r = dict(r)
        r["traces"] = [dict(t, text="\nCheck: ".join([t["text"]] * repeat)) for t in r["traces"]]
        out.append(r)
    return out


def build(args, workdir: pathlib.Path):
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    # Pass 1 (budgets far too large) measures the real lengths; pass 2 sets P, T to the maxima and L = mean T / 8.
    probe = make_config(args, 8, 4096, 4096)
    pieces = assembly.build(probe, mesh=mesh)
    tok, tags, cfg, params = pieces.tokenizer, pieces.tags, pieces.model_config, pieces.params
    records, _ = datasets.build_records(probe)
    records = lengthen(records, args.trace_repeat)
    qs, _ = data_lib.tokenize_records(records, tok, tags, pieces.layout)
    plens = [len(q.prompt_ids) for q in qs]
    tlens = [len(t) for q in qs for t in q.trace_ids]
    L = max(1, round(float(np.mean(tlens)) / 8))
    c = make_config(args, L, max(plens), max(tlens))
    layout = assembly.build_layout(c, tags.max_tag_len(tok))
    qs, report = data_lib.tokenize_records(records, tok, tags, layout)
    table, lengths = data_lib.tag_table(tok, tags, layout.tag_len)
    # At initialisation the special-token tags all get the mean embedding row, so every tag gives the same costs and
    # the matching is a tie-break. Give each tag row a small random offset so the costs differ (as after training).
    emb = params["embedding"]
    tag_rows = np.asarray([tags.tag_ids(tok, i)[-1] for i in range(args.N)])
    noise = jax.random.normal(jax.random.key(1), (args.N, emb.shape[1]), emb.dtype) * jnp.std(emb)
    params = dict(params, embedding=emb.at[tag_rows].add(noise))
    it = data_lib.make_iterator(qs, layout, table, lengths, seed=0)
    host_batches = [next(it) for _ in range(args.batches)]
    batches = [mesh_lib.to_global(b, mesh) for b in host_batches]
    return dict(config=c, mesh=mesh, tok=tok, tags=tags, cfg=cfg, params=params, layout=layout, table=table,
                lengths=lengths, host_batches=host_batches, batches=batches, report=report, tag_ids=tag_rows)


def compile_step(S, method: str, *, gap: bool = True, cost: str = "packed", baseline_costs: bool = False,
                 compile: bool = True):
    """A compiled trainer step + its own fresh state (same initial params for every variant). `cost`: a registered
    cost layout (`ssft.cost_layout`; "repeated" is train_step_variants'). compile=False: trace (lower) only, which
    proves the variant still builds (--quick) and returns None."""
    c = S["config"].copy_and_resolve_references()
    c.ssft.method = method
    c.ssft.second_best_gap = gap
    c.ssft.baseline_costs = baseline_costs
    c.ssft.cost_layout = cost
    optimizer = assembly.make_optimizer(c, 1000)
    params = jax.tree.map(jnp.copy, S["params"])
    state = train_state.init_state(params, optimizer, c.seed, S["mesh"])
    jitted = assembly.make_step(c, S["cfg"], S["layout"], optimizer, state, S["batches"][0], S["mesh"])
    table, lengths = jnp.asarray(S["table"]), jnp.asarray(S["lengths"])
    t0 = time.perf_counter()
    lowered = jitted.lower(state, S["batches"][0], table, lengths)
    if not compile:
        return None
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state, "i": 0, "metrics": None}

    def run():
        b = S["batches"][box["i"] % len(S["batches"])]
        box["i"] += 1
        box["state"], box["metrics"] = compiled(box["state"], b, table, lengths)
        block((box["state"], box["metrics"]))
    return dict(run=run, compiled=compiled, compile_s=compile_s, box=box)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, one batch, 3 rounds")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (one call of every variant each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="questions per step")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    ap.add_argument("--questions", type=int, default=256)
    ap.add_argument("--difficulty", default="hard")
    ap.add_argument("--trace-repeat", type=int, default=1, help="k > 1: each trace followed by k-1 copies of itself")
    ap.add_argument("-N", type=int, default=6)
    ap.add_argument("-M", type=int, default=4)
    ap.add_argument("--torch-steps", type=int, default=0, help="timed rounds for table 4 (default: --steps)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tiny-model", action="store_true", help="the 2-layer/32-wide test model instead of the demo's")
    # Internal: section 4 runs each framework's step in a process of its own (see torch_vs_jax).
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-dir", help=argparse.SUPPRESS)
    ap.add_argument("--worker-steps", type=int, default=5, help=argparse.SUPPRESS)
    ap.add_argument("--worker-warmup", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--worker-chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--remat", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.steps, args.warmup, args.batch, args.batches, args.questions = 3, 1, 2, 1, 32
        args.torch_steps = args.torch_steps or 1
        args.tiny_model = True
    args.torch_steps = args.torch_steps or args.steps

    try:
        import torch
        torch_v = torch.__version__
    except ImportError:  # pragma: no cover
        torch, torch_v = None, "not installed"
    import transformers
    print("## Environment\n")
    print(f"python {platform.python_version()}, jax {jax.__version__} (jaxlib {jax.lib.__version__}), optax "
          f"{optax.__version__}, torch {torch_v}, transformers {transformers.__version__}")
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}); {cores()}; "
          f"{platform.machine()} {platform.system()}")
    print(f"args: {vars(args)}\n")

    t_start = time.perf_counter()
    S = build(args, pathlib.Path(tempfile.mkdtemp(prefix="bench_train_step_")))
    lay, cfg, N, M = S["layout"], S["cfg"], args.N, args.M
    P, Lt, T, Le = lay.max_prompt_len, lay.tag_len, lay.max_trace_len, lay.cost_slot_len
    R, Srow = lay.cost_row_len, lay.train_row_len
    nparams = sum(x.size for x in jax.tree.leaves(S["params"]))
    print(f"model: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, mlp "
          f"{cfg.intermediate_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} (q/kv) x {cfg.head_dim},"
          f" vocab {cfg.vocab_size} (char tokenizer + {N} special tags), {nparams / 1e6:.2f}M params, {cfg.dtype}")
    print(f"data: synthetic '{args.difficulty}' (trace_repeat={args.trace_repeat}), {S['report'].summary()}")
    # Real lengths over the timed batches (valid traces only).
    tr = [b["train"] for b in S["host_batches"]]
    valid = np.concatenate([t["trace_valid"].ravel() for t in tr])
    p_avg = float(np.concatenate([t["prompt_lengths"].ravel() for t in tr])[valid].mean())
    t_avg = float(np.concatenate([t["trace_lengths"].ravel() for t in tr])[valid].mean())
    l_avg = float(np.concatenate([b["cost"]["cost_lengths"].ravel() for b in S["host_batches"]])[valid].mean())
    counts = [data_lib.batch_token_counts(b) for b in S["host_batches"]]
    cnt = {k: float(np.mean([c_[k] for c_ in counts])) for k in counts[0]}
    print(f"layout: N={N} M={M} B={args.batch} | budgets P={P} T={T} L=Le={Le} Lt={Lt} | cost row R=P+N*M*(Lt+Le)="
          f"{R} | train row S=P+Lt+T={Srow}")
    print(f"batch means (valid traces): prompt P={p_avg:.1f}, trace T={t_avg:.1f}, cost prefix L'={l_avg:.1f} "
          f"tokens; traces/question {valid.mean() * M:.2f}")

    floor_brief = 1 + N * (p_avg + l_avg) / (3 * (p_avg + t_avg))
    # Prompt shared across the N*M continuations: cost tokens p + N*M*(Lt + L'), train tokens M*(p + Lt + t).
    floor_shared = 1 + (p_avg + N * M * (Lt + l_avg)) / (3 * M * (p_avg + Lt + t_avg))
    floor_slots = 1 + R / (3 * M * Srow)  # what the static shapes actually push through the linear layers
    # Forward FLOPs per question over the shapes the graph computes (dense attention), counted by `ssft_jax.flops`,
    # the same count the trainer's MFU uses.
    fwd = lambda rows, q, kv=None: flops.forward_flops(cfg, rows, q, kv)  # noqa: E731
    total = lambda f: f["layers"] + f["head"]  # noqa: E731
    train_f = total(fwd(M, Srow))
    blocks = fwd(N * M, Lt + Le, P + Lt + Le)
    repeated = fwd(N * M, P + Lt + Le)
    cost_f = {
        "packed": total(fwd(1, R)),
        # the prompt's positions predict no trace token: only the (Lt + Le) block positions go through the head
        "repeated": repeated["layers"] + repeated["head"] * (Lt + Le) / (P + Lt + Le),
        "prefix_cache": fwd(1, P)["layers"] + blocks["layers"] + blocks["head"],
    }
    floor_flops = {k: 1 + v / (3 * train_f) for k, v in cost_f.items()}

    # ---------------- 1. step times ----------------
    print("\n## 1. Step time: ssft vs sft_mixed (same process, same shapes, compile excluded)\n")
    variants = {
        "sft_mixed": dict(method="sft_mixed"),
        "ssft": dict(method="ssft"),
        "ssft, second_best_gap=False": dict(method="ssft", gap=False),
        "fixed tags + cost pass (no matching)": dict(method="fixed", baseline_costs=True),
        "ssft, no gap, cost: repeated prompt": dict(method="ssft", gap=False, cost="repeated"),
        "ssft, no gap, cost: prompt KV cache": dict(method="ssft", gap=False, cost="prefix_cache"),
    }
    steps = {}
    for name, kw in variants.items():
        # --quick compiles and times the two headline steps; the others are traced, so they cannot rot unseen.
        timed = not args.quick or name in ("sft_mixed", "ssft")
        step = compile_step(S, **kw, compile=timed)
        if step is not None:
            steps[name] = step
    if len(steps) < len(variants):
        print(f"--quick: traced but not compiled or timed: {[k for k in variants if k not in steps]}\n")
    times = interleaved({k: v["run"] for k, v in steps.items()}, args.steps, args.warmup)
    base = times["sft_mixed"]
    print(f"median over {args.steps} interleaved rounds after {args.warmup} warm-up rounds; B={args.batch} questions "
          f"= {args.batch * M} train rows of {Srow} slots; cost view {args.batch} rows of {R} slots\n")
    print("| step variant | compile s | step ms (median) | min ms | ratio vs sft_mixed (median of per-round) |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {steps[k]['compile_s']:.1f} | {med(v) * 1e3:.1f} | {min(v) * 1e3:.1f} | "
              f"{ratio(v, base):.3f} |")
    r_ssft = ratio(times["ssft"], base)
    print("\n| floor for ssft / sft_mixed | formula | value | measured / floor |")
    print("|---|---|---|---|")
    print(
        f"| brief's floor, real mean P, T, L' | 1 + N(P+L)/(3(P+T)) | {floor_brief:.3f} | {r_ssft / floor_brief:.3f} |"
    )
    print(f"| prompt shared, real lengths | 1 + (P+NM(Lt+L))/(3M(P+Lt+T)) | {floor_shared:.3f} | "
          f"{r_ssft / floor_shared:.3f} |")
    print(f"| prompt shared, padded slots | 1 + R/(3 M S) | {floor_slots:.3f} | {r_ssft / floor_slots:.3f} |")
    for k, v in floor_flops.items():
        print(f"| FLOPs incl. dense attention, cost layout '{k}' | 1 + F_cost/(3 F_train) | {v:.3f} | "
              f"{'' if k != 'packed' else f'{r_ssft / v:.3f}'} |")
    # What the trainer's default `ssft.cost_layout="auto"` picks for these shapes, and that layout's measured step.
    auto = S["config"].copy_and_resolve_references()
    auto.ssft.cost_layout = "auto"
    choice = memory_plan.choose_cost_layout(auto, num_devices=1, tag_len=lay.tag_len)
    timed_as = {"packed": "ssft, second_best_gap=False", "prefix_cache": "ssft, no gap, cost: prompt KV cache"}
    measured = timed_as[choice.layout]
    print(f"\nssft.cost_layout='auto' (the trainer's default): {choice.describe()}. Its step (variant '{measured}'): "
          + (f"{ratio(times[measured], base):.3f}x sft_mixed against the FLOP floor "
             f"{floor_flops[choice.layout]:.3f}" if measured in times else "not timed (--quick)"))
    tok_rep = N * M * (P + Lt + Le)
    print(f"\ncost-view slots per question: packed (shared prompt) R={R}; repeated prompt N*M*(P+Lt+Le)={tok_rep}; "
          f"prompt KV cache P + N*M*(Lt+Le)={R} tokens but attention keys per block P+Lt+Le={P + Lt + Le}. "
          f"Real tokens per batch: cost {cnt['cost_real']:.0f} of {cnt['cost_slots']:.0f} slots, train "
          f"{cnt['train_real']:.0f} of {cnt['train_slots']:.0f} slots ({cnt['train_loss_tokens']:.0f} loss tokens).")

    # Pieces alone, on the first batch and the initial params.
    b0 = S["batches"][0]
    params = S["params"]
    cv, trv = b0["cost"], b0["train"]
    tag_valid, trace_valid = cv["tag_valid"], trv["trace_valid"]
    table, lengths = jnp.asarray(S["table"]), jnp.asarray(S["lengths"])
    chunk = S["config"].model.logprob_chunk
    cost_fns = {
        "packed": jax.jit(lambda p, v: losses.cost_matrix(cfg, p, v, N, M, chunk)),
        "repeated": jax.jit(lambda p, v: V.cost_matrix_repeated(cfg, p, v, N, M, P=P, W=Lt + Le, chunk_size=chunk)),
        "prefix_cache": jax.jit(lambda p, v: losses.cost_matrix(cfg, p, v, N, M, chunk, layout="prefix_cache",
                                                                 prompt_len=P, block_len=Lt + Le)),
    }
    costs = {k: block(f(params, cv)) for k, f in cost_fns.items()}
    matcher = S["config"].ssft.matcher
    assign = jax.jit(lambda c_, tv, rv: losses.assign("ssft", c_, tv, rv, jax.random.key(0), matcher))
    gap_fn = jax.jit(lambda c_, t_, tv, rv: losses.second_best_gap(c_, t_, tv, rv, matcher))
    tags0 = block(assign(costs["packed"], tag_valid, trace_valid))[0]
    rows = jax.jit(lambda t_: jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]),
                                           rows_lib.fill_tags(trv, t_, table, lengths)))(tags0)
    fill = jax.jit(lambda t_: rows_lib.fill_tags(trv, t_, table, lengths))
    train_vg = jax.jit(jax.value_and_grad(lambda p, r: losses.set_loss_sums(cfg, p, r, chunk), has_aux=True))
    train_fwd = jax.jit(lambda p, r: losses.set_loss_sums(cfg, p, r, chunk))
    pieces = {
        "cost pass, packed row (trainer)": lambda: block(cost_fns["packed"](params, cv)),
        "cost pass, repeated prompt": lambda: block(cost_fns["repeated"](params, cv)),
        "cost pass, prompt KV cache": lambda: block(cost_fns["prefix_cache"](params, cv)),
        "matching: assign('ssft') on the real C": lambda: block(assign(costs["packed"], tag_valid, trace_valid)),
        "second_best_gap (M re-solves)": lambda: block(gap_fn(costs["packed"], tags0, tag_valid, trace_valid)),
        "fill_tags": lambda: block(fill(tags0)),
        "train rows forward only": lambda: block(train_fwd(params, rows)),
        "train rows forward+backward": lambda: block(train_vg(params, rows)),
    }
    for f in pieces.values():
        f()  # compile
    ptimes = interleaved(pieces, args.steps, args.warmup)
    fb = med(ptimes["train rows forward+backward"])
    print(f"\nPieces alone (jitted separately, batch 0, median of {args.steps}); share = piece / sft_mixed step:\n")
    print("| piece | ms (median) | / train fwd+bwd | / sft_mixed step |")
    print("|---|---|---|---|")
    for k, v in ptimes.items():
        print(f"| {k} | {med(v) * 1e3:.2f} | {med(v) / fb:.3f} | {med(v) / med(base):.3f} |")
    print(f"\nmeasured backward/forward factor on the train rows: fwd+bwd / fwd = "
          f"{fb / med(ptimes['train rows forward only']):.2f} (the floor assumes 3)")

    print("\nDo the other cost layouts pick the same assignments? (batch 0 and all timed batches)\n")
    print("| cost layout | max abs diff of C vs packed | questions with identical assignment | same optimal total "
          "(rtol 1e-5) |")
    print("|---|---|---|---|")
    all_c = {k: [block(f(params, b["cost"])) for b in S["batches"]] for k, f in cost_fns.items()}
    for k in cost_fns:
        same, total_same, nq, dmax = 0, 0, 0, 0.0
        for b, c_ref, c_k in zip(S["batches"], all_c["packed"], all_c[k]):
            tv, rv = b["cost"]["tag_valid"], b["train"]["trace_valid"]
            a_ref = np.asarray(assign(c_ref, tv, rv)[0])
            a_k = np.asarray(assign(c_k, tv, rv)[0])
            fin = np.isfinite(np.asarray(c_ref))
            dmax = max(dmax, float(np.max(np.abs(np.asarray(c_ref)[fin] - np.asarray(c_k)[fin]))))
            cr = np.asarray(c_ref)
            for q in range(a_ref.shape[0]):
                nq += 1
                same += bool(np.array_equal(a_ref[q], a_k[q]))
                ok = np.asarray(rv[q])
                tot = lambda a: cr[q][a[ok], np.arange(M)[ok]].sum()
                total_same += bool(np.isclose(tot(a_ref[q]), tot(a_k[q]), rtol=1e-5))
        print(f"| {k} | {dmax:.2e} | {same}/{nq} | {total_same}/{nq} |")

    # ---------------- 2. matching share ----------------
    t_match = med(ptimes["matching: assign('ssft') on the real C"])
    t_gap = med(ptimes["second_best_gap (M re-solves)"])
    t_ssft = med(times["ssft"])
    nan = [float("nan")] * args.steps
    # In-step differences as medians of per-round differences (same round, same machine state).
    d_match = med([a - b for a, b in zip(times.get("ssft, second_best_gap=False", nan),
                                         times.get("fixed tags + cost pass (no matching)", nan))])
    d_gap = med([a - b for a, b in zip(times["ssft"], times.get("ssft, second_best_gap=False", nan))])
    print("\n## 2. Share of the step spent in matching\n")
    print(f"matcher '{matcher}' -> {__import__('ssft_jax.matching', fromlist=['x']).resolve_method(matcher, N, M)}, "
          f"B={args.batch} problems of {N}x{M} per step\n")
    print("| measure | ms | share of ssft step |")
    print("|---|---|---|")
    print(f"| assign('ssft') jitted alone on the step's real C | {t_match * 1e3:.2f} | {t_match / t_ssft:.2%} |")
    print(f"| second_best_gap alone (M extra solves, diagnostics) | {t_gap * 1e3:.2f} | {t_gap / t_ssft:.2%} |")
    print(
        f"| in-step: ssft(no gap) - fixed tags with the same cost pass (median per-round diff) | {d_match * 1e3:.1f} |"
        f" {d_match / t_ssft:.1%} |"
    )
    print(f"| in-step: ssft - ssft(no gap) (median per-round diff) | {d_gap * 1e3:.1f} | {d_gap / t_ssft:.1%} |")
    print(f"| ssft step (median) | {t_ssft * 1e3:.1f} | 100% |")
    print("\n(in-step differences are at the noise level of whole-step timings; the jitted-alone rows are the "
          "resolvable measurement)")

    # ---------------- 3. memory ----------------
    print("\n## 3. Compiled memory per device (`memory_analysis()`, MiB)\n")
    print("| step | temp | argument | output | alias | generated code | peak = arg + out - alias + temp |")
    print("|---|---|---|---|---|---|---|")
    for k in ("sft_mixed", "ssft", "ssft, second_best_gap=False", "ssft, no gap, cost: prompt KV cache"):
        if k not in steps:
            continue
        m = memory_figures(steps[k]["compiled"])  # the same figures `python -m ssft_jax.memory_plan --compile` prints
        if m is None:
            print(f"| {k} | n/a | | | | | |")
            continue
        print(f"| {k} | {mb(m['temp'])} | {mb(m['argument'])} | {mb(m['output'])} | {mb(m['alias'])} | "
              f"{mb(m['generated_code'])} | {mb(m['peak'])} |")
    del steps

    # ---------------- 4. vs PyTorch ----------------
    if args.no_torch or torch is None:
        print("\n## 4. vs PyTorch: skipped")
        return 0
    print("\n## 4. Plain SFT step: our jitted JAX step vs transformers' PyTorch Qwen2ForCausalLM (same rows)\n")
    torch_vs_jax(S, rows, args, torch)
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.0f} s)")
    return 0


def torch_vs_jax(S, rows, args, torch, *, pairs: int | None = None):
    """Each framework timed in its own process (two runtimes' thread pools in one process slow each other down,
    measured 0.71x even on a quiet machine), back to back in pairs, jax then torch; the machine load is printed
    before each process. The rows and the weights (an HF folder of ours) are written once and read by both."""
    import json
    import subprocess

    from ssft_jax import hf_io

    cfg = S["cfg"]
    cr = V.compact_rows(jax.device_get(rows))  # sft_mixed-style rows of batch 0, contiguous, right-padded
    keep = cr["attention"].sum(1) > 0
    cr = {k: v[keep] for k, v in cr.items()}
    nrows, S_len = cr["tokens"].shape
    real, loss_tok = int(cr["attention"].sum()), int(cr["loss"].sum())
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_torch_vs_jax_"))
    hf_io.save_hf_folder(work / "hf", cfg, S["params"])
    np.savez(work / "rows.npz", **cr)
    # >= 2 warm-up calls: the second call sees the first one's output layouts (one more compile in JAX)
    steps, warmup = args.torch_steps, (2 if args.quick else max(args.warmup, 3))
    pairs = pairs or (1 if args.quick else 3)
    remats = [cfg.remat] + (["none"] if cfg.remat != "none" and not args.quick else [])
    chunk = S["config"].model.logprob_chunk
    results: dict[str, list[dict]] = {}
    loads = []
    for _ in range(pairs):
        for who, extra in [*((f"jax (remat={r})", ["--remat", r]) for r in remats), ("torch", [])]:
            loads.append(os.getloadavg()[0])
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", who.split()[0], "--worker-dir", str(work),
                   "--worker-steps", str(steps), "--worker-warmup", str(warmup), "--worker-chunk", str(chunk), *extra]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ,
                                                                                        "XLA_FLAGS": ""}).stdout
            results.setdefault(who, []).append(json.loads(out.strip().splitlines()[-1]))
    print(f"rows: {nrows} contiguous right-padded rows x {S_len} slots (batch 0's sft_mixed rows); {real} real tokens, "
          f"{loss_tok} loss tokens; AdamW lr 1e-3 betas (0.9, 0.999) eps 1e-8 wd 0.01; fp32; 2 threads each; "
          f"sdpa attention in torch; {pairs} pairs of processes, each {warmup} warm-up + {steps} timed steps "
          f"(compile excluded); load average before each process: {', '.join(f'{x:.2f}' for x in loads)}")
    first = {k: v[0]["first_loss"] for k, v in results.items()}
    print("same weights: initial loss " + ", ".join(f"{k} {v:.6f}" for k, v in first.items())
          + ("" if cfg.attention_bias else "; transformers' Qwen2 always has q/k/v biases, our config has none: "
             "torch's start at zero (hence the equal losses) and are trained, a negligible extra") + "\n")
    print("| framework | step ms (median over processes of each one's median) | loss tokens/s | real tokens/s | "
          "slot tokens/s | throughput / torch (median of per-pair ratios) |")
    print("|---|---|---|---|---|---|")
    torch_ms = [r["median_ms"] for r in results["torch"]]
    torch_class = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}.get(cfg.model_type, cfg.model_type)
    for k, rs in results.items():
        t = med([r["median_ms"] for r in rs]) / 1e3
        per_pair = [b / a for a, b in zip([r["median_ms"] for r in rs], torch_ms)]
        label = (f"PyTorch transformers {torch_class} eager" if k == "torch"
                 else f"JAX (ours, jitted), {k[5:-1]}")
        print(f"| {label} | {t * 1e3:.1f} | {loss_tok / t:,.0f} | {real / t:,.0f} | {nrows * S_len / t:,.0f} | "
              f"{med(per_pair):.2f}x |")


def worker(args) -> None:
    """One framework's SFT step on the saved rows, in this process alone; prints one JSON line."""
    import json

    d = pathlib.Path(args.worker_dir)
    cr = dict(np.load(d / "rows.npz"))
    lr, wd = 1e-3, 0.01
    times, first = [], None
    if args.worker == "torch":
        import torch
        import transformers
        from transformers import AutoModelForCausalLM  # the folder's config names the class (Qwen2, Llama)
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(2)
        torch.manual_seed(0)
        tm = AutoModelForCausalLM.from_pretrained(str(d / "hf"), dtype=torch.float32, attn_implementation="sdpa")
        tm.train()
        topt = torch.optim.AdamW(tm.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        ids = torch.tensor(cr["tokens"], dtype=torch.long)
        am = torch.tensor(cr["attention"], dtype=torch.long)
        n = ids.shape[0]
        lbl = np.where(np.concatenate([np.zeros((n, 1), bool), cr["loss"][:, :-1] > 0], 1), cr["tokens"], -100)
        labels = torch.tensor(lbl, dtype=torch.long)

        def step():
            out = tm(input_ids=ids, attention_mask=am, labels=labels, use_cache=False)
            out.loss.backward()
            topt.step()
            topt.zero_grad(set_to_none=True)
            return float(out.loss.detach())
    else:
        from ssft_jax import hf_io
        cfg, params = hf_io.load_hf_params(str(d / "hf"), hf_io.load_hf_config(d / "hf"))
        cfg = cfg.replace(remat=args.remat)
        opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)
        jrows = {k: jnp.asarray(v) for k, v in cr.items()}

        def loss_fn(p, r):
            h = forward(cfg, p, r["tokens"], r["attention"], r["positions"], return_hidden=True)
            logp = token_logprobs(h, output_embedding(cfg, p), r["targets"], chunk_size=args.worker_chunk)
            m = r["loss"].astype(jnp.float32)
            return -(logp * m).sum() / jnp.maximum(m.sum(), 1.0)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def jax_step(p, o, r):
            loss, g = jax.value_and_grad(loss_fn)(p, r)
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        box = {"p": params, "o": opt.init(params)}

        def step():
            box["p"], box["o"], loss = jax_step(box["p"], box["o"], jrows)
            return float(block(loss))
    for i in range(args.worker_warmup + args.worker_steps):
        t0 = time.perf_counter()
        loss = step()
        if i == 0:
            first = loss
        if i >= args.worker_warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": med(times) * 1e3, "first_loss": first}))


if __name__ == "__main__":
    sys.exit(main())
