"""GFPO's costs and its two estimators' noise.

    python bench/bench_gfpo.py --init_from /tmp/demo_ssft [--steps 8] [--questions 16] [--budgets 6,12,24]
    python bench/bench_gfpo.py --quick     # smoke run: a tiny SSFT run made on the spot

1. Time: a short real GFPO run (`ssft_jax.gfpo.run`, the config `configs/gfpo_demo.py`) per estimator; per step
   (the first, which compiles, excluded; median): rollout seconds (policy + sampling + checking), update seconds
   (the jitted prompt-only update), their ratio, and rollout tokens/s.
2. Noise at equal rollout budget R per question. Each question's per-tag success probability acc(x, t) is measured
   once from the model (`--acc_samples` rollouts per tag); rewards are then Bernoulli(acc) draws, so thousands of
   estimates cost no generation. Every estimate of the policy gradient at ratio 1 is sum_{x,t} c[x,t] grad log
   pi(t|x) for some coefficients c (grpo: the G draws' weighted advantages; enumerate: pi_old(t)(rbar_t - b)), so
   with the Gram matrix K = J J^T of the log-policy's Jacobian J (computed once) the squared error of any estimate
   against the exact gradient grad sum_t pi_t acc_t is (c - c*)^T K (c - c*) exactly. Reported per estimator and
   budget: relative MSE E|g_hat - g|^2 / |g|^2 and the mean cosine to g. grpo is run without std normalisation
   (its expectation is (G-1)/G times g: the group mean includes the rollout itself) and with it (the paper's form:
   rescaled per question, so cosine is its fair measure).
3. Processes: the same GFPO run on 2 devices as 1 process x 2 devices and as 2 processes x 1 device (the multi-host
   path: `jax.distributed`, gloo collectives, each process checking its share; `tests/multihost_worker.py`), one
   after the other; per step (median after the first): rollout tokens/s per device and the update/rollout time
   ratio.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ssft_jax import assembly, checkers, config as config_lib, datasets, gfpo, metrics_log, sampling, tag_policy  # noqa: E402  # noqa: E402


def machine_load() -> str:
    import os
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def tiny_ssft(workdir: pathlib.Path) -> pathlib.Path:
    from ssft_jax import train
    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(num_devices=1, data=1)
    c.export_hf = False
    train.run(c, workdir, progress=False)
    return workdir


def time_steps(init_from: pathlib.Path, estimator: str, steps: int, questions: int, quick: bool) -> dict:
    c = config_lib.load_config("gfpo_demo", "tiny" if quick else "")
    c.mesh.update(num_devices=1, data=1)
    c.export_hf = False
    c.logging.tensorboard = False
    c.gfpo.update(init_from=str(init_from), estimator=estimator, num_steps=steps, questions_per_step=questions)
    with tempfile.TemporaryDirectory() as wd:
        s = gfpo.run(c, wd, progress=False)
        recs = metrics_log.read_metrics(wd)[1:]  # the first step compiles the sampler and the update
    med = lambda k: statistics.median(r[k] for r in recs)
    rows = questions * (c.gfpo.group_size if estimator == "grpo" else len(s["valid_tags"]) * c.gfpo.samples_per_tag)
    return {
        "estimator": estimator,
        "rows": rows,
        "rollout_s": med("rollout_seconds"),
        "update_s": med("update_seconds"),
        "tokens_per_s": med("rollout_tokens_per_s"),
        "tokens": med("rollout_tokens"),
    }


def success_table(lm, questions: gfpo.Questions, idx, valid, samples: int, max_new: int, temperature: float,
                  checker):
    """acc[q, t]: the fraction of `samples` rollouts under tag t that the checker accepts."""
    choice = tag_policy.TagChoice.for_tags(lm.tokenizer, lm.tags)
    tags = [t for t in range(lm.tags.n) if valid[t]]
    acc = np.zeros((len(idx), lm.tags.n))
    prompts = [questions.prompts[i] for i in idx]
    suffixes = [[list(choice.tag_ids[t]) for t in tags for _ in range(samples)]] * len(idx)
    outs = sampling.generate_rows(lm.cfg, lm.params, prompts, suffixes, max_new_tokens=max_new,
                                  eos_token_ids=lm.eos_token_ids, temperature=temperature, seed=1,
                                  vocab_limit=lm.vocab_limit)
    for b, row in enumerate(outs):
        for j, g in enumerate(row):
            body = g.tokens[:-1] if g.finished else g.tokens
            ok = checker(questions.records[idx[b]], lm.tokenizer.decode(body, skip_special_tokens=True)).correct
            acc[b, tags[j // samples]] += ok / samples
    return acc


def gram_of_log_policy(lm, questions, idx, valid):
    """(pi [B, N], K [B*N, B*N] = J J^T) with J the Jacobian of log pi(t | x_b) over all parameters."""
    choice = tag_policy.TagChoice.for_tags(lm.tokenizer, lm.tags)
    width = sampling.bucket_length(max(len(questions.prompts[i]) for i in idx) + len(choice.prefix_ids))
    tokens, lengths = tag_policy.policy_rows([questions.prompts[i] for i in idx], choice.prefix_ids, width)
    f = lambda p: tag_policy.tag_log_probs(lm.cfg, p, jnp.asarray(tokens), jnp.asarray(lengths),
                                           jnp.asarray(choice.choice_ids), jnp.asarray(valid)).reshape(-1)
    logp = f(lm.params)
    jac = jax.jacrev(f)(lm.params)
    flat = jnp.concatenate([x.reshape(logp.shape[0], -1) for x in jax.tree.leaves(jac)], axis=1)
    flat = jnp.where(jnp.isfinite(flat), flat, 0.0)  # invalid tags: -inf log-prob, no gradient
    K = np.asarray(flat @ flat.T, np.float64)
    return np.exp(np.asarray(logp).reshape(len(idx), -1)), K


def coefficients(estimator: str, pi, acc, valid, budget: int, rng, *, normalize_std: bool):
    """c [B, N] of one estimate (the gradient is sum c[b, t] grad log pi(t | x_b), up to the 1/B of the mean)."""
    B, N = pi.shape
    if estimator == "enumerate":
        k = budget // int(valid.sum())
        rbar = rng.binomial(k, np.where(valid, acc, 0.0)) / k
        return np.where(valid, pi * (rbar - np.sum(pi * rbar, -1, keepdims=True)), 0.0)
    tags = gfpo.draw_row_tags("grpo", pi, valid, group_size=budget, samples_per_tag=1, rng=rng)
    r = rng.random(tags.shape) < np.take_along_axis(acc, tags, -1)
    adv = np.asarray(tag_policy.group_advantages(jnp.asarray(r, jnp.float32), normalize_std=normalize_std))
    c = np.zeros((B, N))
    np.add.at(c, (np.repeat(np.arange(B), budget), tags.ravel()), adv.ravel() / budget)
    return c


def processes_table(init_from: pathlib.Path, steps: int, questions: int) -> list[dict]:
    """Per-step GFPO timing on 2 devices, as 1 process and as 2 processes (`tests/multihost_worker.py`)."""
    import os
    import subprocess

    import portpicker
    worker = ROOT / "tests" / "multihost_worker.py"
    # XLA_FLAGS are kept (the worker replaces only the device count): under the test suite, its compile-time flags
    env = {k: v for k, v in os.environ.items() if k != "JAX_COORDINATOR_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    rows = []
    for processes in (1, 2):
        with tempfile.TemporaryDirectory() as wd:
            base = [sys.executable, str(worker), "--stage", "gfpo", "--init_from", str(init_from), "--workdir",
                    f"{wd}/run", "--num_steps", str(steps), "--set", f"gfpo.questions_per_step={questions}",
                    "--devices", str(2 // processes)]
            port = portpicker.pick_unused_port()
            cmds = [base + ["--out", f"{wd}/{i}.json"]
                    + (["--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)]
                       if processes > 1 else []) for i in range(processes)]
            procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True) for c in cmds]
            outs = [pr.communicate(timeout=900)[0] for pr in procs]
            for pr, out in zip(procs, outs):
                if pr.returncode:
                    raise RuntimeError(f"GFPO worker failed:\n{out[-3000:]}")
            recs = [r for r in metrics_log.read_metrics(f"{wd}/run") if "rollout_seconds" in r][1:]
        med = lambda k: statistics.median(r[k] for r in recs)
        rows.append({"processes": processes, "devices": 2, "rollout_s": med("rollout_seconds"),
                     "update_s": med("update_seconds"), "tokens": med("rollout_tokens"),
                     "tokens_per_s_per_device": med("rollout_tokens") / med("rollout_seconds") / 2,
                     "update_over_rollout": med("update_seconds") / med("rollout_seconds")})
    return rows


def noise_table(pi, K, acc, valid, budgets, repeats, seed=0):
    exact = np.where(valid, pi * (acc - np.sum(pi * acc, -1, keepdims=True)), 0.0).ravel()
    gnorm2 = exact @ K @ exact
    rng = np.random.default_rng(seed)
    rows = []
    for R in budgets:
        for name, est, norm in (("enumerate", "enumerate", False), ("grpo", "grpo", False),
                                ("grpo+std", "grpo", True)):
            if est == "enumerate" and R % int(valid.sum()):
                continue
            errs, coss = [], []
            for _ in range(repeats):
                c = coefficients(est, pi, acc, valid, R, rng, normalize_std=norm).ravel()
                d = c - exact
                errs.append(d @ K @ d / gnorm2)
                coss.append(c @ K @ exact / np.sqrt(max(c @ K @ c, 1e-30) * gnorm2))
            rows.append({"budget": R, "estimator": name, "rel_mse": float(np.mean(errs)),
                         "cosine": float(np.mean(coss))})
    return rows, float(np.sqrt(gnorm2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", default="", help="an SSFT workdir (default: a tiny run made on the spot)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--budgets", default="6,12,24", help="rollouts per question to compare the estimators at")
    p.add_argument("--acc_samples", type=int, default=8, help="rollouts per (question, tag) measuring acc")
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--json", default="")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no_processes", action="store_true", help="skip the 1-vs-2-process timing (part 3)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.questions, a.budgets, a.acc_samples, a.repeats = 3, 4, "6,12", 2, 200
    print(machine_load())
    tmp = tempfile.TemporaryDirectory()
    init = pathlib.Path(a.init_from) if a.init_from else tiny_ssft(pathlib.Path(tmp.name) / "ssft")

    timing = []
    for est in ("grpo", "enumerate"):
        t = time_steps(init, est, a.steps, a.questions, a.quick)
        timing.append(t)
        print(f"[timing] {est:9s} rows/step={t['rows']:4d}  rollout {t['rollout_s'] * 1e3:8.1f} ms  update "
              f"{t['update_s'] * 1e3:7.1f} ms  rollout/update {t['rollout_s'] / t['update_s']:6.1f}x  "
              f"rollout {t['tokens_per_s']:8.0f} tok/s")

    procs = []
    if not a.no_processes:
        procs = processes_table(init, a.steps, a.questions)
        print(f"\nprocesses (grpo, {a.questions} questions/step on 2 CPU devices, median of {a.steps - 1} steps)")
        print("| processes x devices | rollout s | update s | update / rollout | rollout tokens/s per device |")
        print("|---|---|---|---|---|")
        for r in procs:
            print(f"| {r['processes']} x {2 // r['processes']} | {r['rollout_s']:.3f} | {r['update_s']:.3f} | "
                  f"{r['update_over_rollout']:.2f} | {r['tokens_per_s_per_device']:.0f} |")

    lm = assembly.load_checkpoint_for_generation(init)
    config = config_lib.from_saved(lm.train_config)
    train_records, _ = datasets.build_records(config)
    questions = gfpo.Questions(train_records, lm.tokenizer, lm.tags, max_prompt_len=config.data.max_prompt_len)
    idx = np.arange(min(a.questions, len(questions)))
    valid = gfpo.valid_tags("used", lm.tags.n, lm.tag_counts)
    t0 = time.perf_counter()
    checker = checkers.get_checker(datasets.get_dataset(config.data.name).checker)  # the SSFT run's task's checker
    acc = success_table(lm, questions, idx, valid, a.acc_samples, config.data.max_trace_len, temperature=0.7,
                        checker=checker)
    pi, K = gram_of_log_policy(lm, questions, idx, valid)
    budgets = [int(b) for b in a.budgets.split(",")]
    exact = np.where(valid, pi * (acc - np.sum(pi * acc, -1, keepdims=True)), 0.0).ravel()
    if exact @ K @ exact < 1e-20:  # e.g. --quick's tiny model solves nothing: every estimator is exactly 0
        print("acc is flat (every tag equally good on every question): using a random acc table so the comparison "
              "has a gradient to estimate")
        acc = np.random.default_rng(0).uniform(size=acc.shape)
    rows, gnorm = noise_table(pi, K, acc, valid, budgets, a.repeats)
    print(f"\nnoise ({len(idx)} questions, {int(valid.sum())} valid tags, acc from {a.acc_samples} rollouts/tag, "
          f"{a.repeats} estimates each, |grad| = {gnorm:.3g}, {time.perf_counter() - t0:.1f}s)")
    print("| rollouts / question | estimator | relative MSE | cosine to exact gradient |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['estimator']} | {r['rel_mse']:.3g} | {r['cosine']:.3f} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"timing": timing, "noise": rows, "processes": procs,
                                                    "load": machine_load()},
                                                   indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()
