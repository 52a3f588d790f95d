"""Tests for ssft_jax.datasets: synthetic multi-strategy arithmetic and GSM8K multi-trace loading."""

from __future__ import annotations

import json
import random
import re

import pytest

from ssft_jax.datasets import gsm8k, synthetic
from ssft_jax.datasets.synthetic import STRATEGIES, SyntheticDifficulty

# Several difficulties, from the smallest (two 1..2-digit operands) to six operands of up to six digits.
DIFFS = [
    SyntheticDifficulty(2, 2, 1, 1),
    synthetic.DIFFICULTIES["tiny"],
    synthetic.DIFFICULTIES["easy"],
    synthetic.DIFFICULTIES["medium"],
    synthetic.DIFFICULTIES["hard"],
    SyntheticDifficulty(2, 6, 1, 6),
]
N_PER_DIFF = {0: 36, 1: 400}  # the 1-digit pair space has only C(9, 2) = 36 operand sets


def _records(i, d, seed=0):
    return synthetic.build_records(N_PER_DIFF.get(i, 700), seed=seed, difficulty=d)


@pytest.fixture(scope="module")
def all_records():
    return [(d, _records(i, d)) for i, d in enumerate(DIFFS)]


# ----------------------------------------------------------------------------------------------- synthetic

def test_record_format_and_determinism():
    a = synthetic.build_records(50, seed=3, difficulty="medium")
    b = synthetic.build_records(50, seed=3, difficulty="medium")
    c = synthetic.build_records(50, seed=4, difficulty="medium")
    assert a == b
    assert a != c
    for r in a:
        assert set(r) == {"id", "question", "traces", "answer"}
        assert [t["source"] for t in r["traces"]] == list(STRATEGIES)
        assert all(isinstance(t["text"], str) and t["text"] for t in r["traces"])
    ids = [r["id"] for r in a]
    assert len(set(ids)) == len(ids)
    # ids are content based: the same question has the same id under any seed
    ops = synthetic.parse_question(a[0]["question"])
    assert synthetic.make_record(ops)["id"] == a[0]["id"] == synthetic.record_id(ops)
    assert [len(r["traces"]) for r in synthetic.build_records(5, seed=0, num_strategies=2)] == [2] * 5
    with pytest.raises(ValueError):
        synthetic.build_records(5, seed=0, num_strategies=5)


def test_sample_record_exact():
    r = synthetic.make_record([47, 385, 12, 66])
    assert r["question"] == "What is 47 + 385 + 12 + 66?"
    assert r["answer"] == "510"
    texts = {t["source"]: t["text"] for t in r["traces"]}
    assert texts == {
        "left_to_right": "47+385=432. 432+12=444. 444+66=510.\nAnswer: 510",
        "right_to_left": "66+12=78. 78+385=463. 463+47=510.\nAnswer: 510",
        "place_value": "ones: 7+5+2+6=20. tens: 40+80+10+60=190. hundreds: 300=300. 20+190+300=510.\nAnswer: 510",
        "round_tens": "47->50-3, 385->390-5, 12->10+2, 66->70-4. 50+390+10+70=520. -3-5+2-4=-10. 520-10=510."
                      "\nAnswer: 510",
    }
    # a column of zeros and a single column
    assert synthetic.render_trace([40, 50], "place_value") == "ones: 0=0. tens: 40+50=90. 0+90=90.\nAnswer: 90"
    assert synthetic.render_trace([3, 8], "place_value") == "ones: 3+8=11.\nAnswer: 11"
    assert synthetic.render_trace([3, 8], "round_tens") == "3->0+3, 8->10-2. 0+10=10. 3-2=1. 10+1=11.\nAnswer: 11"


_EQ_RE = re.compile(r"(-?\d+(?:[+-]\d+)*)=(-?\d+)")
_MARK_RE = re.compile(r"(\d+)->(\d+)([+-])(\d+)")


def _signed_sum(expr: str) -> int:
    return sum(int(t) for t in re.findall(r"[+-]?\d+", expr))


def test_traces_distinct_arithmetic_and_answers(all_records):
    for d, records in all_records:
        for r in records:
            ops = synthetic.parse_question(r["question"])
            assert len(set(ops)) == len(ops) and d.min_operands <= len(ops) <= d.max_operands
            assert all(d.min_digits <= len(str(o)) <= d.max_digits for o in ops)
            assert r["answer"] == str(sum(ops))
            texts = [t["text"] for t in r["traces"]]
            assert len(set(texts)) == len(texts), r
            for text in texts:
                assert text.endswith(f"\nAnswer: {sum(ops)}")
                work = text[: text.rindex("\nAnswer:")]
                eqs = _EQ_RE.findall(work.replace("->", " "))
                assert eqs, text
                for lhs, rhs in eqs:  # every written step is true arithmetic
                    assert _signed_sum(lhs) == int(rhs), (lhs, rhs, text)
                for x, rnd, sign, c in _MARK_RE.findall(work):
                    assert int(rnd) % 10 == 0 and int(rnd) + (int(c) if sign == "+" else -int(c)) == int(x)


def test_verifier_names_every_reference_trace(all_records):
    n = 0
    for d, records in all_records:
        for r in records:
            for t in r["traces"]:
                v = synthetic.verify(r, t["text"])
                assert v.correct and v.answer == r["answer"] == v.expected, (t, v)
                assert v.strategy == t["source"], (r["question"], t, v)
                n += 1
    assert n > 10_000
    # the question string and the operands work as well as the record
    r = all_records[3][1][0]
    ops = synthetic.parse_question(r["question"])
    for t in r["traces"]:
        assert synthetic.verify(r["question"], t["text"]).strategy == t["source"]
        assert synthetic.verify(ops, t["text"]).strategy == t["source"]


def test_verifier_rejects_wrong_answers():
    r = synthetic.make_record([47, 385, 12, 66])
    for t in r["traces"]:
        bad = t["text"].replace("Answer: 510", "Answer: 511")
        v = synthetic.verify(r, bad)
        assert not v.correct and v.answer == "511" and v.strategy == t["source"]
        v = synthetic.verify(r, t["text"].replace("\nAnswer: 510", ""))  # no answer line at all
        assert not v.correct and v.answer is None and v.strategy == t["source"]
    # the last answer line counts
    assert synthetic.verify(r, "Answer: 510\nAnswer: 500").correct is False
    assert synthetic.verify(r, "Answer: 500\nAnswer: 510").correct is True


def _corrupt_digit(text: str, spans: list[tuple[int, int]], rng: random.Random) -> str:
    start, end = spans[rng.randrange(len(spans))]
    pos = rng.randrange(start, end)
    while text[pos] == "-":
        pos = rng.randrange(start, end)
    new = rng.choice([c for c in "0123456789" if c != text[pos]])
    return text[:pos] + new + text[pos + 1:]


def test_verifier_on_corrupted_traces(all_records):
    rng = random.Random(0)
    n_inter = n_any = ok_any = 0
    for d, records in all_records:
        for r in records[:300]:
            total = int(r["answer"])
            for t in r["traces"]:
                text = t["text"]
                cut = text.rindex("\nAnswer:")
                work = text[:cut]
                wrong_answer = f"\nAnswer: {total + rng.choice([-10, -1, 1, 10, 100])}"
                # (a) one wrong digit in an intermediate result (a value after '='), answer wrong
                spans = [m.span(1) for m in re.finditer(r"=(-?\d+)", work)]
                bad = _corrupt_digit(work, spans, rng) + wrong_answer
                v = synthetic.verify(r, bad)
                assert v.strategy == t["source"], (t, bad, v)
                assert not v.correct
                n_inter += 1
                # (b) one wrong digit anywhere in the work (operand copies, markers, column terms included)
                spans = [m.span() for m in re.finditer(r"\d+", work)]
                bad = _corrupt_digit(work, spans, rng) + wrong_answer
                n_any += 1
                ok_any += synthetic.verify(r, bad).strategy == t["source"]
    assert n_inter > 5000
    # a copy error that turns one operand into another can make the direction ambiguous (-> None); it is rare
    assert ok_any / n_any >= 0.99, (ok_any, n_any)


def test_verifier_refuses_garbage():
    rng = random.Random(1)
    records = synthetic.build_records(300, seed=5, difficulty="medium")
    charset = synthetic.CHARSET
    for r in records:
        ops = synthetic.parse_question(r["question"])
        total = sum(ops)
        garbage = [
            "",
            f"Answer: {total}",
            f"\nAnswer: {total}",
            r["question"],
            f"{r['question']}\nAnswer: {total}",
            "".join(rng.choice(charset) for _ in range(rng.randint(5, 150))),
            "".join(rng.choice("0123456789+=. ") for _ in range(rng.randint(5, 80))),
            "The quick brown fox. 1+1=2, 2+2=4.",
        ]
        if len(ops) > 2:  # a one-shot sum of 3+ operands shows no strategy (with 2 it IS left_to_right)
            garbage.append("+".join(map(str, ops)) + f"={total}.\nAnswer: {total}")
        for t in r["traces"]:  # the reference characters, shuffled
            chars = list(t["text"])
            rng.shuffle(chars)
            garbage.append("".join(chars))
        for g in garbage:
            assert synthetic.verify(r, g).strategy is None, (r["question"], g)
        assert synthetic.verify(r, f"Answer: {total}").correct
        # a running sum over a different question's operands has no recognisable direction
        other = [o + 1 for o in ops]
        assert synthetic.verify(r, synthetic.render_trace(other, "left_to_right")).strategy is None


def test_verifier_on_mixed_and_partial_text():
    r = synthetic.make_record([47, 385, 12, 66])
    t = {x["source"]: x["text"] for x in r["traces"]}
    # the rounding markers together with column sections: ambiguous
    assert synthetic.verify(r, t["round_tens"] + " " + t["place_value"]).strategy is None
    # a truncated trace still shows its strategy (first step only)
    assert synthetic.verify(r, "47+385=432.").strategy == "left_to_right"
    assert synthetic.verify(r, "66+12=78.").strategy == "right_to_left"
    assert synthetic.verify(r, "ones: 7+5+2+6=20.").strategy == "place_value"
    assert synthetic.verify(r, "47->50-3, 385->390-5,").strategy == "round_tens"
    # only one rounding marker out of four is not enough evidence
    assert synthetic.verify(r, "47->50-3.").strategy is None
    # a step glued to a word, or an operand written with a leading zero, is not the question's operand
    assert synthetic.verify(r, "x47+385=432. x432+12=444.").strategy is None
    assert synthetic.verify(r, "047+0385=432. 432+012=444.").strategy is None
    # a column section whose terms are not multiples of the place value is not a column
    assert synthetic.verify(r, "tens: 4+8+1+6=19.").strategy is None


def test_heldout_split_disjoint():
    for d in ("tiny", "medium"):
        train, held = synthetic.build_splits(300, 100, seed=2, difficulty=d)
        assert len(train) == 300 and len(held) == 100
        key = lambda r: tuple(sorted(synthetic.parse_question(r["question"])))  # noqa: E731
        assert not {key(r) for r in train} & {key(r) for r in held}
        assert not {r["id"] for r in train} & {r["id"] for r in held}
        assert len({key(r) for r in train + held}) == 400
        assert synthetic.build_splits(300, 100, seed=2, difficulty=d) == (train, held)
    with pytest.raises(ValueError, match="distinct questions"):
        synthetic.build_records(37, seed=0, difficulty=SyntheticDifficulty(2, 2, 1, 1))


def test_digits_split_reorders_but_never_leaks_a_heldout_multiset():
    """'digits' (one-digit operands) has only 246 operand multisets, so training questions may repeat a multiset in
    another order; no held-out multiset may appear in training in any order, and held-out multisets are distinct."""
    train, held = synthetic.build_splits(1024, 64, seed=0, difficulty="digits")
    key = lambda r: tuple(sorted(synthetic.parse_question(r["question"])))  # noqa: E731
    assert len(train) == 1024 and len(held) == 64
    assert len({key(r) for r in held}) == 64
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert len({r["id"] for r in train}) == 1024  # an order is a question: ids stay unique
    assert len({key(r) for r in train}) < 1024    # multisets do repeat, in other orders
    assert all(1 <= o <= 9 for r in train + held for o in synthetic.parse_question(r["question"]))
    assert synthetic.build_splits(1024, 64, seed=0, difficulty="digits") == (train, held)
    with pytest.raises(ValueError, match="distinct questions"):  # 246 - 64 multisets cannot give 4000 orders
        synthetic.build_splits(4000, 64, seed=0, difficulty="digits")


def test_charset_covers_everything(all_records):
    used = set()
    styles = [(d, synthetic.build_records(30, seed=0, difficulty=d, strategy_set="styles")) for d in DIFFS]
    for _, records in all_records + styles:
        for r in records:
            used.update(r["question"])
            for t in r["traces"]:
                used.update(t["text"])
    assert used <= set(synthetic.CHARSET)
    assert used == set(synthetic.CHARSET)  # and nothing in it is unused
    assert list(synthetic.CHARSET) == sorted(set(synthetic.CHARSET))


# ------------------------------------------------------------------------------------ synthetic, 'styles' set

def test_style_records_and_splits():
    recs = synthetic.build_records(40, seed=3, difficulty="digits", strategy_set="styles")
    order = synthetic.build_records(40, seed=3, difficulty="digits")
    # the same questions (and ids) as the 'order' set; only the traces differ
    assert [r["question"] for r in recs] == [r["question"] for r in order]
    assert [r["id"] for r in recs] == [r["id"] for r in order]
    for r in recs:
        assert [t["source"] for t in r["traces"]] == list(synthetic.STYLE_STRATEGIES)
        assert len({t["text"] for t in r["traces"]}) == 4
    assert synthetic.render_trace([3, 4, 5, 6, 7], "pairs") == "(3+4)+(5+6)+7=7+11+7=25.\nAnswer: 25"
    assert synthetic.render_trace([3, 4], "pairs") == "(3+4)=7.\nAnswer: 7"
    assert synthetic.render_trace([3, 4, 5], "running_sum") == synthetic.render_trace([3, 4, 5], "left_to_right")
    train, held = synthetic.build_splits(200, 20, seed=1, difficulty="tiny", strategy_set="styles")
    assert (train, held) == synthetic.build_splits(200, 20, seed=1, difficulty="tiny", strategy_set="styles")
    assert len(train) == 200 and len(held) == 20
    with pytest.raises(ValueError, match="unknown strategy set 'nope'"):
        synthetic.build_records(5, seed=0, strategy_set="nope")
    with pytest.raises(ValueError, match="num_strategies must be in 1..4"):
        synthetic.build_records(5, seed=0, num_strategies=5, strategy_set="styles")


def test_classify_style_names_every_reference_trace():
    n = 0
    for i, d in enumerate(DIFFS):
        for r in synthetic.build_records(N_PER_DIFF.get(i, 300), seed=2, difficulty=d, strategy_set="styles"):
            for t in r["traces"]:
                assert synthetic.classify_style(r, t["text"]) == t["source"], (r["question"], t)
                assert synthetic.verify(r, t["text"]).correct  # the answer checker is the order set's
                n += 1
    assert n > 5000


def test_classify_style_judges_structure_not_operands():
    r = synthetic.make_record([6, 9, 5])
    style = synthetic.classify_style
    # the style is named even when the operands are copied wrongly (what a tag is meant to steer is the style;
    # the checker judges the answer)
    assert style(r, "7+9=11. 11+1=19.\nAnswer: 19") == "running_sum"
    assert style(r, "(7+9)+1=16+1=17.\nAnswer: 17") == "pairs"
    assert style(r, "ones: 9+9+9=20.\nAnswer: 20") == "place_value"
    assert style(r, "6->10-4, 9->10-1, 5->10-5. 10+10+10=30. -4-1-5=-10. 30-10=20.") == "round_tens"
    # truncated first steps still show their style
    assert style(r, "6+9=15.") == "running_sum" and style(r, "(6+9)") == "pairs"
    # no evidence, or two kinds of it at once: no style
    for text in ("", "Answer: 20", r["question"], "6+9+5=20.\nAnswer: 20", "The quick brown fox.",
                 "(6+9)+5=20. ones: 6+9+5=20.", "6->10-4, 9->10-1. (6+9)", "6->10-4, 9->10-1. ones: 6+9+5=20."):
        assert style(r, text) is None, text
    # a running-sum step beside another style's marks is that style's (each of them writes such steps)
    assert style(r, "6+9=15. ones: 6+9+5=20.") == "place_value" and style(r, "6+9=15. (15+5)=20.") == "pairs"
    # only what comes before the last answer line counts
    assert style(r, "Answer: 1\n(6+9)") is None
    assert style(r, "(6+9)+5=15+5=20.\nAnswer: 20\n6+9=15.") == "pairs"


def test_style_dataset_is_registered():
    from ssft_jax import datasets
    from ssft_jax.config import load_config
    spec = datasets.get_dataset("synthetic_styles")
    assert spec.checker == "synthetic" and spec.classifier.names == synthetic.STYLE_STRATEGIES
    c = load_config("demo", "tiny")
    c.data.name = "synthetic_styles"
    train, held = datasets.build_records(c)
    assert (train, held) == synthetic.build_splits(32, 8, seed=c.seed, difficulty="tiny", strategy_set="styles")
    rec = train[0]
    for t in rec["traces"]:
        assert spec.classifier(rec, t["text"]) == t["source"]


def test_difficulty_validation():
    with pytest.raises(ValueError):
        SyntheticDifficulty(1, 3, 1, 2)
    with pytest.raises(ValueError):
        SyntheticDifficulty(2, 3, 1, 7)
    with pytest.raises(ValueError):
        synthetic.build_records(3, seed=0, difficulty="impossible")
    with pytest.raises(ValueError):
        synthetic.render_trace([1, 2], "guessing")


# ----------------------------------------------------------------------------------------------- GSM8K

GSM_DIR = gsm8k.default_data_dir()
needs_gsm8k = pytest.mark.skipif(not (GSM_DIR / "test.jsonl").is_file(),
                                 reason=f"GSM8K data folder {GSM_DIR} is absent")


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _ws(s):
    return " ".join(s.split())


@pytest.fixture(scope="module")
def gsm_test():
    records, stats = gsm8k.load_gsm8k_multitrace("test", return_stats=True)
    return records, stats, _jsonl(GSM_DIR / "test.jsonl"), _jsonl(GSM_DIR / "example_model_solutions.jsonl")


@needs_gsm8k
def test_gsm8k_multitrace_records(gsm_test):
    records, stats, raw, models = gsm_test
    assert len(records) == len(raw) == 1319
    assert len({r["id"] for r in records}) == len(records)
    for rec, row, mrow in zip(records, raw, models):
        assert rec["question"] == row["question"]
        assert rec["answer"] == row["answer"].split("####")[-1].strip().replace(",", "")
        sources = [t["source"] for t in rec["traces"]]
        assert sources[0] == "reference" and sources[1] == "socratic"
        keys = [_ws(t["text"]) for t in rec["traces"]]
        assert len(set(keys)) == len(keys), rec["id"]
        for t in rec["traces"]:
            assert t["text"].endswith(f"\nThe answer is {rec['answer']}.")
            assert "<<" not in t["text"] and ">>" not in t["text"] and "####" not in t["text"]
            assert "\nA:" not in t["text"]
            assert gsm8k.answer_is_correct(rec["answer"], t["text"])
        # model solutions: only those labelled correct; a labelled-correct one is missing only as a duplicate
        correct = {k for k, v in mrow.items() if isinstance(v, dict) and v["is_correct"]}
        included = set(sources[2:])
        assert included <= correct, rec["id"]
        for k in correct - included:
            text = gsm8k.make_trace_text(mrow[k]["solution"], rec["answer"])
            assert _ws(text) in keys
    # socratic trace = the reference with sub-question prefixes
    first = records[0]["traces"]
    assert first[0]["text"].startswith("Janet sells 16 - 3 - 4 = 9 duck eggs a day.")
    assert first[1]["text"].startswith("How many eggs does Janet sell? ** Janet sells 16 - 3 - 4 = 9 duck")
    assert records[0]["answer"] == "18"


@needs_gsm8k
def test_gsm8k_alignment_counts(gsm_test):
    records, stats, raw, models = gsm_test
    assert stats.n_questions == stats.matched_socratic == stats.matched_model == stats.same_line_index == 1319
    assert stats.missing_socratic == stats.missing_model == stats.extra_socratic == stats.extra_model == 0
    assert stats.socratic_answer_mismatch == stats.model_ground_truth_mismatch == 0
    n_correct = sum(v["is_correct"] for m in models for v in m.values() if isinstance(v, dict))
    n_all = sum(isinstance(v, dict) for m in models for v in m.values())
    assert stats.model_correct == n_correct and stats.model_incorrect_excluded == n_all - n_correct
    total = sum(len(r["traces"]) for r in records)
    assert total == 2 * 1319 + n_correct - stats.duplicates_removed
    assert sum(stats.source_counts.values()) == total


@needs_gsm8k
def test_gsm8k_max_traces_and_calculator(gsm_test):
    records, stats, _, _ = gsm_test
    capped, st2 = gsm8k.load_gsm8k_multitrace("test", max_traces=2, return_stats=True)
    assert all([t["source"] for t in r["traces"]] == ["reference", "socratic"] for r in capped)
    assert st2.dropped_by_max_traces == sum(len(r["traces"]) for r in records) - 2 * len(records) > 0
    one = gsm8k.load_gsm8k_multitrace("test", max_traces=1)
    assert [r["traces"] for r in one] == [r["traces"][:1] for r in records]
    raw = gsm8k.load_gsm8k_multitrace("test", clean_calculator=False)
    assert "<<16-3-4=9>>" in raw[0]["traces"][0]["text"]
    assert raw[0]["traces"][0]["text"].endswith("\nThe answer is 18.")
    with pytest.raises(ValueError):
        gsm8k.load_gsm8k_multitrace("test", max_traces=0)


@needs_gsm8k
def test_gsm8k_single_train():
    recs = gsm8k.load_gsm8k_single("train")
    raw = _jsonl(GSM_DIR / "train.jsonl")
    assert len(recs) == len(raw) == 7473
    for rec, row in zip(recs, raw):
        assert [t["source"] for t in rec["traces"]] == ["reference"]
        assert rec["answer"] == row["answer"].split("####")[-1].strip().replace(",", "")
        assert rec["traces"][0]["text"].endswith(f"\nThe answer is {rec['answer']}.")
    s = gsm8k.summary(recs)
    assert s["questions"] == 7473 and s["traces_per_question"] == {1: 7473}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@needs_gsm8k
def test_gsm8k_misaligned_files_are_counted(tmp_path, monkeypatch):
    test = _jsonl(GSM_DIR / "test.jsonl")[:6]
    soc = _jsonl(GSM_DIR / "test_socratic.jsonl")[:6]
    mod = _jsonl(GSM_DIR / "example_model_solutions.jsonl")[:6]
    soc = soc[1:] + [{"question": "A question nobody asked?", "answer": "x\n#### 1"}]  # q0 missing, one extra
    soc[2]["answer"] = soc[2]["answer"].rsplit("####", 1)[0] + "#### 99999"  # q3: answer disagrees
    mod = mod[::-1]  # other order: matched by text, not by line
    mod[4] = dict(mod[4], question="  " + mod[4]["question"].replace(" ", "  ") + " ")  # q1: spacing differs
    del mod[1]  # q4 missing
    _write_jsonl(tmp_path / "test.jsonl", test)
    _write_jsonl(tmp_path / "test_socratic.jsonl", soc)
    _write_jsonl(tmp_path / "example_model_solutions.jsonl", mod)
    monkeypatch.setenv(gsm8k.ENV_VAR, str(tmp_path))
    recs, st = gsm8k.load_gsm8k_multitrace("test", return_stats=True)
    assert len(recs) == 6  # no question is dropped
    assert (st.missing_socratic, st.extra_socratic, st.socratic_answer_mismatch, st.matched_socratic) == (1, 1, 1, 5)
    assert (st.missing_model, st.extra_model, st.matched_model) == (1, 0, 5)
    assert st.matched_by_normalized_text == 1 and st.same_line_index == 0
    assert [t["source"] for t in recs[0]["traces"]][:2] == ["reference", "175b_verification"]
    assert "socratic" not in [t["source"] for t in recs[3]["traces"]]
    assert [t["source"] for t in recs[4]["traces"]] == ["reference", "socratic"]
    assert [t["source"] for t in recs[1]["traces"]] == [  # matched after whitespace normalisation
        "reference", "socratic", "175b_verification", "6b_verification", "6b_finetuning"]
    # the argument beats the environment variable
    with pytest.raises(FileNotFoundError):
        gsm8k.load_gsm8k_multitrace("test", data_dir=tmp_path / "nowhere")


def test_extract_gsm8k_answer():
    cases = {
        "She makes 9 * 2 = $18.\n#### 18": "18",
        "#### 1,000": "1000",
        "#### -5": "-5",
        "so 3 + 4 = 7\nA: 3": "3",
        "A: 9.5": "9.5",
        "The answer is 42.": "42",
        "The answer is $1,250.50.": "1250.50",
        "So the final answer is 7 apples": "7",
        "First the answer is 3. Then the answer is 5.": "5",
        "12 + 3 = 15\n#### 15\nThe answer is 16.": "15",  # '####' takes precedence
        "He has 5 apples and 3 pears.": None,
        "": None,
        "The answer is unknown.": None,
    }
    for text, want in cases.items():
        assert gsm8k.extract_gsm8k_answer(text) == want, text
    assert gsm8k.answer_is_correct("18", "The answer is 18.0.")
    assert gsm8k.answer_is_correct("1,000", "A: 1000")
    assert gsm8k.answer_is_correct("x\n#### 70000", "The answer is 70,000.")
    assert not gsm8k.answer_is_correct("18", "The answer is 17.")
    assert not gsm8k.answer_is_correct("18", "18")  # no answer marker in the generation
    assert not gsm8k.answer_is_correct("18", "")
    # the value answers are compared (and voted) by: 18.0 is 18, a non-number or no answer is None
    assert gsm8k.to_decimal("18.0") == gsm8k.to_decimal("18") != gsm8k.to_decimal("18.5")
    assert gsm8k.to_decimal(gsm8k.normalize_number("$1,000.")) == 1000
    assert gsm8k.to_decimal("eighteen") is None and gsm8k.to_decimal(None) is None


def test_gsm8k_trace_text_and_summary():
    sol = "It takes 2/2=<<2/2=1>>1 bolt\nSo 2+1=<<2+1=3>>3 bolts  \n#### 3"
    assert gsm8k.make_trace_text(sol, "3") == "It takes 2/2=1 bolt\nSo 2+1=3 bolts\nThe answer is 3."
    assert gsm8k.make_trace_text("x = 3\nA: 3", "3") == "x = 3\nThe answer is 3."
    recs = [{"id": "a", "question": "q", "answer": "1", "traces": [{"text": "ab", "source": "reference"}]},
            {"id": "b", "question": "q", "answer": "1",
             "traces": [{"text": "abcd", "source": "reference"}, {"text": "abcdef", "source": "socratic"}]}]
    s = gsm8k.summary(recs)
    assert s["questions"] == 2 and s["traces"] == 3 and s["traces_per_question"] == {1: 1, 2: 1}
    assert s["mean_trace_chars"] == 4.0 and s["sources"] == {"reference": 2, "socratic": 1}
