"""The held-out tag-teacher agreement (`ssft_jax.teacher_agreement`): the metric on hand-made cost histories, the
`gsm8k_teachers` records, and a CI-sized end-to-end run (a tiny from-scratch model on SmolLM2's tokenizer)."""
import itertools
import json
import math

import numpy as np
import pytest

from ssft_jax import teacher_agreement as ta
from ssft_jax.datasets import gsm8k

GSM_FILE = gsm8k.resolve_data_dir() / "example_model_solutions.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM_FILE.is_file(), reason=f"GSM8K data file {GSM_FILE} is absent")


def _cost_binding(perm, n_tags, rng, margin=1.0):
    """C [N, M] in which tag perm[j] fits teacher j best by `margin` (noise well below it)."""
    c = 3.0 + 0.1 * rng.random((n_tags, len(perm)))
    for j, t in enumerate(perm):
        c[t, j] -= margin
    return c


def test_exact_assignment_is_scipy_optimal_on_rectangular_costs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = rng.random((6, 4))
        tags = ta.exact_assignment(c)
        best = min(itertools.permutations(range(6), 4), key=lambda p: sum(c[p[j], j] for j in range(4)))
        assert len(set(tags.tolist())) == 4
        assert sum(c[tags[j], j] for j in range(4)) == pytest.approx(sum(c[best[j], j] for j in range(4)))
    with pytest.raises(ValueError, match="N >= M"):
        ta.exact_assignment(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        ta.exact_assignment(np.array([[np.nan, 1.0], [1.0, 0.0]]))


def test_agreement_on_a_hand_made_cost_history():
    """Training history binds teacher j to tag (2, 0, 5, 3)[j]; held-out questions: 6 keep that binding, 2 swap
    teachers 0 and 1, 2 use another binding altogether."""
    rng = np.random.default_rng(1)
    bound = (2, 0, 5, 3)
    history = [_cost_binding(bound, 6, rng) for _ in range(9)] + [_cost_binding((1, 0, 5, 3), 6, rng)]
    counts = ta.counts_from_assignments([ta.exact_assignment(c) for c in history], 6)
    assert counts.tolist()[0] == [0, 1, 9, 0, 0, 0] and counts.sum() == 40
    held = ([_cost_binding(bound, 6, rng) for _ in range(6)] + [_cost_binding((0, 2, 5, 3), 6, rng)] * 2
            + [_cost_binding((4, 1, 0, 2), 6, rng)] * 2)
    r = ta.agreement(counts, np.stack(held))
    assert r["modal_tags"] == list(bound) and r["questions"] == 10
    assert r["per_teacher"] == pytest.approx([0.6, 0.6, 0.8, 0.8])
    assert r["teacher_on_its_tag"] == pytest.approx(0.7) and r["all_teachers"] == pytest.approx(0.6)
    assert r["chance_teacher"] == pytest.approx(1 / 6) and r["chance_all"] == pytest.approx(1 / (6 * 5 * 4 * 3))
    assert r["train_share_on_modal_tag"] == pytest.approx([0.9, 1.0, 1.0, 1.0])
    nll = ta.tag_teacher_nll(np.stack(held))
    assert nll.shape == (6, 4) and nll[2, 0] < nll[1, 0]  # teacher 0 fits its tag best on average


def test_uninformative_costs_agree_at_chance_and_shared_modal_tags_cannot_all_agree():
    rng = np.random.default_rng(2)
    counts = ta.counts_from_assignments([rng.permutation(6)[:4] for _ in range(200)], 6)
    r = ta.agreement(counts, rng.random((3000, 6, 4)))
    assert r["teacher_on_its_tag"] == pytest.approx(1 / 6, abs=0.02)
    assert r["all_teachers"] == pytest.approx(r["chance_all"], abs=0.005)
    shared = np.array([[5, 1, 0], [5, 0, 1]])  # both teachers' modal tag is 0
    assert ta.chance_all_agree(ta.modal_tags(shared), 3) == 0.0
    assert ta.agreement(shared, rng.random((50, 3, 2)))["all_teachers"] == 0.0
    with pytest.raises(ValueError, match="do not match"):
        ta.agreement(counts, rng.random((5, 4, 6)))
    with pytest.raises(ValueError, match="matched at least once"):
        ta.modal_tags([[0, 0], [1, 0]])
    assert math.perm(6, 4) == 360


@needs_gsm8k
def test_gsm8k_teachers_records_keep_teacher_order():
    records = gsm8k.load_gsm8k_teachers()
    assert len(records) == 151
    for r in records:
        assert [t["source"] for t in r["traces"]] == list(gsm8k.TEACHERS)
        assert len({t["text"] for t in r["traces"]}) == 4 and r["traces"][0]["text"].endswith(f"{r['answer']}.")


@needs_gsm8k
@pytest.mark.slow
def test_quick_run_writes_the_agreement_table_and_heat_map(tmp_path):
    assert ta.main(["--quick", "--out", str(tmp_path), "--quiet"]) == 0
    saved = json.loads((tmp_path / "agreement.json").read_text())
    assert saved["teachers"] == list(gsm8k.TEACHERS) and list(saved["results"]) == ["ssft", "random"]
    for method, r in saved["results"].items():
        assert r["questions"] == 4 and r["train_steps"] == 3
        assert np.asarray(r["tag_teacher_nll"]).shape == (6, 4)
        assert np.asarray(r["heldout_assignments"]).shape == (4, 4)
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        counts = np.asarray(summary["trace_tag_counts"])
        # 3 steps x 2 questions, each teacher matched once per question
        assert counts.shape == (4, 6) and (counts.sum(axis=1) == 6).all()
        assert r["modal_tags"] == ta.modal_tags(counts).tolist()
        costs = np.load(tmp_path / method / "heldout_costs.npy")
        assert costs.shape == (4, 6, 4) and np.isfinite(costs).all()
        assert r == {**r, **ta.agreement(counts, costs)}  # the saved figures are the metric of the saved costs
    md = (tmp_path / "agreement.md").read_text()
    assert md.count("\n| ssft |") + md.count("\n| random |") == 2
    assert (tmp_path / "tag_teacher_nll.png").stat().st_size > 10_000
