"""Evaluation's metric math, pure functions over nested lists and arrays (no model, no files): Pass@k, majority
votes (native Cons@N, Cons@k), the coverage tag, the tag -> strategy matrix and its mutual information, the
validation/test split that chooses the best fixed tag, and `compute_metrics` / `tag_choice_metrics`, which put them
together for `evaluate.evaluate_model`. The definitions follow the paper (README, "The method in five lines")."""
from __future__ import annotations

import collections
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ssft_jax.data import formats


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question: 1 - C(n-c, k) / C(n, k) (n samples, c correct)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per question, have n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> tuple[str | None, bool]:
    """(voted answer, its correctness). None answers do not vote; among the most frequent answers the one first
    given earliest in `answers` (the lowest tag index) wins; no answer at all -> (None, False)."""
    counts: collections.Counter = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None, False
    best = max(counts.values())
    for a, ok in zip(answers, correct):
        if a is not None and counts[a] == best:
            return a, bool(ok)
    raise AssertionError("unreachable")


def round_robin(per_slot: Sequence[Sequence[Any]]) -> list[Any]:
    """[N][S] -> the n = N*S items in the order sample 0 of slots 0..N-1, sample 1 of slots 0..N-1, ..."""
    N, S = len(per_slot), len(per_slot[0])
    return [per_slot[t][s] for s in range(S) for t in range(N)]


def cons_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over questions of the mean over the floor(n/k) consecutive k-groups of the majority-vote correctness.

    answers, correct: [Q][n], each question's samples already in voting order (see `round_robin`).
    """
    if not answers:
        raise ValueError("cons_at_k: no questions")
    scores = []
    for ans, ok in zip(answers, correct):
        n = len(ans)
        if not 1 <= k <= n:
            raise ValueError(f"cons@{k} needs at least k={k} samples per question, have n={n}")
        groups = [majority_vote(ans[g * k:(g + 1) * k], ok[g * k:(g + 1) * k])[1] for g in range(n // k)]
        scores.append(float(np.mean(groups)))
    return float(np.mean(scores))


def native_cons_at_n(answers: Sequence[Sequence[Sequence[str | None]]],
                     correct: Sequence[Sequence[Sequence[bool]]]) -> float:
    """answers, correct: [Q][N][S]. Group g = sample g of each of the N tags; vote (ties -> lower tag index);
    mean over the S groups, then over questions."""
    N = len(answers[0])
    return cons_at_k([round_robin(a) for a in answers], [round_robin(c) for c in correct], N)


def coverage_tag(tag_counts: Sequence[int]) -> int:
    """The most-matched tag during training (ties -> the lower index)."""
    if len(tag_counts) == 0:
        raise ValueError("coverage_tag: empty tag_counts")
    return int(np.argmax(np.asarray(tag_counts)))


def mutual_information(tag_strategy_counts, num_strategies: int | None = None) -> tuple[float, float]:
    """(I(tag; strategy) in nats, I / log M) of the empirical joint distribution given by a count matrix
    [tags, strategies]. M = num_strategies (default: the number of columns); the fraction is 1.0 when tags determine
    strategies and M strategies are used uniformly, 0.0 when tag and strategy are independent. All-zero counts ->
    (0, 0). Exclude an 'unrecognised' column before calling if it should not count as a strategy."""
    c = np.asarray(tag_strategy_counts, np.float64)
    if c.ndim != 2 or (c < 0).any():
        raise ValueError(f"mutual_information: need a non-negative 2-D count matrix, got shape {c.shape}")
    total = c.sum()
    M = c.shape[1] if num_strategies is None else num_strategies
    if total == 0:
        return 0.0, 0.0
    p = c / total
    pt, ps = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / (pt @ ps)[nz])))
    mi = max(mi, 0.0)
    return mi, (mi / math.log(M) if M > 1 else 0.0)


def tag_strategy_matrix(slots: Sequence[int], strategies: Sequence[str | None], num_tags: int,
                        strategy_names: Sequence[str]) -> np.ndarray:
    """[num_tags, len(strategy_names) + 1] counts; the last column counts unrecognised (None) strategies."""
    m = np.zeros((num_tags, len(strategy_names) + 1), np.int64)
    index = {s: i for i, s in enumerate(strategy_names)}
    for t, s in zip(slots, strategies):
        m[t, index.get(s, len(strategy_names)) if s is not None else len(strategy_names)] += 1
    return m


def _length_stats(x: Sequence[int]) -> dict[str, float]:
    a = np.asarray(x, np.float64)
    if a.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "p90": float("nan"), "max": float("nan")}
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": float(a.max())}


def compute_metrics(generations: Sequence[Mapping[str, Any]], num_tags: int, samples_per_tag: int, *,
                    pass1_tag: int = 0, tag_counts: Sequence[int] | None = None,
                    pass_ks: Sequence[int] | None = None, cons_ks: Sequence[int] | None = None,
                    strategy_names: Sequence[str] | None = None, greedy: bool = False) -> dict[str, Any]:
    """All metrics from per-generation records with keys question_index, slot, tag, sample, correct, answer,
    num_tokens, finished (and strategy when `strategy_names`). Every question must have N x S generations."""
    N, S = num_tags, samples_per_tag
    n = N * S
    pass_ks = sorted(set(pass_ks or [k for k in (1, N, n) if k <= n]))
    cons_ks = sorted(set(cons_ks or [k for k in (N, n) if k <= n]))
    for k in (*pass_ks, *cons_ks):
        if not 1 <= k <= n:
            raise ValueError(f"k={k} is not in 1..{n}: only N*S = {N}*{S} = {n} samples per question")
    by_q: dict[int, list[list[Any]]] = {}
    for g in generations:
        grid = by_q.setdefault(g["question_index"], [[None] * S for _ in range(N)])
        grid[g["slot"]][g["sample"]] = g
    if not by_q:
        raise ValueError("compute_metrics: no generations")
    qs = sorted(by_q)
    for q in qs:
        if any(x is None for row in by_q[q] for x in row):
            raise ValueError(f"question {q}: missing generations (need {N} slots x {S} samples)")
    ans = [[[x["answer"] for x in row] for row in by_q[q]] for q in qs]
    ok = [[[bool(x["correct"]) for x in row] for row in by_q[q]] for q in qs]
    okn = np.asarray(ok, np.float64)  # [Q, N, S]

    def pass1_for(tag: int) -> float | None:
        v = [bool(g["correct"]) for g in generations if g["tag"] == tag]
        if not v:
            return None
        per_q = collections.defaultdict(list)
        for g in generations:
            if g["tag"] == tag:
                per_q[g["question_index"]].append(bool(g["correct"]))
        return float(np.mean([np.mean(v) for v in per_q.values()]))

    m: dict[str, Any] = {
        "num_questions": len(qs), "num_tags": N, "samples_per_tag": S, "samples_per_question": n,
        "num_generations": len(generations),
        "accuracy": float(okn.mean()),
        "pass@1": {"tag": pass1_tag, "value": pass1_for(pass1_tag)},
        "cons@N_native": native_cons_at_n(ans, ok),
        "pass@k": {str(k): float(np.mean([pass_at_k(n, int(c), k) for c in okn.sum((1, 2))])) for k in pass_ks},
        "cons@k": {str(k): cons_at_k([round_robin(a) for a in ans], [round_robin(c) for c in ok], k) for k in cons_ks},
    }
    if tag_counts is not None and len(tag_counts):
        t = coverage_tag(tag_counts)
        m["pass@1_coverage"] = {"tag": t, "value": pass1_for(t), "tag_counts": [int(x) for x in tag_counts]}
    per_tag = []
    for t in range(N):
        gs = [by_q[q][t][s] for q in qs for s in range(S)]
        per_tag.append({
            "slot": t, "tags": sorted({g["tag"] for g in gs}),
            "accuracy": float(np.mean([g["correct"] for g in gs])),
            "answer_rate": float(np.mean([g["answer"] is not None for g in gs])),
            "finished_rate": float(np.mean([g["finished"] for g in gs])),
            "length": _length_stats([g["num_tokens"] for g in gs]),
        })
    m["per_tag"] = per_tag
    m["length"] = _length_stats([g["num_tokens"] for g in generations])
    if strategy_names is not None:
        mat = tag_strategy_matrix([g["slot"] for g in generations], [g.get("strategy") for g in generations], N,
                                  strategy_names)
        mi, frac = mutual_information(mat[:, :-1], len(strategy_names))
        mi_all, frac_all = mutual_information(mat, len(strategy_names))
        first = [[by_q[q][t][0] for t in range(N)] for q in qs]
        m["strategy"] = {
            "names": list(strategy_names) + ["none"],
            "tag_strategy_counts": mat.tolist(),
            "mutual_information_nats": mi, "mutual_information_frac_logM": frac,
            "mutual_information_with_none_nats": mi_all, "mutual_information_with_none_frac_logM": frac_all,
            "recognised_rate": float(1.0 - mat[:, -1].sum() / max(mat.sum(), 1)),
            "distinct_strategies_first_sample": float(np.mean(
                [len({g["strategy"] for g in row if g["strategy"] is not None}) for row in first])),
            "distinct_correct_strategies_first_sample": float(np.mean(
                [len({g["strategy"] for g in row if g["strategy"] is not None and g["correct"]}) for row in first])),
            "first_sample_is_greedy": bool(greedy),
        }
    return m


# The questions that only choose the best fixed tag, by default (evaluate and the demo): a third. Every Pass@1 figure
# is then on the other two thirds; choosing the best of N tags on the questions it is scored on favours it.
VALIDATION_FRACTION = 1 / 3
# Below this many questions, one split (the validation third would leave too few to score on).
MIN_QUESTIONS_TO_SPLIT = 6


def default_validation(num_questions: int, *, forking: bool) -> float:
    """What `evaluate` holds out for choosing the best fixed tag when not told: VALIDATION_FRACTION of the questions
    with forking tags and enough questions; 0 (one split) otherwise (a shared tag has no tag to choose)."""
    return VALIDATION_FRACTION if forking and num_questions >= MIN_QUESTIONS_TO_SPLIT else 0


def validation_split(ids: Sequence[str], validation: int | float) -> set[int]:
    """The positions of the questions that choose the best fixed tag (the validation split): `validation` of them
    (a count, or a fraction of the questions, rounded), those whose ids hash lowest, so the split depends on neither
    question order nor seed. Every other question is the test split, on which every Pass@1 figure is reported."""
    k = validation if isinstance(validation, int) else int(round(validation * len(ids)))
    if not 0 <= k < len(ids):
        raise ValueError(f"validation={validation!r} leaves no test questions among {len(ids)}")
    return set(formats.hash_order(ids)[:k])


def tag_choice_metrics(generations: Sequence[Mapping[str, Any]], log_pi: Mapping[int, Sequence[float]],
                       valid: Sequence[bool], *, select_on: Sequence[Mapping[str, Any]] | None = None
                       ) -> dict[str, Any]:
    """What choosing the tag per question is worth (GFPO's metrics), from the per-tag generations and the model's
    own policy pi(tag | x) (`log_pi[question_index]`, [N], -inf for invalid tags):

      self_chosen_greedy   mean over questions of the accuracy under argmax_t pi(t | x);
      self_chosen_sampled  mean over questions of sum_t pi(t | x) acc(x, t) (a tag drawn from pi, then decoded);
      best_fixed_tag       the single valid tag with the highest mean accuracy and its accuracy here: chosen on
                           `select_on` (the generations of other, validation questions) when given, otherwise on
                           these questions themselves (an optimistic bar: the best of N on the questions it is
                           scored on; `best_fixed_tag_in_hindsight` reports that bar beside the honest one);
      oracle               mean over questions of max_t acc(x, t) over valid tags: the best any tag choice can do.
    acc(x, t) is the mean correctness of the generations of question x under tag t (its S samples)."""
    valid = np.asarray(valid, bool)
    N = valid.size
    acc: dict[int, np.ndarray] = {}
    cnt: dict[int, np.ndarray] = {}
    for g in generations:
        q = g["question_index"]
        acc.setdefault(q, np.zeros(N))[g["tag"]] += float(bool(g["correct"]))
        cnt.setdefault(q, np.zeros(N))[g["tag"]] += 1
    qs = sorted(acc)
    if not qs or any(q not in log_pi for q in qs):
        raise ValueError("tag_choice_metrics: need the policy of every evaluated question")
    A = np.stack([acc[q] / np.maximum(cnt[q], 1) for q in qs])  # [Q, N]
    lp = np.asarray([log_pi[q] for q in qs], np.float64)
    lp = np.where(valid, lp, -np.inf)
    pi = np.exp(lp - lp.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    greedy = np.argmax(lp, -1)
    per_tag = np.where(valid, A.mean(0), -np.inf)
    hindsight = int(np.argmax(per_tag))
    best, chosen_on = hindsight, "these questions"
    if select_on is not None:
        sel_acc, sel_cnt = np.zeros(N), np.zeros(N)
        for g in select_on:
            sel_acc[g["tag"]] += float(bool(g["correct"]))
            sel_cnt[g["tag"]] += 1
        if not sel_cnt[valid].all():
            raise ValueError("tag_choice_metrics: select_on lacks generations of some valid tag")
        best = int(np.argmax(np.where(valid, sel_acc / np.maximum(sel_cnt, 1), -np.inf)))
        chosen_on = f"validation ({len({g['question_index'] for g in select_on})} other questions)"
    ent = -np.sum(np.where(pi > 0, pi * np.log(np.where(pi > 0, pi, 1.0)), 0.0), -1)
    return {
        "self_chosen_greedy": float(A[np.arange(len(qs)), greedy].mean()),
        "self_chosen_sampled": float(np.sum(pi * A, -1).mean()),
        "best_fixed_tag": {"tag": best, "value": float(per_tag[best]), "chosen_on": chosen_on},
        "best_fixed_tag_in_hindsight": {"tag": hindsight, "value": float(per_tag[hindsight])},
        "oracle": float(np.where(valid, A, -np.inf).max(-1).mean()),
        "valid_tags": np.flatnonzero(valid).tolist(),
        "policy_mean": pi.mean(0).tolist(),
        "policy_entropy_nats": float(ent.mean()),
        "greedy_tag_counts": np.bincount(greedy, minlength=N).tolist(),
    }
