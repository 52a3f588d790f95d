"""The main job: a CPU-minutes reproduction of mode collapse (SFT-mixed, random tags) vs mode preservation (SSFT).

A small decoder is trained from scratch on the synthetic multi-strategy arithmetic task (every question comes with
M correct traces in M machine-recognisable strategies), once per method with the same data, model, steps and seed;
each model is then evaluated on held-out questions: one generation per forking tag (for `sft_mixed`, which has a
single tag, N generations under that tag), greedy and across temperatures. The verifier names the strategy of
every generation, which gives the tag -> strategy matrix and the mutual information between tag and strategy.

    python -m ssft_jax.demo                      # 3 seeds side by side, ~15 minutes on 2 CPU cores; demo_out/
    python -m ssft_jax.demo --quick              # a smoke run (what the tests run)
    python -m ssft_jax.demo --real               # the comparison on SmolLM2-135M-Instruct (pretrained); demo_out/real
    python -m ssft_jax.demo --seeds 0            # one seed (the default 0,1,2: cells are mean [min, max])
    python -m ssft_jax.demo --dataset NAME       # any registered dataset with a checker and a strategy classifier
    python -m ssft_jax.demo --data FILE.jsonl --classifier mytask:classify   # a user's multi-trace records

Every run also gets an ssft+gfpo row (GFPO on the forking tag from the ssft model; --no-gfpo drops it), and its
prompt/trace budgets and L are fitted to the task's data (`fit_budgets`, the L advisor).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time
from typing import Any

import numpy as np

from ssft_jax import eval_metrics

METHODS = ("sft_mixed", "random", "ssft")
TEMPERATURES = (0.0, 1.0)
# GFPO steps of the ssft+gfpo row: configs/gfpo_demo.py runs 40 (the README's GFPO section); half of that fits the
# 15-minute budget and already moves the tag policy (entropy, self-chosen Pass@1).
DEMO_GFPO_STEPS = 20
GFPO_ROW = "ssft+gfpo"
# The held-out questions that only choose the best fixed tag (evaluate.validation_split; evaluate's default too);
# every Pass@1 figure of the table is on the other two thirds.
VALIDATION_FRACTION = eval_metrics.VALIDATION_FRACTION


def demo_config(quick: bool, steps: int | None, *, dataset: str | None = None, data: str | None = None,
                heldout: int | None = None, seed: int = 0, real: bool = False, scale: str = "cpu"):
    """The demo's run config: configs/demo.py (a model from scratch) or, with `real`, configs/demo_real.py
    (SmolLM2-135M-Instruct; its 'accelerator' variant with scale="accelerator"), their 'tiny' variants with quick;
    on its synthetic task, a registered `dataset`, or a user's JSONL `data` file (with `heldout` questions held out
    for evaluation)."""
    from ssft_jax.config import load_config
    variant = "tiny" if quick else ("accelerator" if real and scale == "accelerator" else "")
    c = load_config("demo_real" if real else "demo", variant)
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)  # one CPU device: fake devices would only slow it down
    c.seed = seed
    if data:
        c.data.update(name="jsonl", path=data, heldout=heldout or (8 if quick else 64))
    elif dataset:
        c.data.name = dataset
    if steps:
        c.num_steps = steps
    return c


def fit_budgets(config) -> dict[str, Any]:
    """Set the prompt and trace budgets (P, T) to what the task's training questions need, so rows carry no more
    padding than the longest question, and L from the L advisor: at least where 95% of trace pairs first differ
    (`data.divergence`), never above T. Returns what was measured, for the report."""
    from ssft_jax import assembly, data as data_lib, datasets

    tokenizer = assembly.build_tokenizer(config)
    tags = assembly.build_tags(config, tokenizer)
    wide = config.copy_and_resolve_references()
    wide.data.update(max_prompt_len=4096, max_trace_len=4096)
    layout = assembly.build_layout(wide, tags.max_tag_len(tokenizer), num_processes=1)
    train_records, _ = datasets.build_records(config)
    d = config.data
    questions, report = data_lib.tokenize_records(train_records, tokenizer, tags, layout,
                                                  on_bad_record=d.on_bad_record, overlong=d.overlong,
                                                  extra_traces=d.extra_traces, format=d.format)
    P = max(len(q.prompt_ids) for q in questions)
    T = max(len(t) for q in questions for t in q.trace_ids)
    advice = report.divergence
    L = min(T, max(int(config.ssft.cost_prefix_len), advice.suggested_cost_len))
    config.data.update(max_prompt_len=int(P), max_trace_len=int(T))
    config.ssft.cost_prefix_len = int(L)
    return {"max_prompt_len": int(P), "max_trace_len": int(T), "cost_prefix_len": int(L),
            "divergence": advice.as_dict()}


def distinct_strategies(generations: list[dict], num_tags: int) -> float:
    """Mean number of distinct recognised strategies among the N parallel generations of a question."""
    by_q: dict[int, set] = {}
    for g in generations:
        if g["sample"] == 0 and g["slot"] < num_tags:
            s = by_q.setdefault(g["question_index"], set())
            if g["strategy"] is not None:
                s.add(g["strategy"])
    return float(np.mean([len(s) for s in by_q.values()]))


def evaluate_method(run: dict, method: str, checker, classifier, heldout: list[dict], *, temperatures,
                    max_new_tokens: int, seed: int, batch_questions: int = 8,
                    validation: float = VALIDATION_FRACTION):
    """Greedy and sampled evaluation of one trained model (`run`: train.run's or gfpo.run's result). validation:
    the share of `heldout` that only chooses the best fixed tag (0: every figure on all of them)."""
    from ssft_jax import evaluate, losses

    per_temp = {}
    for temp in temperatures:
        res = evaluate.evaluate_model(
            run["model_config"], run["state"]["params"], run["tokenizer"], run["tags"], heldout, checker,
            classifier=classifier, num_samples_per_tag=1, temperature=temp, top_p=1.0,
            max_new_tokens=max_new_tokens, seed=seed, shared_tag=not losses.get_method(method).distinct_tags,
            tag_counts=run["tag_counts"],
            validation=validation, batch_questions=batch_questions)
        m = res.metrics
        tc = m.get("tag_choice", {})
        per_temp[temp] = {
            "pass@1_think1": m["pass@1"]["value"],
            # The paper's alternative: the tag matched most often in training (for sft_mixed, its one tag).
            "pass@1_coverage": m["pass@1_coverage"]["value"],
            "coverage_tag": m["pass@1_coverage"]["tag"],
            # The model's own tag choice (GFPO's target) and the best single tag; none for sft_mixed's one tag.
            "pass@1_self_chosen": tc.get("self_chosen_greedy"),
            "pass@1_best_fixed_tag": tc.get("best_fixed_tag", {}).get("value"),  # chosen on the validation split
            "best_fixed_tag": tc.get("best_fixed_tag", {}).get("tag"),
            "pass@1_best_fixed_tag_in_hindsight": tc.get("best_fixed_tag_in_hindsight", {}).get("value"),
            "split": m.get("split"),
            "pass@1_oracle": tc.get("oracle"),
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


def aggregate(values) -> str:
    """One table cell over seeds: the mean, and [min, max] when there is more than one seed."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{np.mean(v):.3f} [{min(v):.2f}, {max(v):.2f}]"


COLUMNS = (  # (header, evaluation temperature: 'greedy' or 'T', key)
    ("Pass@1 `<think1>` greedy", "greedy", "pass@1_think1"),
    ("Pass@1 `<think1>` T=%.1f", "T", "pass@1_think1"),
    ("Pass@1 coverage tag greedy", "greedy", "pass@1_coverage"),
    ("Pass@1 self-chosen tag greedy", "greedy", "pass@1_self_chosen"),
    ("Pass@1 best fixed tag greedy", "greedy", "pass@1_best_fixed_tag"),
    ("Cons@N (native) greedy", "greedy", "cons@N_native"),
    ("Pass@N greedy", "greedy", "pass@N"),
    ("distinct strategies / %d (greedy)", "greedy", "distinct_strategies"),
    ("MI / log M (greedy)", "greedy", "mutual_information_frac_logM"),
)


def markdown_table(results: dict[str, Any], num_traces: int, temp: float) -> str:
    """Rows: methods; cells: the mean over seeds [min, max]; the last column the final train loss."""
    heads = [h % temp if "%.1f" in h else (h % num_traces if "%d" in h else h) for h, _, _ in COLUMNS]
    lines = ["| method | " + " | ".join(heads) + " | final train loss |", "|" + "---|" * (len(COLUMNS) + 2)]
    for method, r in results.items():
        seeds = list(r["seeds"].values())
        cells = [aggregate([s["eval"][0.0 if which == "greedy" else temp][key] for s in seeds])
                 for _, which, key in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {aggregate([s['final_loss'] for s in seeds])} |")
    return "\n".join(lines)


def matrix_markdown(method: str, ev: dict) -> str:
    names = ev["strategy_names"]
    lines = [f"**{method}** (greedy; rows = generation slot: tags, or samples of the one tag for sft_mixed)", "",
             "| slot | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, row in enumerate(ev["tag_strategy_counts"]):
        lines.append(f"| {i + 1} | " + " | ".join(str(int(x)) for x in row) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], temperatures, path: pathlib.Path) -> None:
    """Heat maps of the first seed's tag -> strategy matrices, and diversity / accuracy over temperature."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    first = {m: next(iter(results[m]["seeds"].values())) for m in methods}
    fig, axes = plt.subplots(1, len(methods) + 2, figsize=(4.2 * (len(methods) + 2), 3.8))
    for ax, method in zip(axes, methods):
        ev = first[method]["eval"][0.0]
        mat = np.asarray(ev["tag_strategy_counts"], float)
        mat = mat / np.maximum(mat.sum(1, keepdims=True), 1)
        ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{method}\nMI/logM = {ev['mutual_information_frac_logM']:.2f}")
        ax.set_xticks(range(len(ev["strategy_names"])), [n.replace("_", "\n") for n in ev["strategy_names"]],
                      fontsize=7)
        ax.set_yticks(range(mat.shape[0]), [f"slot {i + 1}" for i in range(mat.shape[0])], fontsize=7)
    for ax, key, label in ((axes[-2], "distinct_strategies", "distinct strategies among N generations"),
                           (axes[-1], "pass@1_think1", "Pass@1 (<think1>)")):
        for method in methods:
            ax.plot(temperatures, [first[method]["eval"][t][key] for t in temperatures], marker="o", label=method)
        ax.set_xlabel("temperature")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# GFPO on the pretrained model (DEMO_GFPO_STEPS steps, as the from-scratch demo): 8 questions x 6 sampled tags per
# step keep a step's rollouts (48 SmolLM2 generations, ~25 s on the CPU) within the budget.
REAL_GFPO = dict(questions_per_step=8, group_size=6)


def _gfpo_run(args, ssft_workdir: pathlib.Path, workdir: pathlib.Path, seed: int, checker) -> dict:
    from ssft_jax import config as config_lib, gfpo

    g = config_lib.load_config("gfpo_demo", "tiny" if args.quick else "")
    if args.real and not args.quick:
        g.gfpo.update(**REAL_GFPO)
    g.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    g.seed = seed
    g.export_hf = False
    g.gfpo.init_from = str(ssft_workdir)
    steps = args.gfpo_steps or (None if args.quick else DEMO_GFPO_STEPS)
    if steps:
        g.gfpo.num_steps = steps
    return gfpo.run(g, workdir, progress=not args.quiet, checker=checker)


def run_seed(args, seed: int) -> dict[str, Any]:
    """Train and evaluate every row for one seed; returns {"methods": {row: result}, "meta": what the report names}
    and writes it to <out>/seed<seed>/result.json (what a parallel worker hands back)."""
    from ssft_jax import datasets, evaluate, train

    out = pathlib.Path(args.out)
    rows = list(args.methods) + ([GFPO_ROW] if args.gfpo and "ssft" in args.methods else [])
    config = demo_config(args.quick, args.steps, dataset=args.dataset, data=args.data, heldout=args.heldout, seed=seed,
                         real=args.real, scale=args.scale)
    checker, classifier = _checker_and_classifier(args, config)
    budgets = fit_budgets(config)
    _, heldout = datasets.build_records(config)
    if not heldout:
        raise SystemExit(f"dataset {config.data.name!r} holds no questions out for evaluation")
    methods: dict[str, Any] = {}
    for method in rows:
        workdir = out / f"seed{seed}" / method
        if workdir.exists() and not args.resume:
            shutil.rmtree(workdir)
        t0 = time.perf_counter()
        if method == GFPO_ROW:
            run = _gfpo_run(args, out / f"seed{seed}" / "ssft", workdir, seed, checker)
            final_loss = None
        else:
            c = config.copy_and_resolve_references()
            c.ssft.method = method
            run = train.run(c, workdir, progress=not args.quiet)
            final_loss = run["losses"][max(run["losses"])]
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate_method(run, "ssft" if method == GFPO_ROW else method, checker, classifier, heldout,
                             temperatures=args.temperatures, seed=seed,
                             max_new_tokens=args.max_new_tokens or config.data.max_trace_len,
                             # a 135M model's decode step reads all its weights: 16 questions x 6 tags share a read
                             batch_questions=16 if args.real else 8)
        methods[method] = {"final_loss": final_loss, "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0,
                           "steps": run["final_step"], "tag_counts": run["tag_counts"], "eval": ev}
        g = ev[0.0]
        print(f"[seed {seed} {method}] {run['final_step']} steps in {train_s:.0f}s, greedy MI/logM "
              f"{g['mutual_information_frac_logM']:.3f}, distinct {g['distinct_strategies']:.2f}, "
              f"Pass@1 coverage {g['pass@1_coverage']:.3f}, self-chosen {g['pass@1_self_chosen']}", flush=True)
    synthetic_sets = {"synthetic": "", "synthetic_styles": ", styles set"}
    task = (f"synthetic multi-strategy arithmetic ({config.data.synthetic.difficulty}"
            f"{synthetic_sets[config.data.name]})" if config.data.name in synthetic_sets
            else f"dataset {config.data.name}" + (f" ({config.data.path})" if args.data else ""))
    cfg = run["model_config"]  # the model every row trained (from scratch, or the pretrained one)
    meta = {"task": task, "M": int(config.ssft.max_traces), "N": int(config.ssft.num_tags),
            "layers": int(cfg.num_hidden_layers), "hidden": int(cfg.hidden_size),
            "model": ("SmolLM2-135M-Instruct (pretrained), full fine-tuning, "
                      f"{config.ssft.tag_mode} tags" if args.real else "from scratch"),
            "batch_size": int(config.batch_size), "heldout": len(heldout), "budgets": budgets,
            "validation": len(evaluate.validation_split([r.get("id", str(i)) for i, r in enumerate(heldout)],
                                                        VALIDATION_FRACTION))}
    result = {"methods": methods, "meta": meta}
    (out / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    (out / f"seed{seed}" / "result.json").write_text(json.dumps(_jsonable(result), indent=2, default=str))
    return result


def _checker_and_classifier(args, config):
    """The task's answer checker and strategy classifier (--checker / --classifier, else the dataset's)."""
    from ssft_jax import checkers, datasets

    spec = datasets.get_dataset(config.data.name)
    classifier = datasets.load_classifier(args.classifier) if args.classifier else spec.classifier
    if classifier is None:
        raise SystemExit(f"dataset {config.data.name!r} has no strategy classifier: pass --classifier "
                         "module:function (a function (record, text) -> strategy name or None, with fn.names)")
    return checkers.get_checker(args.checker or spec.checker), classifier


def _eval_keys(row: dict, key) -> dict:
    """One row's result with its temperature keys converted by `key`: `str` for JSON (whose object keys are
    strings), `float` to read it back."""
    return {**row, "eval": {key(t): e for t, e in row["eval"].items()}}


def _jsonable(result: dict) -> dict:
    return {**result, "methods": {m: _eval_keys(r, str) for m, r in result["methods"].items()}}


def _from_json(result: dict) -> dict:
    return {**result, "methods": {m: _eval_keys(r, float) for m, r in result["methods"].items()}}


# One XLA thread per worker: these models are too small for XLA's CPU thread pool to keep two cores busy (one run
# averages ~1 core: 352 s user in 380 s wall), so seeds side by side finish sooner than seeds one after another.
WORKER_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def _run_seeds_in_workers(args, argv: list[str]) -> dict[int, dict]:
    """Each seed in a subprocess of its own (`--seeds S --worker`), `args.workers` at a time, one XLA thread each."""
    import os
    import sys

    results: dict[int, dict] = {}
    pending, running = list(args.seeds), {}
    # A worker imports what this process can (a --classifier module found through sys.path, e.g. a test's folder).
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + WORKER_XLA_FLAGS).strip(),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    base = _strip_seeds(argv)
    try:
        _supervise(args, base, env, pending, running, results)
    finally:  # an interrupted or failed run leaves no worker behind (their checkpoints stay: --resume continues)
        for proc, log in running.values():
            proc.terminate()
            log.close()
    return results


def _supervise(args, base: list[str], env: dict, pending: list[int], running: dict, results: dict) -> None:
    """Start workers while there are free slots; collect each one's result.json as it exits (a failure raises with
    the end of its log). `running` (seed -> (process, log)) is the caller's, so it can stop what is left."""
    import subprocess
    import sys

    while pending or running:
        while pending and len(running) < args.workers:
            seed = pending.pop(0)
            log = open(pathlib.Path(args.out) / f"seed{seed}.log", "w")
            cmd = [sys.executable, "-m", "ssft_jax.demo", *base, "--seeds", str(seed), "--worker"]
            running[seed] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
            if not args.quiet:
                print(f"[seed {seed}] started in a worker; log: {log.name}", flush=True)
        time.sleep(1.0)
        for seed, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[seed]
            if proc.returncode != 0:
                tail = pathlib.Path(log.name).read_text()[-3000:]
                raise SystemExit(
                    f"seed {seed}'s worker failed (exit {proc.returncode}); the end of {log.name}:\n{tail}"
                )
            results[seed] = _from_json(json.loads((pathlib.Path(args.out) / f"seed{seed}" / "result.json").read_text()))
            if not args.quiet:
                print(f"[seed {seed}] done", flush=True)


def _strip_seeds(argv: list[str]) -> list[str]:
    """The command line without --seeds/--workers (and their values): what every worker shares."""
    out, it = [], iter(argv)
    for a in it:
        if a in ("--seeds", "--workers"):
            next(it, None)
        elif not (a.startswith("--seeds=") or a.startswith("--workers=") or a == "--worker"):
            out.append(a)
    return out


def run_synthetic(args, argv: list[str] | None = None) -> dict[str, Any]:
    """The comparison on the synthetic task, a registered dataset (--dataset) or a JSONL file (--data), per seed."""
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # A bad --classifier / --checker fails here, once, not in every worker.
    _checker_and_classifier(args, demo_config(args.quick, args.steps, dataset=args.dataset, data=args.data,
                                              heldout=args.heldout, real=args.real, scale=args.scale))
    if args.worker or args.workers <= 1 or len(args.seeds) == 1:
        per_seed = {seed: run_seed(args, seed) for seed in args.seeds}
    else:
        per_seed = _run_seeds_in_workers(args, argv or [])
    if args.worker:
        return per_seed
    seconds = time.perf_counter() - t_start
    results: dict[str, Any] = {}
    for seed in args.seeds:
        for method, r in per_seed[seed]["methods"].items():
            results.setdefault(method, {"seeds": {}})["seeds"][seed] = r
    meta = per_seed[args.seeds[0]]["meta"]

    temp = args.temperatures[-1]
    M = meta["M"]
    steps = next(iter(results[args.methods[0]]["seeds"].values()))["steps"]
    budgets = meta["budgets"]
    d = budgets["divergence"]
    title = "a pretrained model" if args.real else "mode collapse vs mode preservation"
    report = [f"# SSFT demo: {title}", "",
              f"{meta['task']}, M={M} traces, N={meta['N']} tags, {meta['layers']}-layer d={meta['hidden']} decoder "
              f"{meta.get('model', 'from scratch')}, {steps} step{'s' * (steps != 1)} x {meta['batch_size']} questions "
              f"per method, "
              f"{meta['heldout']} held-out questions ({meta['validation']} of them only choose the best fixed tag; "
              f"every figure is on the other {meta['heldout'] - meta['validation']}), seeds {list(args.seeds)} "
              f"(cells: mean [min, max] over seeds), {seconds:.0f}s in all"
              + (f" ({args.workers} seeds at a time, one core each)." if args.workers > 1 and len(args.seeds) > 1
                 else "."),
              f"Budgets fitted to the data: P={budgets['max_prompt_len']}, T={budgets['max_trace_len']}, "
              f"L={budgets['cost_prefix_len']} (trace pairs first differ at median {d['median']}, p90 {d['p90']}, "
              f"max {d['max']}; the L advisor suggests L >= {d['suggested_cost_len']})."
              + (f" {GFPO_ROW}: {next(iter(results[GFPO_ROW]['seeds'].values()))['steps']} GFPO steps "
                 "(configs/gfpo_demo.py) from the ssft model."
                 if GFPO_ROW in results else ""), "",
              markdown_table(results, M, temp), ""]
    for method in results:
        report += [matrix_markdown(method, next(iter(results[method]["seeds"].values()))["eval"][0.0]), ""]
    report += ["Across temperatures (N parallel generations per question; mean over seeds):", "",
               "| method | " + " | ".join(f"T={t}: distinct / Pass@1" for t in args.temperatures) + " |",
               "|---|" + "---|" * len(args.temperatures)]
    for method in results:
        seeds = list(results[method]["seeds"].values())
        cells = [f"{np.mean([s['eval'][t]['distinct_strategies'] for s in seeds]):.2f} / "
                 f"{np.mean([s['eval'][t]['pass@1_think1'] for s in seeds]):.3f}" for t in args.temperatures]
        report.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(report) + "\n")
    serialisable = {
        m: {"seeds": {str(s): _eval_keys(v, str) for s, v in r["seeds"].items()}} for m, r in results.items()
    }
    (out / "results.json").write_text(json.dumps({"budgets": budgets, "seconds": seconds, "results": serialisable},
                                                 indent=2, default=str))
    plot(results, args.temperatures, out / "results.png")
    print("\n".join(report))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    p.add_argument("--real", action="store_true",
                   help="SmolLM2-135M-Instruct (pretrained) instead of a model from scratch (configs/demo_real.py); "
                        "writes to <out>/real")
    p.add_argument("--scale", default="cpu", choices=["cpu", "accelerator"],
                   help="--real: 'accelerator' runs configs/demo_real.py:accelerator (more steps, a bigger "
                        "evaluation, 3 seeds) for a GPU/TPU chip")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + ("fixed",))
    p.add_argument("--seeds", type=lambda x: [int(v) for v in x.split(",")], default=None,
                   help="comma-separated seeds; the table reports mean [min, max] over them (default 0,1,2; --real "
                        "on a CPU: 0, what its 60-minute budget allows)")
    p.add_argument("--gfpo", action=argparse.BooleanOptionalAction, default=True,
                   help="add the ssft+gfpo row (GFPO from each seed's ssft model, configs/gfpo_demo.py)")
    p.add_argument("--gfpo_steps", type=int, default=None,
                   help=f"GFPO steps (default {DEMO_GFPO_STEPS}; with --quick, configs/gfpo_demo.py:tiny's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help="a registered dataset with a checker and a strategy classifier")
    src.add_argument("--data", default=None, help="a JSONL file of multi-trace records (held out: 64 questions)")
    p.add_argument("--heldout", type=int, default=None, help="--data: questions held out for evaluation (default 64)")
    p.add_argument("--classifier", default=None,
                   help="module:function naming a generation's strategy (fn(record, text) -> name or None, with "
                        "fn.names); default: the dataset's")
    p.add_argument("--checker", default=None, help="an ssft_jax.checkers name (default: the dataset's)")
    p.add_argument("--temperatures", nargs="+", type=float, default=list(TEMPERATURES))
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="evaluation's generation budget (default: the trace budget T fitted to the data)")
    p.add_argument("--resume", action="store_true", help="continue existing runs in --out instead of starting over")
    p.add_argument("--workers", type=int, default=None,
                   help="seeds run side by side in subprocesses, one XLA thread each (default: one per seed, at most "
                        "2 per core)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one seed inside a --workers run
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of a config/data error")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.real and args.scale == "cpu" else [0, 1, 2]
    if args.real:
        args.out = str(pathlib.Path(args.out) / "real")
    if args.temperatures[0] != 0.0:
        args.temperatures = [0.0] + args.temperatures  # greedy is always reported
    if args.workers is None:
        import os
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # All seeds at once when the cores allow: equal-sized seeds then end together, where a second round would
        # leave a core idle (3 seeds on 2 cores: ~1.5x one seed's time, against 2x in two rounds).
        args.workers = max(1, min(len(args.seeds), 2 * cores))
    run_synthetic(args, list(argv) if argv is not None else __import__("sys").argv[1:])
    return 0


def cli() -> None:
    """The console script: expected errors are one message and exit code 2 (`ssft_jax.cli`)."""
    from ssft_jax import cli as cli_lib
    raise SystemExit(cli_lib.run_reporting_errors(main))


if __name__ == "__main__":
    cli()
