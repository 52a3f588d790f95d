"""The main job: a CPU-minutes reproduction of mode collapse (SFT-mixed, random tags) vs mode preservation (SSFT).

A small decoder is trained from scratch on the synthetic multi-strategy arithmetic task (every question comes with
M correct traces in M machine-recognisable strategies), once per method with the same data, model, steps and seed;
each model is then evaluated on held-out questions: one generation per forking tag (for `sft_mixed`, which has a
single tag, N generations under that tag), greedy and across temperatures. The verifier names the strategy of
every generation, which gives the tag -> strategy matrix and the mutual information between tag and strategy.

    python -m ssft_jax.demo                      # ~15 minutes on 2 CPU cores; writes demo_out/
    python -m ssft_jax.demo --quick              # a smoke run (what the tests run)
    python -m ssft_jax.demo --real               # SmolLM2-135M on GSM8K multi-trace, a few steps: training diagnostics
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time
from typing import Any

import numpy as np

METHODS = ("sft_mixed", "random", "ssft")
TEMPERATURES = (0.0, 0.5, 1.0)


def demo_config(quick: bool, steps: int | None):
    from ssft_jax.config import load_config
    c = load_config("demo", "tiny" if quick else "")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)  # one CPU device: fake devices would only slow it down
    if steps:
        c.num_steps = steps
    return c


def distinct_strategies(generations: list[dict], num_tags: int) -> float:
    """Mean number of distinct recognised strategies among the N parallel generations of a question."""
    by_q: dict[int, set] = {}
    for g in generations:
        if g["sample"] == 0 and g["slot"] < num_tags:
            s = by_q.setdefault(g["question_index"], set())
            if g["strategy"] is not None:
                s.add(g["strategy"])
    return float(np.mean([len(s) for s in by_q.values()]))


def evaluate_method(run: dict, method: str, dataset, heldout: list[dict], *, temperatures, max_new_tokens: int,
                    seed: int):
    """`dataset`: the run's `datasets.DatasetSpec` (its checker, and its strategy classifier for the matrices)."""
    from ssft_jax import evaluate

    per_temp = {}
    for temp in temperatures:
        res = evaluate.evaluate_model(
            run["model_config"], run["state"]["params"], run["tokenizer"], run["tags"], heldout, dataset.checker,
            classifier=dataset.classifier, num_samples_per_tag=1, temperature=temp, top_p=1.0,
            max_new_tokens=max_new_tokens, seed=seed, shared_tag=method == "sft_mixed", tag_counts=run["tag_counts"])
        m = res.metrics
        per_temp[temp] = {
            "pass@1_think1": m["pass@1"]["value"],
            # The paper's alternative: the tag matched most often in training (for sft_mixed, its one tag).
            "pass@1_coverage": m["pass@1_coverage"]["value"],
            "coverage_tag": m["pass@1_coverage"]["tag"],
            "cons@N_native": m["cons@N_native"],
            "pass@N": m["pass@k"][str(run["tags"].n)],
            "distinct_strategies": distinct_strategies(res.generations, run["tags"].n),
            "mutual_information_nats": m["strategy"]["mutual_information_nats"],
            "mutual_information_frac_logM": m["strategy"]["mutual_information_frac_logM"],
            "recognised_rate": m["strategy"]["recognised_rate"],
            "tag_strategy_counts": m["strategy"]["tag_strategy_counts"],
            "strategy_names": m["strategy"]["names"],
            "examples": [g for g in res.generations if g["question_index"] == 0],
        }
    return per_temp


def markdown_table(results: dict[str, Any], num_traces: int, temp: float) -> str:
    head = ("| method | Pass@1 `<think1>` greedy | Pass@1 T=%.1f | Pass@1 coverage tag greedy | Cons@N (native) greedy | "
            "Pass@N greedy | distinct strategies / %d (greedy) | MI(tag; strategy) nats | MI / log M | final train loss |"
            % (temp, num_traces))
    lines = [head, "|" + "---|" * 10]
    for method, r in results.items():
        g, t = r["eval"][0.0], r["eval"][temp]
        lines.append(f"| {method} | {g['pass@1_think1']:.3f} | {t['pass@1_think1']:.3f} | "
                     f"{g['pass@1_coverage']:.3f} (`<think{g['coverage_tag'] + 1}>`) | {g['cons@N_native']:.3f} | "
                     f"{g['pass@N']:.3f} | {g['distinct_strategies']:.2f} | {g['mutual_information_nats']:.3f} | "
                     f"{g['mutual_information_frac_logM']:.3f} | {r['final_loss']:.3f} |")
    return "\n".join(lines)


def matrix_markdown(method: str, ev: dict) -> str:
    names = ev["strategy_names"]
    lines = [f"**{method}** (greedy; rows = generation slot: tags, or samples of the one tag for sft_mixed)", "",
             "| slot | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, row in enumerate(ev["tag_strategy_counts"]):
        lines.append(f"| {i + 1} | " + " | ".join(str(int(x)) for x in row) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], temperatures, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, axes = plt.subplots(1, len(methods) + 2, figsize=(4.2 * (len(methods) + 2), 3.8))
    for ax, method in zip(axes, methods):
        ev = results[method]["eval"][0.0]
        mat = np.asarray(ev["tag_strategy_counts"], float)
        mat = mat / np.maximum(mat.sum(1, keepdims=True), 1)
        ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{method}\nMI/logM = {ev['mutual_information_frac_logM']:.2f}")
        ax.set_xticks(range(len(ev["strategy_names"])), [n.replace("_", "\n") for n in ev["strategy_names"]], fontsize=7)
        ax.set_yticks(range(mat.shape[0]), [f"slot {i + 1}" for i in range(mat.shape[0])], fontsize=7)
    for ax, key, label in ((axes[-2], "distinct_strategies", "distinct strategies among N generations"),
                           (axes[-1], "pass@1_think1", "Pass@1 (<think1>)")):
        for method in methods:
            ax.plot(temperatures, [results[method]["eval"][t][key] for t in temperatures], marker="o", label=method)
        ax.set_xlabel("temperature")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_synthetic(args) -> dict[str, Any]:
    from ssft_jax import datasets, train

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    config = None
    for method in args.methods:
        config = demo_config(args.quick, args.steps)
        config.ssft.method = method
        workdir = out / method
        if workdir.exists() and not args.resume:
            shutil.rmtree(workdir)
        t0 = time.perf_counter()
        run = train.run(config, workdir, progress=not args.quiet)
        train_s = time.perf_counter() - t0
        _, heldout = datasets.build_records(config)
        t0 = time.perf_counter()
        ev = evaluate_method(run, method, datasets.get_dataset(config.data.name), heldout,
                             temperatures=args.temperatures, max_new_tokens=config.data.max_trace_len, seed=config.seed)
        results[method] = {"final_loss": run["losses"][max(run["losses"])], "train_seconds": train_s,
                           "eval_seconds": time.perf_counter() - t0, "steps": run["final_step"],
                           "tag_counts": run["tag_counts"], "assignment_patterns": run["assignment_patterns"][:8],
                           "eval": ev}
        print(f"[{method}] {run['final_step']} steps in {train_s:.0f}s, loss {results[method]['final_loss']:.3f}, "
              f"greedy MI/logM {ev[0.0]['mutual_information_frac_logM']:.3f}, "
              f"distinct {ev[0.0]['distinct_strategies']:.2f}")

    temp = args.temperatures[-1]
    M = config.ssft.max_traces
    report = ["# SSFT demo: mode collapse vs mode preservation", "",
              f"Synthetic multi-strategy arithmetic ({config.data.synthetic.difficulty}), M={M} strategies, "
              f"N={config.ssft.num_tags} tags, {config.model.init.num_hidden_layers}-layer d={config.model.init.hidden_size} "
              f"decoder from scratch, {results[args.methods[0]]['steps']} steps x {config.batch_size} questions per method, "
              f"{config.data.synthetic.heldout} held-out questions.", "",
              markdown_table(results, M, temp), ""]
    for method in results:
        report += [matrix_markdown(method, results[method]["eval"][0.0]), ""]
    report += ["Across temperatures (N parallel generations per question):", "",
               "| method | " + " | ".join(f"T={t}: distinct / Pass@1" for t in args.temperatures) + " |",
               "|---|" + "---|" * len(args.temperatures)]
    for method in results:
        cells = [f"{results[method]['eval'][t]['distinct_strategies']:.2f} / {results[method]['eval'][t]['pass@1_think1']:.3f}"
                 for t in args.temperatures]
        report.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(report) + "\n")
    serialisable = {m: {**r, "eval": {str(t): v for t, v in r["eval"].items()}} for m, r in results.items()}
    (out / "results.json").write_text(json.dumps(serialisable, indent=2, default=str))
    plot(results, args.temperatures, out / "results.png")
    print("\n".join(report))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return results


def run_real(args) -> dict[str, Any]:
    """SmolLM2-135M on GSM8K multi-trace questions for a few steps: what that budget can honestly show is the training
    signal (loss), the matching diagnostics and tag usage, not accuracy."""
    from ssft_jax import config as config_lib, train

    out = pathlib.Path(args.out) / "real"
    rows = {}
    for method in args.methods:
        c = config_lib.load_config("smollm2_gsm8k")
        c.mesh.update(data=1, num_devices=1)
        c.ssft.method = method
        c.export_hf = False
        if args.steps:
            c.num_steps = args.steps
        workdir = out / method
        if workdir.exists() and not args.resume:
            shutil.rmtree(workdir)
        run = train.run(c, workdir, progress=not args.quiet)
        from ssft_jax.metrics_log import read_metrics
        logged = read_metrics(workdir)
        rows[method] = {"losses": run["losses"], "tag_counts": run["tag_counts"],
                        "patterns": run["assignment_patterns"][:5],
                        "matched_nll": [r["matched_nll"] for r in logged],
                        "unmatched_nll": [r["unmatched_nll"] for r in logged],
                        "seconds": run["seconds"]}
        print(f"[real/{method}] losses {[round(v, 3) for v in run['losses'].values()]} tag_counts {run['tag_counts']} "
              f"matched/unmatched NLL {rows[method]['matched_nll'][-1]:.3f}/{rows[method]['unmatched_nll'][-1]:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    p.add_argument("--real", action="store_true", help="SmolLM2-135M + GSM8K multi-trace instead of the synthetic task")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + ("fixed",))
    p.add_argument("--temperatures", nargs="+", type=float, default=list(TEMPERATURES))
    p.add_argument("--resume", action="store_true", help="continue existing runs in --out instead of starting over")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of a config/data error")
    args = p.parse_args(argv)
    if args.temperatures[0] != 0.0:
        args.temperatures = [0.0] + args.temperatures  # greedy is always reported
    (run_real if args.real else run_synthetic)(args)
    return 0


def cli() -> None:
    """The console script: expected errors are one message and exit code 2 (`ssft_jax.cli`)."""
    from ssft_jax import cli as cli_lib
    raise SystemExit(cli_lib.run_reporting_errors(main))


if __name__ == "__main__":
    cli()
