"""SSFT with LoRA beside SSFT full fine-tuning, from the same base, on the demo task (issue 21's figures).

    python bench/bench_lora.py [--quick] [--base_steps K] [--steps S] [--out DIR (default workdir_bench_lora)]

A from-scratch model is no base for LoRA (there is nothing to adapt), so the setting is: (1) full-FT SFT-mixed
(every trace under <think1>) for K steps on the demo config: a base that writes the task, with one tag row trained
and the other N-1 still the mean embedding, all equal; exported as an HF folder. (2) From that folder, S steps of
SSFT with full fine-tuning and S steps of SSFT with LoRA (rank, alpha from --rank/--alpha; the tag rows trained,
the base frozen), same data order, optimizer and schedule. (3) Greedy evaluation of both on the held-out questions
with the demo's code (`demo.evaluate_method`): MI / log M and the tag -> strategy matrix; and the per-device
memory `memory_plan` gives for each run's config. Writes <out>/results.json and prints a markdown report.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stage_config(base_config, hf_dir: str, steps: int, lora: bool, rank: int, alpha: float):
    c = base_config.copy_and_resolve_references()
    c.model.hf_dir, c.tokenizer = hf_dir, ""  # the base's export, its tokenizer (tags included)
    c.ssft.method = "ssft"
    c.num_steps = steps
    c.lora.update(enabled=lora, rank=rank, alpha=alpha, base_dtype="float32")
    return c


def main(argv=None) -> dict:
    from ssft_jax import datasets, demo, lora as lora_lib, memory_plan, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the demo's 'tiny' config, a few steps (the test)")
    ap.add_argument("--base_steps", type=int, default=None, help="SFT-mixed steps of the base (default 160; quick 6)")
    ap.add_argument("--steps", type=int, default=None, help="SSFT steps of each arm (default 100; quick 4)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--out", default="workdir_bench_lora", help="run folders and results.json (git-ignored)")
    args = ap.parse_args(argv)
    base_steps = args.base_steps or (6 if args.quick else 160)
    steps = args.steps or (4 if args.quick else 100)
    out = pathlib.Path(args.out)
    # Every run starts over: a run folder left by an earlier invocation would be resumed from its last checkpoint
    # (train.run resumes), so a finished base would train no steps and the arms would start from another config's.
    for name in ("base", "full", "lora"):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]

    # The task issue 21's figures (README, LoRA) were measured on; the demo's default has since become the styles set.
    config = demo.demo_config(args.quick, base_steps, dataset="synthetic")
    config.checkpoint.every_steps = 10_000
    budgets = demo.fit_budgets(config)
    checker, classifier = demo._checker_and_classifier(argparse.Namespace(checker=None, classifier=None), config)
    _, heldout = datasets.build_records(config)
    base_c = config.copy_and_resolve_references()
    base_c.ssft.method = "sft_mixed"
    t0 = time.perf_counter()
    base = train.run(base_c, out / "base", progress=False)
    base_s = time.perf_counter() - t0
    print(f"base: sft_mixed {base['final_step']} steps in {base_s:.0f}s, final loss "
          f"{base['losses'][max(base['losses'])]:.3f}", flush=True)

    arms: dict[str, dict] = {}
    for name, use_lora in (("full", False), ("lora", True)):
        c = stage_config(config, base["export_dir"], steps, use_lora, args.rank, args.alpha)
        t0 = time.perf_counter()
        run = train.run(c, out / name, progress=False)
        train_s = time.perf_counter() - t0
        if use_lora:  # evaluate the adapted model through its merged weights (equal to 1e-5, tests/test_lora.py)
            run = dict(run, state={"params": lora_lib.merge(run["model_config"], run["lora"], run["frozen"],
                                                            run["state"]["params"])})
        # every held-out question scores MI and the matrix (no best-fixed-tag choice here): the README's figures
        ev = demo.evaluate_method(run, "ssft", checker, classifier, heldout, temperatures=[0.0],
                                  max_new_tokens=config.data.max_trace_len, seed=0, validation=0)[0.0]
        plan = memory_plan.make_plan(c, num_devices=1)
        state_rows = ("parameters", "adapters (trainable)", "optimizer state", "gradients", "optimizer update")
        arms[name] = {"train_seconds": train_s, "final_loss": run["losses"][max(run["losses"])],
                      "tag_counts": run["tag_counts"], "plan_total_bytes": plan.total,
                      "plan_state_bytes": sum(b for k, b, _ in plan.rows if k in state_rows),
                      "plan_arguments_bytes": plan.arguments, "trainable_params": plan.params.get(
                          "lora_count", plan.params["count"]), "eval": {k: v for k, v in ev.items() if k != "examples"}}
        print(f"{name}: {steps} SSFT steps in {train_s:.0f}s, MI/logM {ev['mutual_information_frac_logM']:.3f}, "
              f"distinct {ev['distinct_strategies']:.2f}, Pass@1 coverage {ev['pass@1_coverage']:.3f}", flush=True)

    report = [
        f"base: SFT-mixed full FT, {base_steps} steps ({base_s:.0f}s); then {steps} SSFT steps per arm; "
        f"greedy on {len(heldout)} held-out questions; load average at start {load:.2f}",
        "",
        "| arm | trainable params | MI / log M | MI (nats) | distinct strategies / question | Pass@1 (coverage tag) "
        "| Pass@N | final loss | train s | memory_plan: weights + optimizer + grads (KiB) | total per device (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        e = a["eval"]
        report.append(
            f"| {name} | {a['trainable_params']:,} | {e['mutual_information_frac_logM']:.3f} | "
            f"{e['mutual_information_nats']:.3f} | {e['distinct_strategies']:.2f} | "
            f"{e['pass@1_coverage']:.3f} | {e['pass@N']:.3f} | {a['final_loss']:.3f} | "
            f"{a['train_seconds']:.0f} | {a['plan_state_bytes'] / 2**10:.1f} | {a['plan_total_bytes'] / 2**20:.2f} |"
        )
    for name, a in arms.items():
        report += ["", demo.matrix_markdown(f"SSFT {name}", a["eval"])]
    text = "\n".join(report)
    print(text)
    result = {"base_steps": base_steps, "steps": steps, "rank": args.rank, "alpha": args.alpha, "load_avg": load,
              "budgets": budgets, "heldout": len(heldout), "arms": arms, "report": text}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
