"""The main job at CI size: three methods trained and evaluated, the table, matrices, JSON and plot written."""
import json

import numpy as np
import pytest

from ssft_jax import demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = demo.main(["--quick", "--out", str(out), "--quiet", "--temperatures", "0", "1.0"])
    assert results == 0
    return out, json.loads((out / "results.json").read_text())


def test_outputs_and_table_structure(quick_demo):
    out, results = quick_demo
    assert list(results) == ["sft_mixed", "random", "ssft"]
    md = (out / "results.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("| sft_mixed |") or l.startswith("| random |")
             or l.startswith("| ssft |")]
    assert len(table) == 6  # main table + temperature table, one row per method each
    assert md.count("| slot |") == 3  # one N x strategies matrix per method
    assert (out / "results.png").stat().st_size > 10_000
    for method, r in results.items():
        for temp in ("0.0", "1.0"):
            ev = r["eval"][temp]
            counts = np.asarray(ev["tag_strategy_counts"])
            assert counts.shape == (6, 5)  # N tags x (4 strategies + none)
            assert counts.sum() == 8 * 6  # 8 held-out questions x 6 parallel generations
            assert 0.0 <= ev["mutual_information_frac_logM"] <= 1.0 + 1e-9
            assert 0.0 <= ev["pass@1_think1"] <= ev["pass@N"] <= 1.0
            assert 0.0 <= ev["pass@1_coverage"] <= ev["pass@N"] and 0 <= ev["coverage_tag"] < 6
            assert ev["coverage_tag"] == int(np.argmax(r["tag_counts"]))  # the tag matched most often in training
            assert 0.0 <= ev["distinct_strategies"] <= 4.0


def test_sft_mixed_greedy_generations_are_identical(quick_demo):
    """One shared tag + greedy decoding: the N 'parallel' generations must be the same text."""
    _, results = quick_demo
    examples = results["sft_mixed"]["eval"]["0.0"]["examples"]
    assert len(examples) == 6 and len({g["text"] for g in examples}) == 1
    assert all(g["tag"] == 0 for g in examples)


def test_distinct_strategies_counts_per_question():
    gens = [dict(question_index=q, slot=t, sample=0, strategy=s)
            for q, strategies in enumerate([["a", "a", "b", None], [None, None, None, None], ["a", "b", "c", "d"]])
            for t, s in enumerate(strategies)]
    assert demo.distinct_strategies(gens, 4) == pytest.approx((2 + 0 + 4) / 3)
