"""Tests for ssft_jax.matching against scipy.optimize.linear_sum_assignment.

Problems come in a few fixed shapes so each solver compiles once per shape (match_jit
caches on shape + static args); hypothesis only draws seeds / problem kinds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.optimize import linear_sum_assignment

from ssft_jax import matching as mm

EXACT = ("hungarian", "auction", "optax_hungarian", "bruteforce")
B = 8
SHAPES = ((6, 4), (7, 5), (5, 5))
KINDS = ("float", "int", "ties", "wide", "tiny_diff", "masked", "forbidden")

PROP = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_problem(kind, seed, n, m, b=B):
    """Returns cost [b, n, m] float32 and masks (None or bool arrays)."""
    rng = np.random.default_rng(seed)
    tag_valid = trace_valid = None
    if kind == "float":
        c = rng.normal(size=(b, n, m))
    elif kind == "int":
        c = rng.integers(-20, 20, size=(b, n, m))
    elif kind == "ties":
        c = rng.integers(0, 2, size=(b, n, m))
    elif kind == "wide":  # 1e6-ish range
        c = rng.uniform(0, 1e6, size=(b, n, m)).round()
    elif kind == "tiny_diff":  # differences of 1e-6 on top of an offset
        c = 3.0 + 1e-6 * rng.integers(0, 50, size=(b, n, m))
    elif kind == "masked":
        c = rng.random(size=(b, n, m))
        tag_valid = rng.random((b, n)) < 0.8
        trace_valid = rng.random((b, m)) < 0.8
        # keep every question feasible: at least as many valid tags as valid traces
        for q in range(b):
            while trace_valid[q].sum() > tag_valid[q].sum():
                trace_valid[q, np.flatnonzero(trace_valid[q])[0]] = False
        c = np.where(tag_valid[:, :, None] & trace_valid[:, None, :], c, np.nan)  # masked NaN ignored
    elif kind == "forbidden":
        c = rng.random(size=(b, n, m))
        c = np.where(rng.random((b, n, m)) < 0.3, np.inf, c)
    else:
        raise ValueError(kind)
    return c.astype(np.float32), tag_valid, trace_valid


def scipy_reference(c, tag_valid, trace_valid):
    """Optimal totals in float64 (NaN where infeasible) on the unmasked sub-problem."""
    b, n, m = c.shape
    out = np.full(b, np.nan)
    for q in range(b):
        rows = np.arange(n) if tag_valid is None else np.flatnonzero(tag_valid[q])
        cols = np.arange(m) if trace_valid is None else np.flatnonzero(trace_valid[q])
        sub = c[q][np.ix_(rows, cols)].astype(np.float64)
        if sub.shape[1] == 0:
            out[q] = 0.0
            continue
        if sub.shape[1] > sub.shape[0]:  # more valid traces than valid tags: infeasible
            continue
        try:
            r, k = linear_sum_assignment(sub)
        except ValueError:  # infeasible (forbidden pairs)
            continue
        out[q] = sub[r, k].sum()
    return out


def tolerance(opt, c):
    finite = np.abs(c[np.isfinite(c)])
    mag = max(1.0, float(finite.max()) if finite.size else 1.0)
    return 1e-5 * c.shape[2] * mag + 1e-9 * np.maximum(1, np.abs(opt))


def check_result(res, c, tag_valid, trace_valid, opt, exact):
    """Structural checks + optimal totals + certificate soundness."""
    b, n, m = c.shape
    tags = np.asarray(res.tag_of_trace)
    status = np.asarray(res.status)
    total = np.asarray(res.total_cost, np.float64)
    gap = np.asarray(res.gap, np.float64)
    tv = np.ones((b, m), bool) if trace_valid is None else trace_valid
    gv = np.ones((b, n), bool) if tag_valid is None else tag_valid
    tol = tolerance(opt, c)
    for q in range(b):
        if np.isnan(opt[q]):
            assert status[q] == mm.STATUS_INVALID
            assert (tags[q] == -1).all() and np.isnan(total[q])
            continue
        assert status[q] != mm.STATUS_INVALID, (q, c[q])
        assert (tags[q][~tv[q]] == -1).all()
        used = tags[q][tv[q]]
        assert len(set(used.tolist())) == len(used), "assignment not injective"
        assert ((used >= 0) & (used < n)).all() and gv[q][used].all(), "uses an invalid tag"
        recomputed = c[q][used, np.flatnonzero(tv[q])].astype(np.float64).sum()
        assert np.isfinite(recomputed), "matched a forbidden pair"
        assert abs(recomputed - total[q]) <= tol[q]
        # certificate soundness: never claims more than it can prove
        assert total[q] - opt[q] <= gap[q] + tol[q], (total[q], opt[q], gap[q])
        if status[q] == mm.STATUS_OPTIMAL:
            assert abs(total[q] - opt[q]) <= tol[q]
            assert gap[q] == 0.0
        if exact:
            assert abs(total[q] - opt[q]) <= tol[q], (q, total[q], opt[q])
            assert status[q] == mm.STATUS_OPTIMAL


def run(c, tag_valid, trace_valid, method, **kw):
    tv = None if tag_valid is None else jnp.asarray(tag_valid)
    rv = None if trace_valid is None else jnp.asarray(trace_valid)
    return jax.block_until_ready(mm.match_jit(jnp.asarray(c), tv, rv, method=method, **kw))


def _all_masks(c, tag_valid, trace_valid):
    """Same problem with explicit all-true masks so every kind shares one compiled fn."""
    b, n, m = c.shape
    tv = np.ones((b, n), bool) if tag_valid is None else tag_valid
    rv = np.ones((b, m), bool) if trace_valid is None else trace_valid
    return tv, rv


@PROP
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES))
def test_exact_methods_match_scipy(kind, seed, shape):
    n, m = shape
    c, tag_valid, trace_valid = make_problem(kind, seed, n, m)
    opt = scipy_reference(c, tag_valid, trace_valid)
    tv, rv = _all_masks(c, tag_valid, trace_valid)
    for method in EXACT:
        res = run(c, tv, rv, method)
        check_result(res, c, tag_valid, trace_valid, opt, exact=True)


@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1))
def test_sinkhorn_certificate_is_sound(kind, seed):
    c, tag_valid, trace_valid = make_problem(kind, seed, 6, 4)
    opt = scipy_reference(c, tag_valid, trace_valid)
    tv, rv = _all_masks(c, tag_valid, trace_valid)
    res = run(c, tv, rv, "sinkhorn")
    check_result(res, c, tag_valid, trace_valid, opt, exact=False)
    plan = np.asarray(res.plan)
    ok = ~np.isnan(opt)
    # soft plan: every valid trace carries unit mass, no tag more than one
    np.testing.assert_allclose(plan[ok].sum(1)[rv[ok]], 1.0, atol=1e-3)
    assert (plan[ok].sum(2) <= 1.0 + 1e-3).all()


def test_sinkhorn_exact_rate():
    """On well-separated random float costs rounding + repair is almost always exact and
    the certificate recognises most of those."""
    c, _, _ = make_problem("float", 123, 8, 5, b=64)
    opt = scipy_reference(c, None, None)
    res = run(c, None, None, "sinkhorn")
    check_result(res, c, None, None, opt, exact=False)
    total = np.asarray(res.total_cost)
    exact = np.abs(total - opt) <= tolerance(opt, c)
    assert exact.mean() >= 0.95
    assert (np.asarray(res.status) == mm.STATUS_OPTIMAL).mean() >= 0.8


def test_auction_integer_resolution_certifies():
    c, _, _ = make_problem("int", 7, 12, 6, b=16)
    opt = scipy_reference(c, None, None)
    res = run(c, None, None, "auction", resolution=1.0)
    check_result(res, c, None, None, opt, exact=True)


def test_auction_rectangular_no_price_war():
    """(16, 4) with 12 spare tags: iterations stay small (a padded square auction needs
    hundreds) and results are exact."""
    c, _, _ = make_problem("float", 3, 16, 4, b=32)
    opt = scipy_reference(c, None, None)
    res = run(c, None, None, "auction")
    check_result(res, c, None, None, opt, exact=True)
    assert int(np.max(res.iterations)) < 150


def test_auction_iteration_cap_flags_and_bounds_gap():
    c, _, _ = make_problem("float", 11, 12, 6, b=16)
    opt = scipy_reference(c, None, None)
    res = run(c, None, None, "auction", auction_max_iter=3)
    assert (np.asarray(res.iterations) <= 3 + 1).all()
    # still injective and the gap still bounds the true suboptimality
    check_result(res, c, None, None, opt, exact=False)
    assert (np.asarray(res.status) == mm.STATUS_APPROXIMATE).any()


@pytest.mark.parametrize("method", EXACT + ("sinkhorn",))
def test_nan_in_valid_cell_is_invalid_and_masked_nan_ignored(method):
    c, _, _ = make_problem("float", 5, 6, 4, b=4)
    tv = np.ones((4, 6), bool)
    rv = np.ones((4, 4), bool)
    c[0, 2, 1] = np.nan  # valid cell -> question 0 invalid
    tv[1, 3] = False
    c[1, 3, :] = np.nan  # masked tag row -> ignored
    rv[2, 0] = False
    c[2, :, 0] = np.nan  # masked trace column -> ignored
    res = run(c, tv, rv, method)
    assert int(res.status[0]) == mm.STATUS_INVALID
    assert (np.asarray(res.tag_of_trace[0]) == -1).all()
    assert np.isnan(float(res.total_cost[0])) and np.isnan(float(res.gap[0]))
    opt = scipy_reference(c, tv, rv)
    opt[0] = np.nan
    check_result(res, c, tv, rv, opt, exact=method != "sinkhorn")
    assert np.asarray(res.tag_of_trace)[2, 0] == -1


@pytest.mark.parametrize("method", EXACT + ("sinkhorn",))
def test_infeasible_and_forbidden(method):
    c, _, _ = make_problem("float", 9, 6, 4, b=4)
    c[0, :, 2] = np.inf  # trace 2 forbidden everywhere: infeasible
    c[1, :, :2] = np.inf
    c[1, 0, 0] = 1.0
    c[1, 0, 1] = 0.5
    c[1, 1, 1] = 9.0  # traces 0 and 1 must share tags {0, 1}: forced 0->0, 1->1
    c[2, :, :] = np.inf
    np.fill_diagonal(c[2], 5.0)  # only the diagonal is allowed
    tv = np.ones((4, 6), bool)
    tv[3, 2:] = False  # 2 valid tags for 4 traces: infeasible
    res = run(c, tv, None, method)
    status = np.asarray(res.status)
    assert status[0] == mm.STATUS_INVALID and status[3] == mm.STATUS_INVALID
    np.testing.assert_array_equal(np.asarray(res.tag_of_trace[1, :2]), [0, 1])
    np.testing.assert_array_equal(np.asarray(res.tag_of_trace[2]), [0, 1, 2, 3])
    assert float(res.total_cost[2]) == pytest.approx(20.0)
    opt = scipy_reference(c, tv, None)
    check_result(res, c, tv, None, opt, exact=method != "sinkhorn")


@pytest.mark.parametrize("method", EXACT)
def test_ties_are_deterministic(method):
    c = np.zeros((2, 6, 4), np.float32)  # everything tied
    c[1] = np.float32(np.random.default_rng(0).integers(0, 2, (6, 4)))
    r1 = run(c, None, None, method)
    r2 = run(c, None, None, method)
    np.testing.assert_array_equal(np.asarray(r1.tag_of_trace), np.asarray(r2.tag_of_trace))
    assert (np.asarray(r1.status) == mm.STATUS_OPTIMAL).all()
    assert float(r1.total_cost[0]) == 0.0


def test_bruteforce_tie_break_prefers_lower_tags():
    c = np.zeros((1, 6, 4), np.float32)
    res = run(c, None, None, "bruteforce")
    np.testing.assert_array_equal(np.asarray(res.tag_of_trace[0]), [0, 1, 2, 3])


def test_padded_traces_and_all_padded():
    c, _, _ = make_problem("float", 1, 6, 4, b=3)
    rv = np.array([[True, False, True, False], [False] * 4, [True] * 4])
    for method in EXACT:
        res = run(c, None, rv, method)
        assert (np.asarray(res.tag_of_trace)[~rv] == -1).all()
        assert float(res.total_cost[1]) == 0.0 and int(res.status[1]) == mm.STATUS_OPTIMAL
        check_result(res, c, None, rv, scipy_reference(c, None, rv), exact=True)


@pytest.mark.parametrize("shape", [(64, 8), (32, 32)])
def test_large_shapes(shape):
    n, m = shape
    c, _, _ = make_problem("float", 2, n, m, b=2)
    opt = scipy_reference(c, None, None)
    for method in ("hungarian", "auction"):
        check_result(run(c, None, None, method), c, None, None, opt, exact=True)


@pytest.mark.slow
def test_n64_square():
    c, _, _ = make_problem("float", 4, 64, 64, b=2)
    opt = scipy_reference(c, None, None)
    for method in ("hungarian", "auction", "optax_hungarian"):
        check_result(run(c, None, None, method), c, None, None, opt, exact=True)


def test_hungarian_duals_certify():
    """Reduced costs of the Hungarian prices are >= 0 and tight on matched pairs."""
    c, _, _ = make_problem("float", 8, 7, 5, b=4)
    res = run(c, None, None, "hungarian")
    q = np.asarray(res.tag_prices, np.float64)
    cp = c - c.min(axis=(1, 2), keepdims=True)
    tags = np.asarray(res.tag_of_trace)
    for b in range(4):
        f = (cp[b] + q[b][:, None]).min(0)  # trace potentials from the min-reduction
        red = cp[b] + q[b][:, None] - f[None, :]
        assert (red >= -1e-5).all()
        np.testing.assert_allclose(red[tags[b], np.arange(5)], 0.0, atol=1e-5)
        unused = np.setdiff1d(np.arange(7), tags[b])
        np.testing.assert_allclose(q[b][unused], 0.0, atol=1e-5)


def test_vmap_and_jit_agree():
    c, _, _ = make_problem("float", 21, 6, 4, b=8)
    c2 = np.stack([c, c[::-1]])  # [2, B, N, M]
    for method in ("hungarian", "auction", "bruteforce"):
        f = jax.jit(jax.vmap(lambda x: mm.match(x, method=method)))
        res = f(jnp.asarray(c2))
        eager = mm.match(jnp.asarray(c2[1]), method=method)
        np.testing.assert_array_equal(np.asarray(res.tag_of_trace[1]), np.asarray(eager.tag_of_trace))
        np.testing.assert_allclose(np.asarray(res.total_cost[1]), np.asarray(eager.total_cost), rtol=1e-6)


def test_sharded_batch_over_8_devices():
    assert jax.device_count() == 8
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    c, _, _ = make_problem("float", 31, 6, 4, b=8)
    opt = scipy_reference(c, None, None)
    x = jax.device_put(jnp.asarray(c), NamedSharding(mesh, P("data")))
    for method in ("bruteforce", "hungarian", "auction"):
        res = jax.block_until_ready(mm.match_jit(x, method=method))
        assert res.tag_of_trace.sharding.spec[0] == "data" or len(res.tag_of_trace.sharding.device_set) == 8
        check_result(res, c, None, None, opt, exact=True)


def test_method_validation_and_auto():
    with pytest.raises(ValueError, match="unknown matching method"):
        mm.match(jnp.zeros((1, 3, 2)), method="greedy")
    with pytest.raises(ValueError, match="at least as many tags"):
        mm.match(jnp.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="bruteforce"):
        mm.resolve_method("bruteforce", 12, 6)
    assert mm.resolve_method("auto", 6, 4) == "bruteforce"
    assert mm.resolve_method("auto", 32, 32) == "hungarian"
    assert set(mm.solver_names()) >= {"auto", "auction", "hungarian", "bruteforce", "sinkhorn", "optax_hungarian"}
    assert mm.num_candidates(6, 4) == 360


def test_assignment_to_onehot():
    t = jnp.array([[2, -1, 0]])
    oh = np.asarray(mm.assignment_to_onehot(t, 4))
    assert oh.shape == (1, 4, 3)
    expected = np.zeros((1, 4, 3))
    expected[0, 2, 0] = 1
    expected[0, 0, 2] = 1
    np.testing.assert_array_equal(oh, expected)
