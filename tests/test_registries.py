"""The registries that extensions plug into: each built-in entry does what the code did before the table existed,
and a throwaway entry registered here runs through training and evaluation with no other file touched."""
import json
import threading

import pytest

from ssft_jax import checkers, config as config_lib, datasets
from ssft_jax.datasets import synthetic

# ==================================================================================================================
# datasets and checkers
# ==================================================================================================================


def test_builtin_datasets_build_the_records_runs_train_on(tmp_path):
    c = config_lib.load_config("demo", "tiny")
    c.seed = 3
    assert datasets.build_records(c) == synthetic.build_splits(32, 8, seed=3, num_strategies=4, difficulty="tiny")
    c.ssft.max_traces = 2
    train, held = datasets.build_records(c)
    assert {len(r["traces"]) for r in train + held} == {2}

    # gsm8k: the test questions in file order, the last data.heldout of them held out, traces capped at M
    rows = [{"question": f"Q{i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(5)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c.data.update(name="gsm8k", path=str(tmp_path), heldout=2)
    train, held = datasets.build_records(c)
    assert [r["question"] for r in train] == ["Q0?", "Q1?", "Q2?"] and [r["answer"] for r in held] == ["4", "5"]
    c.data.heldout = 0
    assert [len(x) for x in datasets.build_records(c)] == [5, 0]

    # jsonl: the files, in order, for the data layer to read; nothing held out
    c.data.update(name="jsonl", path="a.jsonl,b.parquet")
    assert datasets.build_records(c) == (["a.jsonl", "b.parquet"], [])
    c.data.path = ""
    with pytest.raises(ValueError, match="data.path must name the JSONL/parquet file"):
        datasets.build_records(c)

    assert datasets.dataset_names()[:3] == ("synthetic", "gsm8k", "jsonl")
    spec = datasets.get_dataset("synthetic")
    assert spec.checker == "synthetic" and spec.classifier.names == synthetic.STRATEGIES
    assert [datasets.get_dataset(n).checker for n in ("gsm8k", "jsonl")] == ["gsm8k", "math"]
    assert datasets.get_dataset("gsm8k").classifier is None and not datasets.get_dataset("jsonl").has_heldout
    c.data.name = "aime"
    with pytest.raises(KeyError, match="no dataset 'aime'; registered: \\('synthetic', 'gsm8k', 'jsonl'"):
        datasets.build_records(c)


def test_synthetic_classifier_names_each_strategy():
    rec = synthetic.make_record([47, 385, 12])
    classifier = datasets.get_dataset("synthetic").classifier
    for s in synthetic.STRATEGIES:
        assert classifier(rec, synthetic.render_trace([47, 385, 12], s)) == s
    assert classifier(rec, "Answer: 444") is None


def test_checkers():
    rec = synthetic.make_record([47, 385, 12])
    chk = checkers.get_checker("synthetic")
    for s in synthetic.STRATEGIES:
        assert chk(rec, synthetic.render_trace([47, 385, 12], s)) == checkers.CheckResult(True, "444")
    assert not chk(rec, "47+385=432.\nAnswer: 443").correct
    g = checkers.get_checker("gsm8k")
    assert g({"answer": "1,000"}, "so 1000 in all.\nThe answer is 1000.") == checkers.CheckResult(True, "1000")
    assert g({"answer": "18"}, "#### 18.0").answer == g({"answer": "18"}, "The answer is 18.").answer == "18"
    assert g({"answer": "18"}, "eighteen") == checkers.CheckResult(False, None)
    m = checkers.get_checker("math")
    assert m({"answer": "0.5"}, r"so the result is \boxed{\frac{1}{2}}").correct
    assert m({"answer": r"$\frac{1}{2}$"}, r"The answer is $0.5$").correct
    assert not m({"answer": "3"}, r"\boxed{4}").correct
    out = {}
    th = threading.Thread(target=lambda: out.update(r=m({"answer": "12"}, r"\boxed{12}")))  # no signal timeouts
    th.start()
    th.join()
    assert out["r"].correct
    assert checkers.get_checker(m) is m
    with pytest.raises(KeyError, match="no checker"):
        checkers.get_checker("aime")


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="dataset 'synthetic' is already registered"):
        datasets.register_dataset(datasets.DatasetSpec("synthetic", lambda c: ([], []), checker="math"))
    with pytest.raises(ValueError, match="checker 'math' is already registered"):
        checkers.register_checker("math", lambda: checkers.Checker("math", checkers.check_math))
    assert datasets.get_dataset("synthetic").checker == "synthetic"


# A throwaway task: "Say n." is answered by saying n, once ("once") or twice ("twice"): two strategies a classifier
# tells apart, and a checker of its own.
TOY = "toy_say"
TOY_STRATEGIES = ("once", "twice")


def _toy_record(n: int) -> dict:
    return {"id": f"say-{n}", "question": f"Say {n}.", "answer": str(n),
            "traces": [{"text": f"{n}", "source": "once"}, {"text": f"{n} {n}", "source": "twice"}]}


def _toy_check(record, text) -> checkers.CheckResult:
    words = text.split()
    return checkers.CheckResult(bool(words) and words[0] == record["answer"], words[0] if words else None)


def _toy_classify(record, text):
    words = text.split()
    return {1: "once", 2: "twice"}.get(len(words)) if words and set(words) == {record["answer"]} else None


@pytest.fixture
def toy_dataset():
    built = []

    def build(config):
        built.append(config.data.name)
        records = [_toy_record(n) for n in range(10 + config.seed, 26 + config.seed)]
        return records[:12], records[12:]

    checkers.register_checker(TOY, lambda: checkers.Checker(TOY, _toy_check))
    datasets.register_dataset(datasets.DatasetSpec(
        TOY, build, checker=TOY, classifier=datasets.StrategyClassifier(TOY_STRATEGIES, _toy_classify)))
    yield built
    del datasets.DATASETS[TOY], checkers.CHECKERS[TOY]


@pytest.mark.slow
def test_a_registered_dataset_trains_and_evaluates(toy_dataset, tmp_path, capsys):
    from ssft_jax import evaluate, train

    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(data=1, num_devices=1)
    c.data.name = TOY
    c.num_steps, c.export_hf = 2, False
    s = train.run(c, tmp_path / "run", progress=False)
    assert toy_dataset == [TOY] and s["questions"] == 12  # trained on the toy records, not on a built-in task

    out = tmp_path / "eval"
    assert evaluate.main(["--workdir", str(tmp_path / "run"), "--dataset", TOY, "--max_new_tokens", "6",
                          "--temperature", "1.0", "--top_p", "1.0", "--no_plots", "--out", str(out)]) == 0
    assert toy_dataset == [TOY, TOY]  # the held-out questions were built from the run's config
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["settings"]["dataset"] == TOY and doc["settings"]["checker"] == TOY
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    held = {r["id"]: r for r in [_toy_record(n) for n in range(22, 26)]}
    assert {g["id"] for g in gens} == set(held) and len(gens) == 4 * c.ssft.num_tags
    for g in gens:
        assert _toy_check(held[g["id"]], g["text"]) == checkers.CheckResult(g["correct"], g["answer"])
        assert g["strategy"] == _toy_classify(held[g["id"]], g["text"])
    st = doc["metrics"]["strategy"]
    assert st["names"] == [*TOY_STRATEGIES, "none"] and sum(map(sum, st["tag_strategy_counts"])) == len(gens)
    assert "tag->strategy MI" in capsys.readouterr().out
