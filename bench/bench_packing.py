"""Packed train rows (`data.packed`) against the unpacked layout on realistic trace lengths.

    python bench/bench_packing.py [--quick] [--reps 5] [--batches 40]

Length distributions (token counts; the demo's character tokenizer for GSM8K):
  gsm8k     /work/shared/data/gsm8k/example_model_solutions.jsonl: each question's 4 model solutions (6B/175B,
            finetuned/verification) as its M=4 traces, characters + 1 end-of-turn token.
  longtail  a synthetic multi-teacher shape: trace j of a question comes from teacher j, whose length is log-normal
            (sigma 0.6) with medians 1x, 2.15x, 4.6x, 10x the shortest teacher's (10x apart), capped at T; prompts
            log-normal with median P/4, capped at P.
Reported per distribution: computed train slots per real token, unpacked vs packed with pack_fill="questions"
(pack_rows the fewest rows, in steps of the data-parallel size, with at most 5% of questions deferred) and with
pack_fill="tokens" (rows for the same mean questions per batch, the same B: `choose_token_fill`), the
questions per batch and the deferrals, and for the demo model on CPU the step time of each, interleaved in one
process (per question, since a "tokens" batch holds a varying number; os.getloadavg() beside it). The 7B/32B configs:
`memory_plan` and `flops.step_flops` of both layouts on the longtail shape at the paper's P=1024, T=31712.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
MODELS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def gsm8k_lengths(limit: int) -> list[tuple[int, list[int]]]:
    out = []
    with open(GSM8K) as f:
        for line in f:
            r = json.loads(line)
            sols = [r[m]["solution"] for m in MODELS if isinstance(r.get(m), dict)]
            if len(sols) == 4:
                out.append((len(r["question"]) + 30, [len(s) + 1 for s in sols]))  # + the chat template's tokens
            if len(out) >= limit:
                break
    return out


def longtail_lengths(n: int, P: int, T: int, shortest_median: float, seed: int = 0) -> list[tuple[int, list[int]]]:
    rng = np.random.default_rng(seed)
    medians = shortest_median * np.array([1.0, 10 ** (1 / 3), 10 ** (2 / 3), 10.0])
    out = []
    for _ in range(n):
        p = int(min(P, max(8, rng.lognormal(np.log(P / 4), 0.5))))
        tr = [int(min(T, max(2, rng.lognormal(np.log(m), 0.6)))) for m in medians]
        out.append((p, tr))
    return out


def questions_from(lengths, vocab: int, seed: int = 0):
    from ssft_jax import data as D

    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, vocab, n).astype(np.int32)  # noqa: E731
    return [D.TokenizedQuestion(index=i, id=f"q{i}", where=f"lengths[{i}]", prompt_ids=ids(p),
                                trace_ids=tuple(ids(n) for n in tr), truncated=(False,) * len(tr))
            for i, (p, tr) in enumerate(lengths)]


def packing_stats(qs, layout, num_batches: int) -> dict:
    """Slots per real token of the train rows over `num_batches` batches, the questions per batch and the
    deferrals."""
    from ssft_jax import data as D

    table, lengths = np.ones((layout.num_tags, layout.tag_len), np.int32), np.full(layout.num_tags, layout.tag_len)
    it = D.make_iterator(qs, layout, table, lengths, seed=0)
    real = slots = questions = 0
    for _ in range(num_batches):
        batch = next(it)
        b = batch["train"]
        real += int(np.count_nonzero(b["segment_ids"])) + layout.tag_len * int(b["trace_valid"].sum())
        slots += b["segment_ids"].size
        questions += int(np.sum(batch["question_index"] >= 0))
    return {"real": real, "slots": slots, "deferred": getattr(it, "deferred_total", 0),
            "questions_per_batch": questions / num_batches}


def choose_token_fill(qs, layout, num_batches: int, step: int, slots_factor: float = 1.0):
    """pack_fill="tokens": rows for the same mean questions per batch as `layout.batch_size` (the mean demand of B
    questions over ~95% full rows, in steps of `step`), and question slots for `slots_factor` times B. The cost pass
    computes every slot, so spare slots cost cost-pass work; too few cap the batches of short questions. 1.0 (the
    same B) filled 93% (longtail) / 92% (GSM8K) of the train slots at 97% of the question slots used, 1.25 and
    1.5 both 95% / 94% at 79% / 66% used."""
    mean = sum(len(q.prompt_ids) * len(q.trace_ids) + sum(map(len, q.trace_ids)) for q in qs) / len(qs)
    rows = max(step, int(round(mean * layout.batch_size / (0.95 * layout.pack_row_len) / step)) * step)
    lay = dataclasses.replace(layout, pack_rows=rows, pack_fill="tokens",
                              batch_size=int(np.ceil(slots_factor * layout.batch_size)))
    return lay, packing_stats(qs, lay, num_batches)


def choose_pack_rows(qs, layout, num_batches: int, step: int, max_deferred: float = 0.05):
    """The fewest rows (a multiple of `step`) whose packing defers at most `max_deferred` of the questions."""
    from ssft_jax import data as D

    mean = sum(len(q.prompt_ids) * len(q.trace_ids) + sum(map(len, q.trace_ids)) for q in qs) / len(qs)
    rows = max(step, int(mean * layout.batch_size / layout.pack_row_len) // step * step)  # below this nothing fits
    while rows < layout.batch_size * layout.num_traces:
        lay = dataclasses.replace(layout, pack_rows=rows)
        try:
            st = packing_stats(qs, lay, num_batches)
            if st["deferred"] <= max_deferred * num_batches * layout.batch_size:
                return lay, st
        except D.PackingError:
            pass
        rows += step
    lay = dataclasses.replace(layout, pack_rows=layout.batch_size * layout.num_traces)
    return lay, packing_stats(qs, lay, num_batches)


TABLE_HEAD = (
    "| lengths | pack_fill | B x M | P+Lt+T | unpacked slots / real token | packed rows x len | packed slots / "
    "real token | real share (packed) | questions per batch | deferrals | saving |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_rows(name, layout, unpacked, packed):
    """One row; the saving is per question (pack_fill="tokens" batches hold a varying number of questions)."""
    u, p = unpacked["slots"] / unpacked["real"], packed["slots"] / packed["real"]
    q = packed["questions_per_batch"]
    return (f"| {name} | {layout.pack_fill} | {layout.batch_size}x{layout.num_traces} | {layout.max_prompt_len}+"
            f"{layout.tag_len}+{layout.max_trace_len} | {u:.2f} | {layout.pack_rows} x {layout.pack_row_len} | "
            f"{p:.3f} | {100 * packed['real'] / packed['slots']:.1f}% | {q:.2f} of {layout.batch_size} | "
            f"{packed['deferred']} | {u / p:.2f}x |")


def demo_step_times(qs, layouts: dict, reps: int, tiny: bool):
    """Step time of the demo model on CPU (real trainer step, ssft) for each layout, interleaved in one process."""
    import jax

    from ssft_jax import assembly, config as config_lib, data as D, mesh as mesh_lib, train_state

    first = next(iter(layouts.values()))
    c = config_lib.load_config("demo")
    c.model.init.update(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, max_position_embeddings=8192)
    if tiny:
        c.model.init.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8)
    c.ssft.update(num_tags=first.num_tags, max_traces=first.num_traces, cost_prefix_len=first.cost_len,
                  cost_layout="packed", tag_mode="special")
    c.tokenizer = "char"
    c.batch_size = first.batch_size
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    pieces = assembly.build(c, mesh=mesh)
    table, lengths = pieces.tag_table, pieces.tag_lengths
    lt = table.shape[1]
    out, steps = {}, {}
    for name, lay in layouts.items():
        lay = dataclasses.replace(lay, tag_len=lt)
        c.batch_size = lay.batch_size
        it = D.make_iterator(qs, lay, table, lengths, seed=0)
        batch = mesh_lib.to_global(next(it), mesh)
        opt = assembly.make_optimizer(c, 100)
        params = jax.tree.map(lambda x: x.copy(), pieces.params)  # each variant's state is donated
        state = train_state.init_state(params, opt, 0, mesh)
        step = assembly.make_step(c, pieces.model_config, lay, opt, state, batch, mesh)
        state, m = step(state, batch, table, lengths)  # compile
        jax.block_until_ready(m["loss"])
        steps[name] = [step, state, batch]
        out[name] = []
    for _ in range(reps):  # interleaved: all see the same machine load
        for name, s in steps.items():
            t0 = time.perf_counter()
            s[1], m = s[0](s[1], s[2], table, lengths)
            jax.block_until_ready(m["loss"])
            out[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in out.items()}


def big_config_rows(name: str, pack_rows: int, pack_len: int):
    from ssft_jax import config as config_lib, flops as flops_lib, memory_plan

    rows = []
    for packed in (False, True):
        c = config_lib.load_config(name)
        c.data.update(packed=packed, pack_rows=pack_rows if packed else 0, pack_len=pack_len if packed else 0)
        plan = memory_plan.make_plan(c, config_name=name)
        lay = dataclasses.replace(
            __import__("ssft_jax.assembly", fromlist=["x"]).build_layout(c, plan.dims["Lt"], num_processes=1))
        # the layout the planner planned (ssft.cost_layout="auto" decided, as the trainer decides it)
        f = flops_lib.step_flops(plan.cfg, lay, c.batch_size, needs_costs=True, cost_layout=plan.dims["cost_layout"])
        chip = memory_plan.accelerator_chips(c.accelerator)[0]
        rows.append(f"| {name} | {'packed ' + str(pack_rows) + ' x ' + str(lay.pack_row_len) if packed else 'unpacked'}"
                    f" | {plan.train_pass['total'] / 2**30:.1f} | {plan.total / 2**30:.1f} | "
                    f"{f.train_pass / 1e15:.1f} | {f.model / 1e15:.1f} | {memory_plan.verdict(plan.total, chip)} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 timing rep (what the tests run)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.batches = 1, 6

    from ssft_jax import data as D

    B, M, N, Lt = (4 if args.quick else 8), 4, 6, 1
    nq = B * args.batches + 4 * B
    dists = {}
    g = gsm8k_lengths(nq)
    P_g, T_g = max(p for p, _ in g), max(max(t) for _, t in g)
    dists["gsm8k"] = (g, P_g, T_g)
    P_l, T_l = (32, 256) if args.quick else (128, 1024)
    dists["longtail"] = (longtail_lengths(nq, P_l, T_l, T_l / 40), P_l, T_l)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(TABLE_HEAD)
    chosen = {}
    for name, (lens, P, T) in dists.items():
        lay_u = D.LayoutConfig(num_tags=N, num_traces=M, cost_len=min(32, T), max_prompt_len=P, max_trace_len=T,
                               tag_len=Lt, batch_size=B)
        qs = questions_from(lens, 90)
        unp = packing_stats(qs, lay_u, args.batches)
        lay_p, pk = choose_pack_rows(qs, lay_u, args.batches, step=1)
        lay_t, tk = choose_token_fill(qs, dataclasses.replace(lay_u, pack_rows=1), args.batches, step=1)
        chosen[name] = (qs, {"unpacked": (lay_u, unp), "packed, questions": (lay_p, pk),
                             "packed, tokens": (lay_t, tk)})
        print(table_rows(name, lay_p, unp, pk))
        print(table_rows(name, lay_t, unp, tk))
    print()
    print("| lengths | demo model step, unpacked (s) | packed, questions (s) | packed, tokens (s) | per question: "
          "questions / unpacked | tokens / unpacked | load average |")
    print("|---|---|---|---|---|---|---|")
    # --quick times the longtail shape only (the gsm8k rows above are packing arithmetic; its timing adds three
    # compilations and nothing the longtail timing does not exercise)
    for name, (qs, variants) in chosen.items():
        if args.quick and name != "longtail":
            continue
        t = demo_step_times(qs, {k: lay for k, (lay, _) in variants.items()}, args.reps, tiny=args.quick)
        per_q = {k: t[k] / st["questions_per_batch"] for k, (_, st) in variants.items()}
        print(
            f"| {name} | {t['unpacked']:.3f} | {t['packed, questions']:.3f} | {t['packed, tokens']:.3f} | "
            f"{per_q['packed, questions'] / per_q['unpacked']:.2f} | {per_q['packed, tokens'] / per_q['unpacked']:.2f}"
            f" | {os.getloadavg()[0]:.2f} |"
        )
    # Paper scale: the longtail shape at P=1024, T=31712 (shortest teacher median T/40 ~ 790 tokens), batch 16;
    # rows in steps of the configs' data-parallel size (16: one row per chip per step of the choice).
    P, T = 1024, 31712
    lens = longtail_lengths(32 * args.batches + 64, P, T, T / 40)
    lay_u = D.LayoutConfig(num_tags=6, num_traces=4, cost_len=1000, max_prompt_len=P, max_trace_len=T, tag_len=6,
                           batch_size=16)
    qs = questions_from(lens, 1000)
    unp = packing_stats(qs, lay_u, args.batches)
    lay_p, pk = choose_pack_rows(qs, lay_u, args.batches, step=16)
    # 2x the question slots: one 32k row per chip is the floor, so the rows hold ~24 questions of this shape
    lay_t, tk = choose_token_fill(qs, dataclasses.replace(lay_u, pack_rows=16), args.batches, step=16,
                                  slots_factor=2)
    print()
    print(TABLE_HEAD)
    print(table_rows("longtail, paper scale", lay_p, unp, pk))
    print(table_rows("longtail, paper scale", lay_t, unp, tk))
    print()
    print("| config | train layout | train pass (GiB/device) | total (GiB/device) | train PFLOPs/step | step "
          "PFLOPs | verdict |")
    print("|---|---|---|---|---|---|---|")
    for name in ("qwen2p5_7b", "qwen2p5_32b"):
        for row in big_config_rows(name, lay_p.pack_rows, lay_p.pack_row_len):
            print(row)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
