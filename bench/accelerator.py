"""One prepared accelerator check (GPU or TPU): step times, MFU, memory, matching share and decode speed.

    bash bench/run_on_gpu.sh                    # on the GPU machine: installs the carried wheels, runs both below
    python bench/accelerator.py [--out DIR]     # the check (~6 min on one H200); DIR: $OUT or out/accelerator
    python bench/accelerator.py --xla-flags-ab  # the step with each XLA flag setting, one child process per setting
    python bench/accelerator.py --cpu-smoke     # the same code paths at tiny size on the CPU (tests run this)

Per model (Qwen2.5-0.5B and -1.5B shapes from their config.json, `memory_plan.PRESETS`, random weights; the
paper's recipe: N=6, M=4, bf16 compute over fp32 master weights, remat and attention/log-prob chunks of
`config.paper_recipe`), on synthetic token rows (prompts up to P=256, traces up to T=3072 tokens):
  1. step time of sft_mixed and of ssft with each cost-pass layout (`packed`, `prefix_cache`) at each cost prefix L,
     the ratio ssft / sft_mixed beside its FLOP floor (1 + cost-pass FLOPs / train FLOPs, `ssft_jax.flops`);
  2. tokens/s and MFU (model FLOPs / time / the device's bf16 peak), also against the bf16 matmul rate measured
     here, beside the published anchor for JAX trainers on Hopper;
  3. peak device memory (`memory_stats()`) against `memory_plan.make_plan` and XLA's `memory_analysis()`;
  4. matching's share of the ssft step (`losses.assign` and `second_best_gap` jitted alone), and decode tokens/s of
     `sampling.generate_forked` with the shared prompt cache (B questions x N tags).
Variants of one model share one train state (each step donates it and the next variant takes the result), so the
process peak is one state plus the largest step's temporaries, comparable with the plan of one config; variants
run in order of predicted memory, and the peak after each variant's first step is read. Timings exclude
compilation, block on the result and interleave the variants round by round. Writes accelerator.json and
accelerator.md (and xla_flags_ab.{json,md} with --xla-flags-ab).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ssft_jax import xla_flags  # noqa: E402  (no jax import: the flags must be set before jax starts)

# Published MFU of JAX trainers on Hopper (not measured here): the yardstick for the MFU column.
ANCHORS = [("MaxText, Llama2-7B, 8x H100, bf16 (as MaxText reports)", 0.50)]


@dataclasses.dataclass(frozen=True)
class ModelRun:
    preset: str  # a memory_plan.PRESETS name
    cost_lens: tuple[int, ...]  # L values to time ssft at
    batch: int  # questions per step
    decode: bool = True


FULL = dict(models=[ModelRun("qwen2.5-0.5b", (256, 1000), 4), ModelRun("qwen2.5-1.5b", (256,), 4)],
            P=256, T=3072, rounds=5, warmup=1, decode_questions=4, decode_prompt=256, decode_tokens=128,
            matmul=8192)
# Tiny model (registered into PRESETS for this process only), tiny rows: seconds on a CPU, every code path.
SMOKE_PRESET = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
                    rope_theta=1e6, eos_token_id=1, bos_token_id=0)
SMOKE = dict(models=[ModelRun("smoke-tiny", (8,), 2)], P=16, T=32, rounds=2, warmup=0, decode_questions=2,
             decode_prompt=16, decode_tokens=16, matmul=256)
SMOKE_SHAPES = dict(attention_chunk=16, logprob_chunk=64)  # so the chunked paths the paper recipe uses still run


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", "--quick", dest="smoke", action="store_true",
                    help="tiny model on the CPU, same code paths (--quick: the bench/ convention)")
    ap.add_argument("--out", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"], "accelerator"),
                    help="output folder (default: $OUT/accelerator, else out/accelerator)")
    ap.add_argument("--models", default="", help="comma-separated presets to run (default: all of the mode's)")
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds (default 5; smoke 2)")
    ap.add_argument("--xla-flags", default="ours", choices=sorted(xla_flags.SETTINGS),
                    help="the XLA GPU flag setting of this process (ssft_jax.xla_flags.SETTINGS)")
    ap.add_argument("--xla-flags-ab", action="store_true", help="time the step under each --ab-settings setting, "
                    "one child process each, interleaved over --ab-pairs passes")
    ap.add_argument("--ab-settings", default="xla_default,ours")
    ap.add_argument("--ab-pairs", type=int, default=1)
    ap.add_argument("--ab-child", action="store_true", help=argparse.SUPPRESS)  # step times only, JSON on stdout
    ap.add_argument("--peak-flops", type=float, default=0.0, help="bf16 peak FLOP/s per device (default: by kind)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Before jax: the flags, and the A/B over flag settings (children only: this process never starts a backend, so it
# holds no GPU memory while they run)
# ----------------------------------------------------------------------------------------------------------------

def set_flags(args) -> dict:
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        return {"setting": args.xla_flags, "applied": [], "dropped": [], "note": "CPU: no GPU flags"}
    wanted = list(xla_flags.SETTINGS[args.xla_flags])
    if not xla_flags.gpu_present():
        return {"setting": args.xla_flags, "applied": [], "dropped": [], "note": "no NVIDIA GPU: flags not set"}
    kept, dropped = xla_flags.usable(wanted) if wanted else ([], [])
    xla_flags.apply(kept)
    return {"setting": args.xla_flags, "applied": kept, "dropped": dropped, "XLA_FLAGS": os.environ.get("XLA_FLAGS")}


def xla_flags_ab(args, out: pathlib.Path) -> dict:
    settings = args.ab_settings.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(args.ab_pairs):
        for s in settings:
            cmd = [sys.executable, os.path.abspath(__file__), "--ab-child", "--xla-flags", s, *(
                ["--cpu-smoke"] if args.smoke else []), *(["--models", args.models] if args.models else [])]
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each child sets its own
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                raise SystemExit(f"--ab-child {s} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
            runs[s].append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = settings[0]
    lines = [f"## XLA flag settings (one process each, {args.ab_pairs} pass(es); ratio = step time / "
             f"{base}'s)\n", "| setting | flags applied | variant | step ms (median) | / " + base + " |",
             "|---|---|---|---|---|"]
    table = {}
    for s, rs in runs.items():
        for variant in rs[0]["step_ms"]:
            ms = sorted(r["step_ms"][variant] for r in rs)[len(rs) // 2]
            b = sorted(r["step_ms"][variant] for r in runs[base])[len(runs[base]) // 2]
            table.setdefault(s, {})[variant] = ms
            lines.append(f"| {s} | {' '.join(rs[0]['flags']['applied']) or '(none)'} | {variant} | {ms:.1f} | "
                         f"{ms / b:.3f} |")
    result = {"settings": {s: list(xla_flags.SETTINGS[s]) for s in settings}, "runs": runs, "median_ms": table}
    out.mkdir(parents=True, exist_ok=True)
    (out / "xla_flags_ab.json").write_text(json.dumps(result, indent=2))
    (out / "xla_flags_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


# ----------------------------------------------------------------------------------------------------------------
# The measurement (jax imported from here on)
# ----------------------------------------------------------------------------------------------------------------

def matching_share(config, batch: int, ssft_step_ms: float) -> dict:
    """`losses.assign` and `second_best_gap` jitted alone on costs of the step's shape [B, N, M]: what the ssft step
    spends on matching. The config's solver at 6x4 enumerates every assignment, so random costs time it exactly."""
    import jax
    import jax.numpy as jnp

    from ssft_jax import losses, matching

    from timing_helpers import block, interleaved, med

    N, M, matcher = config.ssft.num_tags, config.ssft.max_traces, config.ssft.matcher
    cost = jax.random.uniform(jax.random.key(2), (batch, N, M), jnp.float32, 5.0, 15.0)
    tv, rv = jnp.ones((batch, N), bool), jnp.ones((batch, M), bool)
    assign = jax.jit(lambda c_: losses.assign("ssft", c_, tv, rv, jax.random.key(0), matcher))
    tags0 = block(assign(cost))[0]
    gap = jax.jit(lambda c_, t_: losses.second_best_gap(c_, t_, tv, rv, matcher))
    block(gap(cost, tags0))
    t = interleaved({"assign": lambda: block(assign(cost)), "gap": lambda: block(gap(cost, tags0))}, 10, 2)
    a_ms, g_ms = med(t["assign"]) * 1e3, med(t["gap"]) * 1e3
    return dict(solver=matching.resolve_method(matcher, N, M), assign_ms=a_ms, gap_ms=g_ms, ssft_step_ms=ssft_step_ms,
                share=(a_ms + g_ms) / ssft_step_ms)


def decode_speed(name: str, cfg, params, tag_table, mode: dict) -> dict:
    """bench_decode's measurement: B questions x N tags, the prompt prefilled once and its cache shared, every row
    decoding `decode_tokens` (no stop token); bf16 compute from the fp32 weights, as in evaluation."""
    import numpy as np

    import bench_decode

    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(2, cfg.vocab_size, mode["decode_prompt"])) for _ in range(mode["decode_questions"])]
    tag_ids = [list(t) for t in tag_table]
    res = bench_decode.bench(name, cfg.replace(remat="none"), params, prompts, tag_ids, samples=1,
                             new_tokens=mode["decode_tokens"], repeats=2, modes=(True,))
    prefill, total, tps = res[True]
    return dict(rows=len(prompts) * len(tag_ids), prompt=mode["decode_prompt"], new_tokens=mode["decode_tokens"],
                prefill_s=prefill, total_s=total, decode_tokens_per_s=tps)


def measure(args, mode: dict, flags_info: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ssft_jax import (
        assembly,
        config as config_lib,
        data as data_lib,
        flops,
        losses,
        memory_plan,
        mesh as mesh_lib,
        plan_check,
        train_state,
    )

    from timing_helpers import block, interleaved, med, ratio

    dev = jax.devices()[0]
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=[dev])
    peak = flops.peak_flops_per_device(dev.device_kind, args.peak_flops)
    rounds = args.rounds or mode["rounds"]

    def device_memory(key):
        stats = dev.memory_stats() or {}
        return stats.get(key)

    # The bf16 matmul rate this device reaches (the MFU literature uses the spec sheet's peak; both are shown).
    n = mode["matmul"]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    block(mm(a, a))
    t_mm = med(interleaved({"mm": lambda: block(mm(a, a))}, 5, 1)["mm"])
    matmul_rate = 2 * n ** 3 / t_mm

    def make_config(run: ModelRun, method: str, L: int, cost_layout: str):
        c = config_lib.paper_recipe(config_lib.base_config())
        c.model.preset = run.preset
        if args.smoke:
            c.model.update(**SMOKE_SHAPES)
        c.ssft.update(method=method, cost_prefix_len=L, cost_layout=cost_layout)
        c.data.update(max_prompt_len=mode["P"], max_trace_len=mode["T"])
        c.batch_size, c.micro_batches, c.accelerator = run.batch, 1, ""
        c.mesh.update(data=1, fsdp=1, tensor=1)
        return c

    def synthetic_batches(layout, vocab, count=2, seed=0):
        """Random token rows with lengths spread over [budget/2, budget] (padding as in real data)."""
        rng = np.random.default_rng(seed)
        P, T, M = layout.max_prompt_len, layout.max_trace_len, layout.num_traces
        qs = [data_lib.TokenizedQuestion(
            index=i, id=str(i), where="synthetic",
            prompt_ids=rng.integers(2, vocab, rng.integers(P // 2, P + 1)).astype(np.int32),
            trace_ids=tuple(rng.integers(2, vocab, rng.integers(T // 2, T + 1)).astype(np.int32) for _ in range(M)),
            truncated=(False,) * M) for i in range(layout.batch_size * count)]
        # Text tags (the paper's): Lt random tokens each, distinct per tag.
        table = rng.integers(2, vocab, (layout.num_tags, layout.tag_len)).astype(np.int32)
        lengths = np.full((layout.num_tags,), layout.tag_len, np.int32)
        it = data_lib.make_iterator(qs, layout, table, lengths, seed=seed)
        host = [next(it) for _ in range(count)]
        return host, [mesh_lib.to_global(b, mesh) for b in host], jnp.asarray(table), jnp.asarray(lengths)

    results = {"models": {}}
    for run in mode["models"]:
        if args.models and run.preset not in args.models.split(","):
            continue
        variants = [("sft_mixed", run.cost_lens[0], "packed")]
        variants += [("ssft", L, lay) for L in run.cost_lens for lay in ("packed", "prefix_cache")]
        if args.ab_child:  # the A/B times the headline pair only
            variants = variants[:2]
        configs = {v: make_config(run, *v) for v in variants}
        plans = {v: memory_plan.make_plan(c, num_devices=1) for v, c in configs.items()}
        variants.sort(key=lambda v: plans[v].total)  # each peak reading then belongs to the variant just run
        facts = memory_plan.resolve_model(configs[variants[0]])
        cfg, tag_len = facts.cfg, facts.tag_len
        c0 = configs[variants[0]]
        _, params = assembly.load_params(c0, cfg, mesh)  # model.hf_dir is empty: initialised from the seed
        optimizer = assembly.make_optimizer(c0, 1000)
        box = {"state": train_state.init_state(params, optimizer, c0.seed, mesh)}
        del params
        data = {}  # L -> (host batches, device batches, tag table, tag lengths)
        for L in sorted({v[1] for v in variants}):  # the batch shapes depend on L only
            data[L] = synthetic_batches(assembly.build_layout(make_config(run, "ssft", L, "packed"), tag_len,
                                                              num_processes=1), cfg.vocab_size)
        steps, rows = {}, {}
        for v in variants:
            c = configs[v]
            layout = assembly.build_layout(c, tag_len, num_processes=1)
            host, batches, table, lengths = data[v[1]]
            jitted = assembly.make_step(c, cfg, layout, optimizer, box["state"], batches[0], mesh)
            t0 = time.perf_counter()
            compiled = jitted.lower(box["state"], batches[0], table, lengths).compile()
            compile_s = time.perf_counter() - t0
            counter = {"i": 0}

            def step(compiled=compiled, batches=batches, table=table, lengths=lengths, counter=counter):
                b = batches[counter["i"] % len(batches)]
                counter["i"] += 1
                box["state"], metrics = compiled(box["state"], b, table, lengths)
                block((box["state"], metrics))
            step()  # first call: allocations, then the process peak so far
            sf = flops.step_flops(cfg, layout, c.batch_size, needs_costs=losses.get_method(v[0]).needs_costs,
                                  cost_layout=v[2])
            counts = [data_lib.batch_token_counts(h) for h in host]
            name = "sft_mixed" if v[0] == "sft_mixed" else f"ssft L={v[1]} {v[2]}"
            steps[name] = step
            rows[name] = dict(
                method=v[0],
                L=v[1],
                cost_layout=v[2],
                compile_s=compile_s,
                model_flops=sf.model,
                executed_flops=sf.executed,
                train_slots=float(np.mean([k["train_slots"] for k in counts])),
                train_real=float(np.mean([k["train_real"] for k in counts])),
                plan_bytes=plans[v].total,
                xla=plan_check.memory_figures(compiled),
                peak_bytes_so_far=device_memory("peak_bytes_in_use"),
                R=layout.cost_row_len,
                S=layout.train_row_len,
            )
        times = interleaved(steps, rounds, mode["warmup"])
        base = times["sft_mixed"]
        floor_base = rows["sft_mixed"]["model_flops"]
        for name, r in rows.items():
            t = med(times[name])
            r.update(step_ms=t * 1e3, step_ms_all=[x * 1e3 for x in times[name]], ratio_to_sft=ratio(times[name], base),
                     floor=r["model_flops"] / floor_base, tokens_per_s=r["train_real"] / t,
                     slot_tokens_per_s=r["train_slots"] / t, mfu=(r["model_flops"] / t / peak) if peak else None,
                     model_flops_per_s=r["model_flops"] / t, hfu_vs_matmul=r["executed_flops"] / t / matmul_rate)
        model_out = dict(params=int(sum(x.size for x in jax.tree.leaves(box["state"]["params"]))), tag_len=tag_len,
                         layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size, remat=cfg.remat,
                         dtype=cfg.dtype, param_dtype=cfg.param_dtype, batch=run.batch, P=mode["P"], T=mode["T"],
                         variants=rows)
        if args.ab_child:
            results["models"][run.preset] = model_out
            break

        c_ssft = configs[("ssft", run.cost_lens[0], "packed")]  # the trainer's default layout
        model_out["matching"] = matching_share(c_ssft, run.batch, rows[f"ssft L={run.cost_lens[0]} packed"]["step_ms"])
        if run.decode:
            model_out["decode"] = decode_speed(run.preset, cfg, box["state"]["params"],
                                               np.asarray(data[run.cost_lens[0]][2]), mode)
        results["models"][run.preset] = model_out
        box.clear(), steps.clear(), data.clear()  # this model's state and executables go before the next one's

    results.update(device=dict(kind=dev.device_kind, platform=dev.platform, count=jax.device_count(),
                               peak_flops=peak, matmul_bf16_flops_per_s=matmul_rate, matmul_n=n,
                               peak_bytes_in_use=device_memory("peak_bytes_in_use"),
                               bytes_limit=device_memory("bytes_limit")),
                   versions=dict(python=platform.python_version(), jax=jax.__version__,
                                 jaxlib=jax.lib.__version__), xla_flags=flags_info, rounds=rounds)
    return results


def markdown(res: dict) -> str:
    d = res["device"]
    def gib(x):  # GiB on a device, MiB for the smoke run's tiny model
        return "n/a" if x is None else f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    out = [f"## Accelerator check: {d['count']} x {d['kind']} ({d['platform']}), jax {res['versions']['jax']}, "
           f"XLA flags: {' '.join(res['xla_flags'].get('applied', [])) or '(none)'}"
           + (f" (dropped, unknown to this XLA: {' '.join(res['xla_flags']['dropped'])})"
              if res["xla_flags"].get("dropped") else "") + "\n",
           f"bf16 peak {d['peak_flops'] / 1e12:.0f} TFLOP/s (spec), measured bf16 matmul {d['matmul_n']}^3: "
           f"{d['matmul_bf16_flops_per_s'] / 1e12:.1f} TFLOP/s\n" if d["peak_flops"] else
           f"bf16 peak: unknown for this device; measured matmul {d['matmul_n']}^3: "
           f"{d['matmul_bf16_flops_per_s'] / 1e12:.3f} TFLOP/s\n"]
    out += ["| model | variant | R / S | step ms | ssft / sft_mixed | FLOP floor | measured / floor | train tok/s "
            "(real) | MFU (spec peak) | executed / matmul rate | plan | XLA peak | process peak | "
            "compile s |", "|" + "---|" * 14]
    for name, m in res["models"].items():
        for v, r in m["variants"].items():
            xla = (r["xla"] or {}).get("peak")
            out.append(f"| {name} | {v} | {r['R'] if r['method'] != 'sft_mixed' else '-'} / {r['S']} | "
                       f"{r['step_ms']:.1f} | {r['ratio_to_sft']:.3f} | {r['floor']:.3f} | "
                       f"{r['ratio_to_sft'] / r['floor']:.3f} | {r['tokens_per_s']:,.0f} | {pct(r['mfu'])} | "
                       f"{pct(r['hfu_vs_matmul'])} | {gib(r['plan_bytes'])} | {gib(xla)} | "
                       f"{gib(r['peak_bytes_so_far'])} | {r['compile_s']:.1f} |")
    out.append("\nAnchors (published, not measured here): " + "; ".join(f"{k}: MFU {v:.0%}" for k, v in ANCHORS))
    out.append("\n| model | matcher | assign ms | second-best gap ms | share of ssft step | decode rows | decode "
               "tok/s (shared prompt cache) |")
    out.append("|---|---|---|---|---|---|---|")
    for name, m in res["models"].items():
        g, dc = m.get("matching"), m.get("decode")
        if g:
            tps = f"{dc['decode_tokens_per_s']:,.0f}" if dc else "-"
            out.append(f"| {name} | {g['solver']} | {g['assign_ms']:.3f} | {g['gap_ms']:.3f} | {g['share']:.2%} | "
                       f"{dc['rows'] if dc else '-'} | {tps} |")
    out.append("\n(process peak = `memory_stats()['peak_bytes_in_use']` after the variant's first step, one shared "
               "train state; it includes every variant run before it, which the plan predicts to need less)")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = SMOKE if args.smoke else FULL
    out = pathlib.Path(args.out or ROOT / "out" / "accelerator")
    if args.xla_flags_ab:
        xla_flags_ab(args, out)
        return 0
    flags_info = set_flags(args)
    if args.smoke:
        from ssft_jax import memory_plan
        memory_plan.PRESETS.setdefault("smoke-tiny", SMOKE_PRESET)
    t0 = time.perf_counter()
    res = measure(args, mode, flags_info)
    res["wall_s"] = time.perf_counter() - t0
    if args.ab_child:
        m = next(iter(res["models"].values()))
        print(json.dumps({"flags": flags_info, "step_ms": {k: v["step_ms"] for k, v in m["variants"].items()}}))
        return 0
    md = markdown(res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accelerator.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "accelerator.md").write_text(md)
    print(md)
    print(f"wrote {out / 'accelerator.json'} and {out / 'accelerator.md'} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
