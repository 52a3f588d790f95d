"""The shared half of `ssft_jax.matching` (the package docstring has the conventions and the certificate): the
result type, statuses, the solver registry, preparing a batch of problems into one dense shape every solver reads,
the LP certificate that turns any solver's answer and tag prices into a status and a gap, and `match` itself."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

STATUS_OPTIMAL = 0
STATUS_APPROXIMATE = 1
STATUS_INVALID = 2

# 'auto' = brute force when the candidate table is small, else Hungarian.  From
# bench/bench_matching.py on 2 CPU cores, B=256: at the paper's 6x4 brute force (one
# matmul, 0.27 ms) beats Hungarian (0.54 ms) and a scipy loop (1.2 ms); for larger shapes
# Hungarian is the fastest exact solver (auction's batched Jacobi iterations touch the
# whole [B, M, N] block every step and lose by 10-60x on CPU; optax has no duals).
DEFAULT_METHOD = "auto"
# Largest static table of injective maps brute force will build (7! = 5040).
BRUTEFORCE_MAX_CANDIDATES = 5040

F32 = jnp.float32
NEG = -jnp.inf


class MatchResult(NamedTuple):
    """Per-question matching result (all arrays have leading batch dim B)."""

    tag_of_trace: jax.Array  # [B, M] int32, -1 for padded traces / invalid questions
    total_cost: jax.Array  # [B] f32 sum of the original costs on chosen pairs; NaN if invalid
    status: jax.Array  # [B] int32 STATUS_*
    gap: jax.Array  # [B] f32 certified bound on suboptimality; 0 when optimal; NaN if invalid
    iterations: jax.Array  # [B] int32 solver iterations (0 for non-iterative methods)
    tag_prices: jax.Array  # [B, N] f32 dual prices q >= 0 (shifted-cost units) behind the gap
    plan: Optional[jax.Array] = None  # [B, N, M] Sinkhorn soft plan (method='sinkhorn' only)


def num_candidates(num_tags: int, num_traces: int) -> int:
    """Number of injective trace->tag maps, N! / (N - M)!."""
    return math.perm(num_tags, num_traces)


def resolve_method(method: str, num_tags: int, num_traces: int) -> str:
    """Validates `method` and maps 'auto' to a concrete solver for this static shape."""
    if method != "auto" and method not in SOLVERS:
        raise ValueError(f"unknown matching method {method!r}; expected one of {solver_names()}")
    if method == "auto":
        if num_candidates(num_tags, num_traces) <= BRUTEFORCE_MAX_CANDIDATES:
            return "bruteforce"
        return "hungarian"
    if method == "bruteforce" and num_candidates(num_tags, num_traces) > BRUTEFORCE_MAX_CANDIDATES:
        raise ValueError(
            f"bruteforce needs {num_candidates(num_tags, num_traces)} candidates at "
            f"(N={num_tags}, M={num_traces}) > BRUTEFORCE_MAX_CANDIDATES={BRUTEFORCE_MAX_CANDIDATES}"
        )
    return method


def assignment_to_onehot(tag_of_trace: jax.Array, num_tags: int, dtype=jnp.float32) -> jax.Array:
    """[B, M] tag indices (-1 = none) -> [B, N, M] 0/1 matrix P with P[b, tag, trace] = 1."""
    tags = jnp.arange(num_tags, dtype=tag_of_trace.dtype)
    return (tags[None, :, None] == tag_of_trace[:, None, :]).astype(dtype)


# ----------------------------------------------------------------------------------------
# Shared pre/post-processing
# ----------------------------------------------------------------------------------------


class Prepared(NamedTuple):
    cp: jax.Array  # [B, N, M] shifted, finite, padded cost seen by every solver
    forbidden: jax.Array  # [B, N, M] cells a valid trace must not use
    invalid_input: jax.Array  # [B] NaN / -inf in valid cells, or too few valid tags
    span: jax.Array  # [B] max shifted finite valid cost (>= 0)
    trace_valid: jax.Array  # [B, M]


def prepare(cost, tag_valid, trace_valid) -> Prepared:
    """The batch as one dense problem per question (shifted costs, forbidden cells priced out, padding free)."""
    B, N, M = cost.shape
    cost = cost.astype(F32)
    if tag_valid is None:
        tag_valid = jnp.ones((B, N), bool)
    if trace_valid is None:
        trace_valid = jnp.ones((B, M), bool)
    tag_valid = tag_valid.astype(bool)
    trace_valid = trace_valid.astype(bool)
    valid = tag_valid[:, :, None] & trace_valid[:, None, :]
    bad = valid & (jnp.isnan(cost) | (cost == -jnp.inf))
    finite = valid & jnp.isfinite(cost)
    shift = jnp.min(jnp.where(finite, cost, jnp.inf), axis=(1, 2))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    shifted = jnp.where(finite, cost - shift[:, None, None], 0.0)
    span = jnp.max(shifted, axis=(1, 2))
    big = (M + 1) * (span + 1.0)
    trace_col = jnp.broadcast_to(trace_valid[:, None, :], cost.shape)
    forbidden = trace_col & ~finite
    cp = jnp.where(forbidden, big[:, None, None], shifted)
    cp = jnp.where(trace_col, cp, 0.0)  # padded traces: free everywhere
    too_many = jnp.sum(trace_valid, 1) > jnp.sum(tag_valid, 1)
    invalid_input = jnp.any(bad, axis=(1, 2)) | too_many
    return Prepared(cp, forbidden, invalid_input, span, trace_valid)


def dual_lower_bound(cp, q):
    """LB(q) = sum_j min_i (C_ij + q_i) - sum_i q_i for q >= 0 ([B, N, M], [B, N] -> [B])."""
    q = jnp.maximum(q, 0.0)
    return jnp.sum(jnp.min(cp + q[:, :, None], axis=1), axis=1) - jnp.sum(q, axis=1)


def prices_from_potentials(cp, g, tag_of_trace):
    """Best of a few gauge shifts s for prices q = max(s - g, 0) from tag potentials g.

    g are "cost side" tag potentials (ideally C_ij - f_j - g_i >= 0, g <= 0 for unused
    tags).  Only differences of g matter to the LP up to the gauge, so try s = max(g)
    (Hungarian / Sinkhorn normalisation) and s = max over *assigned* tags (= -lambda of
    the asymmetric auction).  Any s gives a valid bound; we keep the tighter one.
    """
    N = cp.shape[1]
    used = jnp.any(assignment_to_onehot(tag_of_trace, N, bool), axis=2)
    s1 = jnp.max(g, axis=1)
    s2 = jnp.max(jnp.where(used, g, -jnp.inf), axis=1)
    s2 = jnp.where(jnp.isfinite(s2), s2, s1)
    q1 = jnp.maximum(s1[:, None] - g, 0.0)
    q2 = jnp.maximum(s2[:, None] - g, 0.0)
    better2 = dual_lower_bound(cp, q2) > dual_lower_bound(cp, q1)
    return jnp.where(better2[:, None], q2, q1)


def finalize(cost, prep: Prepared, tag_full, q, iterations, *, exact, rtol, resolution, plan=None):
    """Common status / gap / total computation from a full injective assignment."""
    cp, forbidden, invalid_input, span, trace_valid = prep
    B, N, M = cp.shape
    tag_full = tag_full.astype(jnp.int32)
    idx = tag_full[:, None, :]
    chosen = jnp.take_along_axis(cp, idx, axis=1)[:, 0, :]
    primal = jnp.sum(chosen, axis=1)
    infeasible = jnp.any(jnp.take_along_axis(forbidden, idx, axis=1)[:, 0, :], axis=1)
    q = jnp.maximum(q.astype(F32), 0.0)
    if exact:
        gap = jnp.zeros((B,), F32)
        q = jnp.zeros_like(q)
        optimal = jnp.ones((B,), bool)
    else:
        gap = jnp.maximum(primal - dual_lower_bound(cp, q), 0.0)
        magnitude = jnp.maximum(span, jnp.max(q, axis=1))
        tol = rtol * M * jnp.maximum(magnitude, jnp.finfo(jnp.float32).tiny)
        # span == 0: every assignment avoiding forbidden cells costs the same.
        optimal = (gap <= tol) | (span == 0)
        if resolution is not None:
            optimal = optimal | (gap < resolution)
    orig = jnp.take_along_axis(cost.astype(F32), idx, axis=1)[:, 0, :]
    total = jnp.sum(jnp.where(trace_valid, orig, 0.0), axis=1)
    invalid = invalid_input | infeasible | ~jnp.isfinite(total)
    status = jnp.where(invalid, STATUS_INVALID, jnp.where(optimal, STATUS_OPTIMAL, STATUS_APPROXIMATE))
    gap = jnp.where(optimal, jnp.zeros_like(gap), gap)
    gap = jnp.where(invalid, jnp.nan, gap)
    total = jnp.where(invalid, jnp.nan, total)
    tag_out = jnp.where(trace_valid & ~invalid[:, None], tag_full, -1)
    if plan is not None:
        plan = jnp.where(invalid[:, None, None], 0.0, plan)
    return MatchResult(
        tag_of_trace=tag_out.astype(jnp.int32),
        total_cost=total.astype(F32),
        status=status.astype(jnp.int32),
        gap=gap.astype(F32),
        iterations=iterations.astype(jnp.int32),
        tag_prices=q,
        plan=plan,
    )


def greedy_complete(score, tag_of_trace):
    """Fills traces with tag -1 greedily: repeatedly the (free tag, open trace) pair with the
    highest score (ties -> lowest flat index).  Single problem: score [N, M], tags [M]."""
    N, M = score.shape

    def body(_, t):
        used = jnp.zeros((N + 1,), bool).at[jnp.where(t < 0, N, t)].set(True)[:N]
        s = jnp.where(~used[:, None] & (t < 0)[None, :], score, NEG)
        k = jnp.argmax(s.ravel())
        i, j = k // M, k % M
        ok = s.ravel()[k] > NEG
        return jnp.where(ok, t.at[j].set(i.astype(t.dtype)), t)

    return jax.lax.fori_loop(0, M, body, tag_of_trace)


# ----------------------------------------------------------------------------------------
# The solver registry: a new solver is one function `(prepared problem, options) -> Solved` (in a file of its own,
# like hungarian.py) and one `register_solver` line; `match` then certifies its answer like every other solver's.
# ----------------------------------------------------------------------------------------

class SolverOptions(NamedTuple):
    resolution: Optional[float]
    auction_max_iter: int
    auction_theta: float
    sinkhorn_temps: int
    sinkhorn_inner: int
    sinkhorn_tau_min: float


class Solved(NamedTuple):
    """A solver's answer on the dense prepared problem `prep.cp` [B, N, M]: an injective tag per trace, tag prices
    q >= 0 for the LP certificate, iterations, and whether it is optimal by construction (no certificate needed)."""

    tag_of_trace: jax.Array
    tag_prices: jax.Array
    iterations: jax.Array
    exact: bool = False
    plan: Optional[jax.Array] = None


def no_iterations(prep):
    return jnp.zeros((prep.cp.shape[0],), jnp.int32)


SOLVERS: dict[str, Callable[[Prepared, SolverOptions], Solved]] = {}  # filled by the solver modules, in order


def register_solver(name: str, solve: Callable[[Prepared, SolverOptions], Solved]) -> None:
    """Add a solver under `name` (then valid as `match(method=name)` and as `ssft.matcher`)."""
    if name == "auto":
        raise ValueError("'auto' is not a solver name")
    SOLVERS[name] = solve


def unregister_solver(name: str) -> None:
    SOLVERS.pop(name)


def solver_names() -> tuple[str, ...]:
    """The names `match(method=)` and `ssft.matcher` take: "auto", then every registered solver."""
    return ("auto", *SOLVERS)


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def match(
    cost: jax.Array,
    tag_valid: Optional[jax.Array] = None,
    trace_valid: Optional[jax.Array] = None,
    method: str = DEFAULT_METHOD,
    *,
    rtol: float = 1e-5,
    resolution: Optional[float] = None,
    auction_max_iter: int = 20_000,
    auction_theta: float = 8.0,
    sinkhorn_temps: int = 12,
    sinkhorn_inner: int = 20,
    sinkhorn_tau_min: float = 1e-3,
    return_plan: bool = True,
) -> MatchResult:
    """Assigns each trace a distinct tag, per question.  Pure, jit/vmap-compatible.

    Args:
      cost: [B, N, M] float, cost of trace j under tag i; +inf forbids a pair.
      tag_valid: [B, N] bool or None (all valid).
      trace_valid: [B, M] bool or None (all valid).  Padded traces get tag -1.
      method: one of solver_names() (static).  'auto' = bruteforce if N!/(N-M)! <=
        BRUTEFORCE_MAX_CANDIDATES else 'hungarian'.
      rtol: status is optimal when gap <= rtol * M * magnitude (float rounding).
      resolution: if the costs lie on a lattice of this spacing (1.0 for integers), any
        gap < resolution proves optimality; the auction then runs to eps = r / (M + 1).
      auction_max_iter: static cap on auction iterations (forward + reverse, all phases).
      auction_theta: eps-scaling factor per phase.
      sinkhorn_temps, sinkhorn_inner, sinkhorn_tau_min: annealing schedule (number of
        temperatures, Sinkhorn iterations per temperature, final temperature / span).
      return_plan: keep the [B, N, M] soft plan in the result (sinkhorn only).

    Returns:
      MatchResult (see class).  Invalid questions: tag_of_trace = -1, total_cost = NaN,
      gap = NaN, status = STATUS_INVALID.
    """
    if cost.ndim != 3:
        raise ValueError(f"cost must be [B, N, M], got shape {cost.shape}")
    B, N, M = cost.shape
    if M > N:
        raise ValueError(f"need at least as many tags as traces, got N={N} < M={M}")
    method = resolve_method(method, N, M)
    prep = prepare(cost, tag_valid, trace_valid)
    kw = dict(rtol=rtol, resolution=resolution)
    if M == 0:
        return finalize(cost, prep, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, N)), jnp.zeros((B,), jnp.int32),
                         exact=True, **kw)
    options = SolverOptions(resolution=resolution, auction_max_iter=auction_max_iter, auction_theta=auction_theta,
                            sinkhorn_temps=sinkhorn_temps, sinkhorn_inner=sinkhorn_inner,
                            sinkhorn_tau_min=sinkhorn_tau_min)
    solved = SOLVERS[method](prep, options)
    plan = solved.plan if return_plan and solved.plan is not None else None
    if plan is not None:
        plan = jnp.where(prep.trace_valid[:, None, :], plan, 0.0)
    return finalize(cost, prep, solved.tag_of_trace, solved.tag_prices, solved.iterations, exact=solved.exact,
                     plan=plan, **kw)
