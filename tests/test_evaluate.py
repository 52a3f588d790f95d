"""Evaluation: metrics against hand-computed cases, its questions from the dataset registry, and an end-to-end run
on a tiny trained model. (The answer checkers: tests/test_registries.py.)"""
import json
import math
import re
import shutil

import jax
import numpy as np
import pytest

from ssft_jax import evaluate as E
from ssft_jax.datasets import synthetic

# ------------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------------


def test_pass_at_k_unbiased_estimator():
    assert E.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert E.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert E.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert E.pass_at_k(4, 0, 4) == 0.0 and E.pass_at_k(4, 4, 1) == 1.0 and E.pass_at_k(4, 2, 3) == 1.0
    with pytest.raises(ValueError, match=r"pass@5 needs at least k=5 samples per question, have n=4"):
        E.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        E.pass_at_k(4, 5, 1)


def test_majority_vote_ties_go_to_the_lowest_tag_and_none_does_not_vote():
    assert E.majority_vote(["7", "8", None, "8", "7"], [0, 1, 0, 1, 0]) == ("7", False)  # 2-2 tie: tag 0's answer
    assert E.majority_vote([None, "8", "7", "7"], [0, 1, 0, 0]) == ("7", False)
    assert E.majority_vote([None, None, "3"], [0, 0, 1]) == ("3", True)  # one vote beats two non-answers
    assert E.majority_vote([None, None], [0, 0]) == (None, False)


def test_native_cons_at_n_and_cons_at_k_by_hand():
    # One question, N=3 tags, S=2 samples; gold answer "5".
    ans = [[["5", "6"], ["6", "6"], ["5", "7"]]]
    ok = [[[a == "5" for a in t] for t in q] for q in ans]
    # group 0 = (5, 6, 5) -> 5 (right); group 1 = (6, 6, 7) -> 6 (wrong)
    assert E.native_cons_at_n(ans, ok) == pytest.approx(0.5)
    rr = [E.round_robin(ans[0])]
    assert rr[0] == ["5", "6", "5", "6", "6", "7"]
    okr = [[a == "5" for a in rr[0]]]
    assert E.cons_at_k(rr, okr, 3) == pytest.approx(0.5)
    assert E.cons_at_k(rr, okr, 6) == 0.0  # 6 x3, 5 x2
    assert E.cons_at_k(rr, okr, 2) == pytest.approx(2 / 3)  # (5,6)->5 tie, first; (5,6)->5; (6,7)->6
    with pytest.raises(ValueError, match=r"cons@7 needs at least k=7 samples"):
        E.cons_at_k(rr, okr, 7)
    # tie inside a group: (6, 5, None) -> the lower tag's 6 wins -> wrong
    assert E.native_cons_at_n([[["6"], ["5"], [None]]], [[[False], [True], [False]]]) == 0.0
    assert E.native_cons_at_n([[["5"], ["6"], [None]]], [[[True], [False], [False]]]) == 1.0


def test_coverage_tag_and_mutual_information():
    assert E.coverage_tag([3, 5, 5, 1]) == 1
    mi, frac = E.mutual_information(np.eye(4) * 10)
    assert mi == pytest.approx(math.log(4)) and frac == pytest.approx(1.0)
    assert E.mutual_information([[1, 1], [1, 1]]) == (0.0, 0.0)
    mi, frac = E.mutual_information([[2, 0], [1, 1]])
    hand = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.125)
    assert mi == pytest.approx(hand) and frac == pytest.approx(hand / math.log(2))
    # 6 tags onto 4 strategies, deterministic and uniform over 4 of them -> still MI = log 4 of log M = log 4
    m = np.zeros((4, 4))
    m[np.arange(4), np.arange(4)] = 3
    assert E.mutual_information(m, num_strategies=4)[1] == pytest.approx(1.0)
    assert E.mutual_information(np.zeros((2, 3))) == (0.0, 0.0)
    mat = E.tag_strategy_matrix([0, 0, 1, 1], ["a", None, "b", "zzz"], 2, ["a", "b"])
    assert mat.tolist() == [[1, 0, 1], [0, 1, 1]]


def _gen(q, slot, sample, ans, gold="5", strategy=None, tag=None, n_tok=4):
    return {"question_index": q, "slot": slot, "tag": slot if tag is None else tag, "sample": sample, "answer": ans,
            "correct": ans == gold, "num_tokens": n_tok, "finished": True, "strategy": strategy}


def test_compute_metrics_by_hand():
    # Q=2, N=2, S=2.  q0: tag0 (5, 5), tag1 (6, None); q1: tag0 (7, 5), tag1 (5, 5).
    g = [_gen(0, 0, 0, "5", strategy="a"), _gen(0, 0, 1, "5", strategy="a"), _gen(0, 1, 0, "6", strategy="b"),
         _gen(0, 1, 1, None, n_tok=10), _gen(1, 0, 0, "7", strategy="a"), _gen(1, 0, 1, "5", strategy="b"),
         _gen(1, 1, 0, "5", strategy="b"), _gen(1, 1, 1, "5", strategy="b")]
    m = E.compute_metrics(g, 2, 2, pass1_tag=0, tag_counts=[1, 4], strategy_names=["a", "b"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["pass@1"]["value"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["pass@1_coverage"]["tag"] == 1 and m["pass@1_coverage"]["value"] == pytest.approx((0.0 + 1.0) / 2)
    # native cons@2: q0 groups (5,6)->5 ok, (5,None)->5 ok; q1 (7,5)->7 wrong, (5,5) ok  -> (1 + 0.5) / 2
    assert m["cons@N_native"] == pytest.approx(0.75)
    assert m["cons@k"]["2"] == pytest.approx(0.75)
    # cons@4: q0 (5,6,5,None) -> 5 ok; q1 (7,5,5,5) -> 5 ok
    assert m["cons@k"]["4"] == 1.0
    # pass@k with n=4: q0 c=2, q1 c=3
    assert m["pass@k"]["1"] == pytest.approx((0.5 + 0.75) / 2)
    assert m["pass@k"]["2"] == pytest.approx(((1 - 1 / 6) + 1.0) / 2)
    assert [p["accuracy"] for p in m["per_tag"]] == [0.75, 0.5]
    assert m["per_tag"][1]["answer_rate"] == 0.75 and m["per_tag"][1]["length"]["max"] == 10
    st = m["strategy"]
    assert st["tag_strategy_counts"] == [[3, 1, 0], [0, 3, 1]]
    mi, frac = E.mutual_information([[3, 1], [0, 3]], 2)
    assert st["mutual_information_nats"] == pytest.approx(mi) and st["mutual_information_frac_logM"] == frac
    # first samples: q0 tags -> (a, b) = 2 distinct; q1 -> (a, b) = 2 distinct, correct ones: q0 {a}, q1 {b}
    assert st["distinct_strategies_first_sample"] == 2.0 and st["distinct_correct_strategies_first_sample"] == 1.0
    with pytest.raises(ValueError, match=r"k=5 is not in 1..4"):
        E.compute_metrics(g, 2, 2, pass_ks=[5])
    with pytest.raises(ValueError, match="missing generations"):
        E.compute_metrics(g[:-1], 2, 2)


# ------------------------------------------------------------------------------------------------------------------
# Questions
# ------------------------------------------------------------------------------------------------------------------


def test_questions_without_a_run_config_come_from_the_default_config_and_the_flags():
    _, held = synthetic.build_splits(512, 64, seed=3, difficulty="medium")
    assert E.load_questions("synthetic", seed=3, synthetic_difficulty="medium") == held
    train, _ = synthetic.build_splits(512, 64, seed=0, difficulty="easy")
    assert E.load_questions("synthetic", split="train") == train


def test_questions_of_the_training_run_use_its_config():
    from ssft_jax import config as config_lib
    c = config_lib.load_config("demo", "tiny")
    c.seed = 5
    saved = c.to_dict()
    _, held = synthetic.build_splits(32, 8, seed=5, num_strategies=4, difficulty="tiny")
    assert E.load_questions("synthetic", train_config=saved) == held
    # a run on another dataset does not decide the questions of this one
    assert E.load_questions("synthetic", train_config={**saved, "data": {**saved["data"], "name": "gsm8k"}},
                            seed=5) == synthetic.build_splits(512, 64, seed=5, difficulty="easy")[1]


def test_jsonl_questions_are_read_by_the_data_layer(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n\n"
                    + json.dumps({"id": "m", "messages": [{"role": "user", "content": "hi"}], "answer": "3"}) + "\n")
    other = tmp_path / "r.jsonl"
    other.write_text(json.dumps({"id": "r", "question": "2+2?", "answer": "4"}) + "\n")
    qs = E.load_questions("jsonl", path=f"{good},{other}", split="train")
    # no id: the one training gives it (from its prompt), so both name the question alike (not `file:line`)
    from ssft_jax.data import formats
    assert [q["id"] for q in qs] == [formats.record_id({"question": "1+1?"}), "m", "r"] and qs[0]["id"].startswith("q-")
    assert E.load_questions("jsonl", path=str(good)) == qs[:2]  # nothing is held out: every record is evaluated
    no_answer = tmp_path / "bad.jsonl"
    no_answer.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    message = f"{no_answer}:2: a record needs 'question' (or 'messages') and 'answer'"
    with pytest.raises(ValueError, match=re.escape(message)):
        E.load_questions("jsonl", path=str(no_answer))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1+1?", "answer": "2"}\n{"question": \n')
    with pytest.raises(ValueError, match=re.escape(f"{broken}:2: the line is not valid JSON")):
        E.load_questions("jsonl", path=str(broken))
    with pytest.raises(ValueError, match="data.path must name"):
        E.load_questions("jsonl")


# ------------------------------------------------------------------------------------------------------------------
# End to end: train a tiny model a few steps, evaluate from its workdir
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_run(tiny_ssft_run, tmp_path):
    """The shared tiny SSFT run (conftest), copied: evaluation writes into the workdir it reads by default."""
    wd, s = tiny_ssft_run
    shutil.copytree(wd, tmp_path / "run")
    return tmp_path / "run", s


def test_cli_evaluates_a_trained_workdir(tiny_run, tmp_path, capsys):
    wd, s = tiny_run
    out = tmp_path / "eval"
    rc = E.main(["--workdir", str(wd), "--num_questions", "3", "--samples_per_tag", "2", "--max_new_tokens", "24",
                 "--temperature", "0.7", "--batch_questions", "2"])  # --out defaults to <workdir>/eval
    assert rc == 0
    captured = capsys.readouterr()
    assert "pass@1[tag 0]" in captured.out
    out = wd / "eval"
    # a 4-step model rarely ends a generation within 24 tokens: evaluation says so instead of scoring silently
    finished = [p["finished_rate"] for p in json.loads((out / "metrics.json").read_text())["metrics"]["per_tag"]]
    assert ("stopped at --max_new_tokens=24" in captured.err) == (min(finished) < 1.0)
    gens = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    N = len(s["tag_counts"])
    assert len(gens) == 3 * N * 2
    assert sorted({(g["question_index"], g["slot"], g["sample"]) for g in gens}) == \
        [(q, t, k) for q in range(3) for t in range(N) for k in range(2)]
    assert all(g["tag"] == g["slot"] and 1 <= g["num_tokens"] <= 24 for g in gens)
    doc = json.loads((out / "metrics.json").read_text())
    m = doc["metrics"]
    assert doc["settings"]["tags_mode"] == "forking" and doc["settings"]["dataset"] == "synthetic"
    assert m["num_questions"] == 3 and m["num_generations"] == len(gens)
    for v in (m["accuracy"], m["pass@1"]["value"], m["cons@N_native"], *m["pass@k"].values(), *m["cons@k"].values()):
        assert 0.0 <= v <= 1.0
    assert m["pass@1_coverage"]["tag"] == int(np.argmax(s["tag_counts"]))
    assert "split" not in m  # 3 questions: too few to hold a validation third out (one split)
    assert sorted(m["pass@k"]) == ["1", "12", "6"] and sorted(m["cons@k"]) == ["12", "6"]
    mat = np.asarray(m["strategy"]["tag_strategy_counts"])
    assert mat.shape == (N, len(synthetic.STRATEGIES) + 1) and mat.sum() == len(gens)
    assert 0.0 <= m["strategy"]["mutual_information_frac_logM"] <= 1.0
    for name in ("per_tag_accuracy.png", "per_tag_length.png", "tag_strategy.png"):
        assert (out / name).stat().st_size > 1000
    # the records match what the checker says about the texts
    for g in gens[:6]:
        v = synthetic.verify(g["id"].replace("add-", "").replace("-", " + ").join(["What is ", "?"]), g["text"])
        assert (v.correct, v.answer, v.strategy) == (g["correct"], g["answer"], g["strategy"])


def test_unfinished_generations_are_named_and_help_shows_defaults(capsys):
    per_tag = [{"finished_rate": r} for r in (1.0, 0.5)]
    assert E.unfinished_warning({"per_tag": per_tag}, 64).startswith(
        "warning: 25% of the generations stopped at --max_new_tokens=64")
    assert "every generation" in E.unfinished_warning({"per_tag": [{"finished_rate": 0.0}]}, 8)
    assert E.unfinished_warning({"per_tag": [{"finished_rate": 1.0}]}, 8) is None
    with pytest.raises(SystemExit):
        E.main(["--help"])
    assert "(default: 256)" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_library_shared_tag_mode_and_checkpoint_equals_export(tiny_run):
    from ssft_jax import assembly, datasets
    wd, _ = tiny_run
    lm = assembly.load_for_generation(workdir=wd)
    ex = assembly.load_for_generation(workdir=wd, prefer="hf_export")
    assert lm.source.startswith("checkpoint") and ex.source.startswith("hf")
    assert lm.tags == ex.tags and lm.method == ex.method == "ssft"
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(ex.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
    questions = synthetic.build_records(2, seed=1, difficulty="tiny")
    N = lm.tags.n
    shared = E.evaluate_model(lm.cfg, lm.params, lm.tokenizer, lm.tags, questions, "synthetic",
                              num_samples_per_tag=1, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0,
                              shared_tag=True, tag_counts=lm.tag_counts)
    assert len(shared.generations) == 2 * N and {g["tag"] for g in shared.generations} == {0}
    assert sorted({g["slot"] for g in shared.generations}) == list(range(N))
    assert shared.settings["tags_mode"] == "shared" and len(shared.metrics["per_tag"]) == N
    # strategies come from a classifier only: the checker alone gives none
    assert "strategy" not in shared.metrics and all(g["strategy"] is None for g in shared.generations)
    classifier = datasets.get_dataset("synthetic").classifier
    greedy = E.evaluate_model(lm.cfg, lm.params, lm.tokenizer, lm.tags, questions, "synthetic",
                              classifier=classifier, num_samples_per_tag=2, temperature=0.0, max_new_tokens=12)
    by = {(g["question_index"], g["slot"], g["sample"]): g["text"] for g in greedy.generations}
    assert all(by[(q, t, 0)] == by[(q, t, 1)] for q in range(2) for t in range(N))  # greedy samples coincide
    assert greedy.metrics["strategy"]["first_sample_is_greedy"]
    assert all(g["strategy"] == synthetic.classify_strategy(questions[g["question_index"]], g["text"])
               for g in greedy.generations)
    with pytest.raises(ValueError, match=r"k=13 is not in 1..12"):
        E.evaluate_model(lm.cfg, lm.params, lm.tokenizer, lm.tags, questions, "synthetic", num_samples_per_tag=2,
                         pass_ks=[13])


def test_cli_chooses_the_best_fixed_tag_on_a_validation_split_by_default(tiny_run, tmp_path, capsys):
    wd, _ = tiny_run
    assert E.default_validation(6, forking=True) == 1 / 3
    assert E.default_validation(5, forking=True) == 0 and E.default_validation(60, forking=False) == 0
    rc = E.main(["--workdir", str(wd), "--num_questions", "6", "--max_new_tokens", "8", "--no_plots",
                 "--out", str(tmp_path)])
    assert rc == 0 and "best fixed tag chosen on 0.333333 of the questions" in capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert m["split"]["validation_questions"] == 2 and m["split"]["test_questions"] == 4 == m["num_questions"]
    assert m["tag_choice"]["best_fixed_tag"]["chosen_on"] == "validation (2 other questions)"
