"""Evaluation of forking-tag models: sampling per tag, answer checking, and the paper's metrics.

    python -m ssft_jax.evaluate --workdir W | --hf_dir D [--dataset NAME --path P]
        [--num_questions K --samples_per_tag S --temperature T --top_p P --top_k K --max_new_tokens L]
        [--tags_mode auto|forking|shared --pass1_tag 0 --pass_k 1,6 --cons_k 6,12] --out OUT

writes OUT/generations.jsonl (one line per generation), OUT/metrics.json and OUT/*.png (per-tag accuracy, per-tag
length, tag -> strategy heat map for a dataset with a strategy classifier, e.g. the synthetic task).

Sampling: for each question, S samples under each of the N tags (B questions x N tags x S samples in one batch,
the prompt prefilled once per question; `sampling.generate_forked`). Each of the N "parallel slots" of a question
is one tag. With `shared_tag=True` (tags_mode 'shared', the default for an `sft_mixed` run, whose traces all
trained under one tag) the N parallel generations are N*S samples under tag 0: slot j holds samples j*S..j*S+S-1,
and every metric below is computed the same way over slots instead of tags.

Metrics (arXiv 2510.05132 and its released evaluation code; all accuracies in [0, 1]):
  pass@1[tag t]     mean correctness of the generations under tag t (default t=0, `<think1>`), averaged over questions.
  pass@1[coverage]  the same for the tag matched most often during training (summary.json `tag_counts`; ties -> the
                    lower index), when those statistics are given.
  cons@N (native)   groups of one sample from each of the N slots (group g = sample g of every slot); majority vote
                    inside the group over the extracted answers (generations without an answer do not vote; a tie
                    goes to the answer first given by the lowest slot index); averaged over the S groups and the
                    questions.
  cons@k            majority vote over k samples taken across the tags in round-robin order (sample 0 of slots
                    0..N-1, then sample 1 of slots 0..N-1, ...); the n = N*S samples are cut into floor(n/k)
                    consecutive groups and the score is averaged over them (cons@N is exactly the native cons@N).
  pass@k            the unbiased estimator 1 - C(n-c, k) / C(n, k) over all n = N*S samples of a question, c correct.
  tag choice        with forking tags: Pass@1 under the model's own tag choice (greedy argmax pi(tag | x), and pi
                    sampled), the best fixed tag, and the per-question oracle (best tag per question): what GFPO
                    optimises and its upper bound (`tag_choice_metrics`).
  per-tag           accuracy, answer rate, finished (stopped) rate, generated length (tokens) mean/median/p90/max.
  strategies        for a dataset with a strategy classifier (the synthetic task: `synthetic.classify_strategy`):
                    the strategy of every generation, the N x (num_strategies + 1) tag -> strategy count matrix (last
                    column 'none' = unrecognised), its mutual information (nats, and as a fraction of log M), and the
                    number of distinct strategies over the N tags' first samples (at temperature 0: greedy decoding).
k larger than the samples available raises ValueError before any sampling.

Questions, answer checker and strategy classifier come from the dataset registry (`ssft_jax.datasets`: held-out
records built from the training run's config, or from the default config and --path / --synthetic_difficulty /
--seed) and the checker registry (`ssft_jax.checkers`; --checker overrides the dataset's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ssft_jax import checkers, datasets
from ssft_jax.eval_metrics import (  # noqa: F401  (re-exported: evaluate is where callers find them)
    MIN_QUESTIONS_TO_SPLIT,
    compute_metrics,
    cons_at_k,
    coverage_tag,
    default_validation,
    majority_vote,
    mutual_information,
    native_cons_at_n,
    pass_at_k,
    round_robin,
    tag_choice_metrics,
    tag_strategy_matrix,
    validation_split,
)

# ---------------------------------------------------------------------------------------------------------------
# Sampling + checking
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EvalResult:
    generations: list[dict]  # one per (question, slot, sample): see compute_metrics for the keys (+ id, text)
    metrics: dict
    settings: dict

    def write(self, out_dir: str | pathlib.Path, *, plots: bool = True) -> dict[str, pathlib.Path]:
        return write_outputs(self, out_dir, plots=plots)


def _prompt_of(record: Mapping[str, Any]):
    return record.get("messages") or record["question"]


def evaluate_model(cfg, params, tokenizer, tags, questions: Sequence[Mapping[str, Any]],
                   checker: str | checkers.Checker, *, classifier: datasets.StrategyClassifier | None = None,
                   num_samples_per_tag: int = 1, temperature: float = 0.7, top_p: float = 0.95, top_k: int = 0,
                   max_new_tokens: int = 256, seed: int = 0, shared_tag: bool = False, pass1_tag: int = 0,
                   tag_counts: Sequence[int] | None = None, pass_ks: Sequence[int] | None = None,
                   cons_ks: Sequence[int] | None = None, batch_questions: int = 8,
                   eos_token_ids: Sequence[int] | None = None, vocab_limit: int | None = None,
                   share_prefix: bool = True, progress: bool = False,
                   tag_choice: bool = True, validation: int | float = 0) -> EvalResult:
    """Sample N tags x S samples per question (or N*S under tag 0 with shared_tag), check, compute the metrics.

    questions: records with 'question' (or 'messages') and 'answer' (optional 'id'). checker: a `checkers.CHECKERS`
    name or a Checker. classifier: the dataset's strategy classifier (`DatasetSpec.classifier`), for the strategy
    metrics; None: no strategies. Questions go through in batches of `batch_questions` (the last batch is padded by
    repeating a question, so a run compiles once). Generation seeds: seed + batch index.
    tag_choice: with forking tags, also read the model's own policy over the tags (`tag_policy`) and report what
    choosing the tag per question is worth (`tag_choice_metrics`; valid tags: those with tag_counts > 0, else all).
    validation: questions (a count or a fraction, `validation_split`) that only choose the best fixed tag; every
    metric is then computed on the other questions (the test split), so picking the best of N tags never scores
    itself. 0: one split, the best fixed tag chosen on the questions it is scored on.
    """
    from ssft_jax import sampling, tokenization

    checker = checkers.get_checker(checker)
    N, S = tags.n, num_samples_per_tag
    if S < 1 or not questions:
        raise ValueError(f"need samples_per_tag >= 1 and at least one question (got {S}, {len(questions)})")
    if not 0 <= pass1_tag < N:
        raise ValueError(f"pass1_tag={pass1_tag} is not a tag index in 0..{N - 1}")
    n = N * S
    for k in (*(pass_ks or ()), *(cons_ks or ())):
        if not 1 <= k <= n:
            raise ValueError(f"k={k} is not in 1..{n}: only N*S = {N}*{S} = {n} samples per question")
    eos = list(eos_token_ids) if eos_token_ids is not None else tokenization.eos_token_ids(tokenizer)
    if vocab_limit is None and len(tokenizer) < cfg.vocab_size:
        vocab_limit = len(tokenizer)
    suffixes = [tags.tag_ids(tokenizer, 0)] if shared_tag else tags.all_tag_ids(tokenizer)
    samples = n if shared_tag else S
    prompts = [list(tokenization.render_example(tokenizer, _prompt_of(r), None, tags, None,
                                                example_id=r.get("id")).prompt_ids) for r in questions]

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(questions), desc="evaluate", unit="q", dynamic_ncols=True)
    gens: list[dict] = []
    t0 = time.perf_counter()
    new_tokens = 0
    B = max(1, min(batch_questions, len(questions)))
    for bi, start in enumerate(range(0, len(questions), B)):
        chunk = list(range(start, min(start + B, len(questions))))
        batch_prompts = [prompts[i] for i in chunk] + [prompts[chunk[-1]]] * (B - len(chunk))
        outs = sampling.generate_forked(cfg, params, batch_prompts, suffixes, num_samples=samples,
                                        max_new_tokens=max_new_tokens, eos_token_ids=eos, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed + bi, vocab_limit=vocab_limit,
                                        share_prefix=share_prefix)
        for j, qi in enumerate(chunk):
            rec = questions[qi]
            for t, per_tag in enumerate(outs[j]):
                for s, g in enumerate(per_tag):
                    body = g.tokens[:-1] if g.finished else g.tokens
                    text = tokenizer.decode(body, skip_special_tokens=True)
                    res = checker(rec, text)
                    strategy = classifier(rec, text) if classifier is not None else None
                    slot, sample, tag = (s // S, s % S, 0) if shared_tag else (t, s, t)
                    new_tokens += len(g.tokens)
                    gens.append({"question_index": qi, "id": rec.get("id", str(qi)), "slot": slot, "tag": tag,
                                 "sample": sample, "text": text, "num_tokens": len(g.tokens),
                                 "finished": g.finished, "correct": res.correct, "answer": res.answer,
                                 "strategy": strategy, "gold": str(rec.get("answer"))})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    held = validation_split([r.get("id", str(i)) for i, r in enumerate(questions)], validation) if validation else set()
    scored = [g for g in gens if g["question_index"] not in held]
    metrics = compute_metrics(scored, N, S, pass1_tag=pass1_tag, tag_counts=tag_counts, pass_ks=pass_ks,
                              cons_ks=cons_ks, strategy_names=classifier.names if classifier is not None else None,
                              greedy=temperature == 0.0)
    if tag_choice and not shared_tag and N > 1:
        from ssft_jax import tag_policy

        try:
            choice = tag_policy.TagChoice.for_tags(tokenizer, tags)
        except tag_policy.TagPolicyError as e:  # e.g. 10+ text tags under a digit tokenizer: no one-token choice
            metrics["tag_choice"] = {"unavailable": str(e)}
        else:
            valid = tag_policy.used_tags(tag_counts, N)
            lp = tag_policy.TagPolicy(cfg, params, choice, valid, batch=B).log_probs(prompts)
            metrics["tag_choice"] = tag_choice_metrics(
                scored, dict(enumerate(lp.tolist())), valid,
                select_on=[g for g in gens if g["question_index"] in held] if held else None)
    if held:
        metrics["split"] = {"validation_questions": len(held), "test_questions": len(questions) - len(held),
                            "validation_ids": [questions[i].get("id", str(i)) for i in sorted(held)]}
    metrics["seconds"] = seconds
    metrics["generated_tokens"] = new_tokens
    settings = dict(checker=checker.name, num_tags=N, samples_per_tag=S, shared_tag=shared_tag,
                    tags_mode="shared" if shared_tag else "forking", temperature=temperature, top_p=top_p,
                    top_k=top_k, max_new_tokens=max_new_tokens, seed=seed, batch_questions=B,
                    tag_strings=[tags.tag_string(i) for i in range(N)], share_prefix=share_prefix)
    return EvalResult(gens, metrics, settings)


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------

def plot_metrics(metrics: Mapping[str, Any], generations: Sequence[Mapping[str, Any]], out_dir: pathlib.Path,
                 ) -> list[pathlib.Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    N = metrics["num_tags"]
    shared = N > 1 and all(p["tags"] == [0] for p in metrics["per_tag"])  # N parallel samples under <think1>
    labels = [f"slot {t + 1} (<think1>)" if shared else f"<think{t + 1}>" for t in range(N)]
    paths = []

    fig, ax = plt.subplots(figsize=(max(4, 0.8 * N + 2), 3.2))
    acc = [p["accuracy"] for p in metrics["per_tag"]]
    bars = ax.bar(range(N), acc, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)  # a 0 bar is invisible: its value is written instead
    if not any(acc):
        ax.text(0.5, 0.5, "every tag: accuracy 0", transform=ax.transAxes, ha="center", va="center", color="tab:red")
    ax.set_xticks(range(N), labels, rotation=30)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"per-tag accuracy (pass@1[tag {metrics['pass@1']['tag']}] = "
                 f"{metrics['pass@1']['value'] if metrics['pass@1']['value'] is not None else float('nan'):.3f})")
    fig.tight_layout()
    paths.append(out_dir / "per_tag_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(4, 0.8 * N + 2), 3.2))
    lengths = [[g["num_tokens"] for g in generations if g["slot"] == t] for t in range(N)]
    ax.boxplot(lengths)
    ax.set_xticks(range(1, N + 1), labels, rotation=30)
    ax.set_ylabel("generated tokens")
    ax.set_title("per-tag generation length")
    fig.tight_layout()
    paths.append(out_dir / "per_tag_length.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    st = metrics.get("strategy")
    if st is not None:
        mat = np.asarray(st["tag_strategy_counts"])
        fig, ax = plt.subplots(figsize=(1.3 * mat.shape[1] + 2, 0.5 * N + 1.8))
        im = ax.imshow(mat, cmap="viridis", aspect="auto")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, str(mat[i, j]), ha="center", va="center",
                        color="white" if mat[i, j] < mat.max() / 2 else "black", fontsize=8)
        ax.set_xticks(range(mat.shape[1]), st["names"], rotation=30)
        ax.set_yticks(range(N), labels)
        ax.set_title(f"tag -> strategy (MI {st['mutual_information_nats']:.3f} nats, "
                     f"{st['mutual_information_frac_logM']:.2f} of log M)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        paths.append(out_dir / "tag_strategy.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_outputs(result: EvalResult, out_dir: str | pathlib.Path, *, plots: bool = True) -> dict[str, pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"generations": out / "generations.jsonl", "metrics": out / "metrics.json"}
    with open(paths["generations"], "w", encoding="utf-8") as f:
        for g in result.generations:
            f.write(json.dumps(g, ensure_ascii=False) + "\n")
    paths["metrics"].write_text(json.dumps({"settings": result.settings, "metrics": result.metrics}, indent=2,
                                           default=str))
    if plots:
        for p in plot_metrics(result.metrics, result.generations, out):
            paths[p.stem] = p
    return paths


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

# What evaluation scored, as its settings and output name it (`select_questions`).
SCORED = {
    "heldout": "held-out questions (not trained on)",
    "train": "TRAINING questions",
    "files": "the records of --path (evaluation cannot tell whether the model trained on them)",
}


def select_questions(dataset: str, *, path: str | None = None, train_config: Mapping[str, Any] | None = None,
                     split: str = "heldout", synthetic_difficulty: str = "easy",
                     seed: int = 0) -> tuple[list[dict], str]:
    """Evaluation records of a registered dataset (`datasets.build_records`) and what they are (a `SCORED` key).

    The records are built from the training run's config (as saved with its checkpoint) when it trained on
    `dataset` (and on `path`, when one is given), else from `config.base_config()` for `dataset` with data.path =
    `path`, the synthetic difficulty and the seed given here. split='heldout' takes the held-out part, labelled
    "heldout"; split='train', or a config that holds nothing out (a run on files without `data.heldout`), takes the
    training part, labelled "train"; files that no run config names (jsonl with `path`) are "files". Records are
    read through `ssft_jax.data.read_records` in the config's `data.format` (errors name file:line) and need
    'question' (or 'messages') and 'answer'; a record without an 'id' gets where it was read from as its id."""
    from ssft_jax import config as config_lib, data as data_lib

    if split not in ("heldout", "train"):
        raise ValueError(f"split={split!r}: expected heldout or train")
    spec = datasets.get_dataset(dataset)
    config = config_lib.from_saved(dict(train_config)) if train_config is not None else None
    of_the_run = config is not None and config.data.name == dataset and path in (None, config.data.path)
    if not of_the_run:
        config = config_lib.base_config()
        config.seed = seed
        config.data.update(name=dataset, path=path or "")
        config.data.synthetic.difficulty = synthetic_difficulty
    train, held = datasets.build_records(config)
    records, scored = (held, "heldout") if split == "heldout" and held else (train, "train")
    if not of_the_run and not spec.has_heldout:
        scored = "files"
    out = []
    for raw in data_lib.read_records(records, name=dataset, format=config.data.format):
        if raw.reason is not None:
            raise data_lib.DataError(f"{raw.where}: {data_lib.REASONS[raw.reason]} ({raw.detail})", where=raw.where,
                                     reason=raw.reason)
        r = raw.record
        if not isinstance(r, Mapping) or ("question" not in r and "messages" not in r) or "answer" not in r:
            raise data_lib.DataError(f"{raw.where}: a record needs 'question' (or 'messages') and 'answer'",
                                     where=raw.where, reason="missing_field")
        # the id training gives the record (`formats.record_id`: its own, else one derived from its prompt), so a
        # question has one name in training's reports and evaluation's; where it was read from as the last resort
        out.append(r if "id" in r else {**r, "id": data_lib.formats.record_id(r) or raw.where})
    return out, scored


def load_questions(dataset: str, **kw) -> list[dict]:
    """The records of `select_questions(dataset, **kw)`."""
    return select_questions(dataset, **kw)[0]


def _trained_questions(workdir: str | None) -> int | None:
    """How many questions the run in `workdir` trained on (its summary.json), if known."""
    from ssft_jax import assembly
    return assembly.read_summary(workdir).get("questions") if workdir else None


def _ints(s: str | None) -> list[int] | None:
    return [int(x) for x in s.split(",") if x.strip()] if s else None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout and shows every default."""


def unfinished_warning(metrics: Mapping[str, Any], max_new_tokens: int) -> str | None:
    """A warning when generations stopped at `max_new_tokens` before their end-of-turn token (their answers are
    then mostly missing, and every accuracy figure with them)."""
    rates = [p["finished_rate"] for p in metrics["per_tag"]]
    unfinished = 1.0 - float(np.mean(rates))
    if unfinished <= 0.0:
        return None
    what = "every generation" if unfinished >= 1.0 else f"{unfinished:.0%} of the generations"
    return (f"warning: {what} stopped at --max_new_tokens={max_new_tokens} before its end-of-turn token (finished "
            f"per tag: {' '.join(f'{r:.2f}' for r in rates)}); raise --max_new_tokens or the scores count them wrong")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
        epilog="The metrics and the outputs are described in the module docstring (pydoc ssft_jax.evaluate).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run's workdir (Orbax checkpoint; see --prefer)")
    src.add_argument("--hf_dir", help="an HF folder (config.json, safetensors, tokenizer)")
    p.add_argument("--debug", action="store_true", help="show the traceback of a config/data/checkpoint error")
    p.add_argument("--prefer", default="checkpoint", choices=["checkpoint", "hf_export"],
                   help="workdir: restore the latest checkpoint (default) or load workdir/hf_export")
    p.add_argument("--dataset", default=None, choices=datasets.dataset_names(),
                   help="a registered dataset (ssft_jax.datasets); default: the training run's, else synthetic")
    p.add_argument("--path", default=None,
                   help="data.path: the file(s) to evaluate for jsonl (comma separated), or the GSM8K data folder")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"], help="which part of the dataset")
    p.add_argument("--checker", default=None, choices=sorted(checkers.CHECKERS), help="default: the dataset's")
    p.add_argument("--classifier", default=None,
                   help="module:function naming a generation's strategy (fn(record, text) -> name or None, with "
                        "fn.names), for the tag -> strategy matrix; default: the dataset's")
    p.add_argument("--num_questions", type=int, default=0, help="0 = all")
    p.add_argument("--samples_per_tag", type=int, default=1, help="S: generations per tag and question")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--top_k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="generation budget per sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch_questions", type=int, default=8, help="questions decoded together (x N tags x S)")
    p.add_argument("--tags_mode", default="auto", choices=["auto", "forking", "shared"],
                   help="shared: N parallel generations = N*S samples under tag 0 (sft_mixed); auto: shared iff the "
                        "run's method is sft_mixed")
    p.add_argument("--num_tags", type=int, default=None, help="N (default: the run's, or inferred from the tokenizer)")
    p.add_argument("--tag_mode", default=None, choices=["text", "special"], help="hf_dir: how tags are written")
    p.add_argument("--pass1_tag", type=int, default=0, help="0-based tag index for pass@1 (0 = <think1>)")
    p.add_argument("--pass_k", default=None, help="comma-separated k for pass@k (default 1,N,N*S)")
    p.add_argument("--cons_k", default=None, help="comma-separated k for cons@k (default N,N*S)")
    p.add_argument("--synthetic_difficulty", default="easy", help="synthetic task without a run config")
    p.add_argument("--validation", type=float, default=None,
                   help="questions (a count >= 1, or a fraction < 1) that only choose the best fixed tag; every "
                        "metric is then reported on the others (the test split), as in the demo. Default: a third of "
                        f"the questions with forking tags and >= {MIN_QUESTIONS_TO_SPLIT} questions. 0: one split, "
                        "the best fixed tag chosen on the questions it is scored on (an optimistic bar)")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--out", default=None, help="output folder (default: <workdir>/eval, or eval_out for --hf_dir)")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = str(pathlib.Path(a.workdir) / "eval") if a.workdir else "eval_out"

    from ssft_jax import assembly
    t0 = time.perf_counter()
    lm = assembly.load_for_generation(workdir=a.workdir, hf_dir=a.hf_dir, prefer=a.prefer, num_tags=a.num_tags,
                                      tag_mode=a.tag_mode)
    print(f"loaded {lm.source} ({lm.cfg.model_type}, {lm.cfg.num_hidden_layers} layers, vocab {lm.cfg.vocab_size}, "
          f"{lm.tags.n} {lm.tags.mode} tags, method {lm.method}) in {time.perf_counter() - t0:.1f}s")
    dataset = a.dataset or (lm.train_config["data"]["name"] if lm.train_config else "synthetic")
    spec = datasets.get_dataset(dataset)
    trained_on_it = bool(lm.train_config) and lm.train_config["data"]["name"] == dataset
    if not spec.has_heldout and a.path is None and not trained_on_it:
        raise SystemExit(f"--dataset {dataset} is the files a run names, and no run names any here: name the "
                         "records to evaluate with --path")
    questions, scored = select_questions(dataset, path=a.path, train_config=lm.train_config, split=a.split,
                                         synthetic_difficulty=a.synthetic_difficulty, seed=a.seed)
    if a.num_questions:
        questions = questions[: a.num_questions]
    trained = _trained_questions(a.workdir) if scored == "train" and not a.num_questions else None
    print(f"scoring {len(questions)} {SCORED[scored]}"
          + (f" (the run trained on {trained}: the others were skipped by its data validation, see its "
             "summary.json 'validation')" if trained is not None and trained != len(questions) else "")
          + (" (the run holds none out: set data.heldout to hold some out)"
             if scored == "train" and a.split == "heldout" else ""))
    from ssft_jax import losses  # the method's own flag: one shared tag (sft_mixed) or one tag per trace
    shared = a.tags_mode == "shared" or (a.tags_mode == "auto" and lm.method in losses.METHODS
                                         and not losses.get_method(lm.method).distinct_tags)
    validation = a.validation if a.validation is not None else default_validation(len(questions), forking=not shared)
    if validation:
        print(f"best fixed tag chosen on {validation:g} of the questions (the validation split); every figure below "
              "is on the others (--validation 0: one split)")
    result = evaluate_model(lm.cfg, lm.params, lm.tokenizer, lm.tags, questions, a.checker or spec.checker,
                            classifier=datasets.load_classifier(a.classifier) if a.classifier else spec.classifier,
                            num_samples_per_tag=a.samples_per_tag,
                            temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            max_new_tokens=a.max_new_tokens, seed=a.seed, shared_tag=shared,
                            pass1_tag=a.pass1_tag, tag_counts=lm.tag_counts, pass_ks=_ints(a.pass_k),
                            cons_ks=_ints(a.cons_k), batch_questions=a.batch_questions,
                            eos_token_ids=lm.eos_token_ids, vocab_limit=lm.vocab_limit, progress=True,
                            validation=int(validation) if validation >= 1 else validation)
    result.settings.update(source=lm.source, method=lm.method, dataset=dataset, split=scored,
                           split_requested=a.split, num_questions=len(questions))
    paths = result.write(a.out, plots=not a.no_plots)
    if a.workdir and not a.no_plots:  # the run's training curves beside the evaluation's figures
        from ssft_jax import metrics_log
        curves = metrics_log.plot_training_curves(a.workdir, pathlib.Path(a.out) / "training_curves.png")
        if curves is not None:
            paths["training_curves"] = curves
    m = result.metrics
    warning = unfinished_warning(m, a.max_new_tokens)
    if warning:
        print(warning, file=sys.stderr)
    line = (f"pass@1[tag {m['pass@1']['tag']}]={m['pass@1']['value']}  cons@N={m['cons@N_native']:.3f}  "
            + "  ".join(f"pass@{k}={v:.3f}" for k, v in m["pass@k"].items()) + "  "
            + "  ".join(f"cons@{k}={v:.3f}" for k, v in m["cons@k"].items()))
    if "pass@1_coverage" in m:
        line += f"  pass@1[coverage tag {m['pass@1_coverage']['tag']}]={m['pass@1_coverage']['value']}"
    print(line)
    if "self_chosen_greedy" in m.get("tag_choice", {}):
        tc = m["tag_choice"]
        print(f"pass@1[self-chosen tag] greedy={tc['self_chosen_greedy']:.3f} sampled={tc['self_chosen_sampled']:.3f}"
              f"  best fixed tag {tc['best_fixed_tag']['tag']}={tc['best_fixed_tag']['value']:.3f} (chosen on "
              f"{tc['best_fixed_tag']['chosen_on']})"
              f"  per-question oracle={tc['oracle']:.3f}")
    if "strategy" in m:
        st = m["strategy"]
        print(f"tag->strategy MI {st['mutual_information_nats']:.3f} nats ({st['mutual_information_frac_logM']:.2f} "
              f"of log M); distinct strategies over tags (first sample) {st['distinct_strategies_first_sample']:.2f}")
    print(f"{m['generated_tokens']} tokens in {m['seconds']:.1f}s; wrote " + ", ".join(str(v) for v in paths.values()))
    return 0


def cli() -> None:
    """The console script: expected errors are one message and exit code 2 (`ssft_jax.cli`)."""
    from ssft_jax import cli as cli_lib
    raise SystemExit(cli_lib.run_reporting_errors(main))


if __name__ == "__main__":
    cli()
