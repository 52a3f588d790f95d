"""Assignment methods, the second-best gap and the matching diagnostics."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from ssft_jax import losses, matching


def _problem(B=5, N=6, M=4, seed=0):
    rs = np.random.RandomState(seed)
    cost = jnp.asarray(rs.rand(B, N, M), jnp.float32)
    return cost, jnp.ones((B, N), bool), jnp.ones((B, M), bool)


def test_ssft_assignment_equals_scipy():
    cost, tv, rv = _problem()
    tags, ok, status = jax.jit(lambda c: losses.assign("ssft", c, tv, rv, jax.random.key(0)))(cost)
    assert bool(ok.all()) and bool((status == matching.STATUS_OPTIMAL).all())
    for b in range(cost.shape[0]):
        rows, cols = linear_sum_assignment(np.asarray(cost[b]))
        expect = np.full(4, -1)
        expect[cols] = rows
        np.testing.assert_array_equal(tags[b], expect)


@pytest.mark.parametrize("method", ["random", "sft_mixed", "fixed"])
def test_baseline_assignments(method):
    cost, tv, rv = _problem(B=64)
    rv = rv.at[3, 2].set(False)
    tv = tv.at[5, 0].set(False)
    tags, ok, _ = losses.assign(method, cost, tv, rv, jax.random.key(1))
    tags = np.asarray(tags)
    assert tags[3, 2] == -1 and bool(ok.all())
    if method == "sft_mixed":
        assert set(tags[tags >= 0].tolist()) == {0}
    elif method == "fixed":
        np.testing.assert_array_equal(tags[0], np.arange(4))
    else:
        for b, row in enumerate(tags):
            real = row[row >= 0]
            assert len(set(real.tolist())) == len(real)  # one-to-one
            assert b != 5 or 0 not in real.tolist()  # never an invalid tag
        # uniform-ish over tags across many questions
        counts = np.bincount(tags[tags >= 0], minlength=6)
        assert counts.min() > 0.5 * counts.mean()


def test_non_finite_cost_drops_the_question_for_every_method():
    cost, tv, rv = _problem()
    cost = cost.at[2, 1, 1].set(jnp.nan)
    for method in ("ssft", "random", "sft_mixed", "fixed"):
        tags, ok, _ = losses.assign(method, cost, tv, rv, jax.random.key(0))
        assert not bool(ok[2]) and bool(ok[jnp.asarray([0, 1, 3, 4])].all())
        assert (np.asarray(tags[2]) == -1).all()


def test_second_best_gap_is_exact():
    cost, tv, rv = _problem(B=6, N=5, M=3, seed=3)
    tags, _, _ = losses.assign("ssft", cost, tv, rv, jax.random.key(0))
    gap = np.asarray(losses.second_best_gap(cost, tags, tv, rv, "hungarian"))
    for b in range(cost.shape[0]):
        totals = sorted(sum(float(cost[b, perm[j], j]) for j in range(3))
                        for perm in itertools.permutations(range(5), 3))
        np.testing.assert_allclose(gap[b], totals[1] - totals[0], atol=1e-5)


def test_diagnostics_counts():
    cost = jnp.asarray([[[0.1, 5.0], [5.0, 0.2], [3.0, 3.0]]], jnp.float32)  # [1, 3, 2]
    tv, rv = jnp.ones((1, 3), bool), jnp.ones((1, 2), bool)
    tags, ok, status = losses.assign("ssft", cost, tv, rv, jax.random.key(0))
    d = losses.diagnostics(cost, tags, ok, status, tv, rv, num_tags=3)
    np.testing.assert_array_equal(d["tag_counts"], [1, 1, 0])
    np.testing.assert_allclose(d["matched_nll"], 0.15, atol=1e-6)
    np.testing.assert_allclose(d["unmatched_nll"], (5 + 5 + 3 + 3) / 4, atol=1e-6)
    assert int(d["questions_dropped"]) == 0 and int(d["solver_not_certified"]) == 0
