"""Batched tag <-> trace matching for SSFT (global forking tokens), pure JAX.

Per question SSFT assigns each of M reasoning traces a *distinct* forking tag out of
N >= M, minimising sum_j C[tag(j), j] where C[i, j] is the mean NLL of trace j under
tag i.  `match` solves B such problems at once, inside jit, on any backend.

Conventions
-----------
* ``cost[B, N, M]``: rows are tags, columns are traces (N >= M, static).
* ``tag_valid[B, N]`` / ``trace_valid[B, M]``: padding masks.  Masked-out cells are
  ignored entirely (NaN there is fine).  ``+inf`` in a valid cell forbids that pair.
* Result ``tag_of_trace[B, M]``: the chosen tag, ``-1`` for padded traces.

How masks are reduced to one dense problem (so every solver sees static shapes)
-----------------------------------------------------------------------------
Costs are shifted per question so that the smallest valid finite cost is 0 (this keeps
float32 resolution relative to the cost *span*, which is what matters for 1e-6
differences on top of large offsets).  Padded traces get cost 0 on every tag: they
absorb spare tags without changing the optimum of the real problem (N >= M, so a
completion always exists).  Forbidden cells (``+inf`` or invalid tag) get
``BIG = (M + 1) * (span + 1)``; any assignment using one costs more than any
assignment that avoids them, so the solvers never use a forbidden pair unless no
feasible assignment exists, and we detect that afterwards.

Status / certificates
---------------------
Every question gets ``status``:

* ``STATUS_INVALID`` (2): a NaN (or -inf) in a valid cell, more valid traces than
  valid tags, or no assignment avoiding forbidden pairs.  Then ``tag_of_trace`` is -1
  everywhere, ``total_cost`` and ``gap`` are NaN.  NaN is never silently matched.
* ``STATUS_OPTIMAL`` (0): certified.  ``gap`` is 0 or below the tolerance.
* ``STATUS_APPROXIMATE`` (1): a valid injective assignment whose suboptimality is at
  most ``gap`` (a certified upper bound, computed as below).

The certificate is LP duality for the (relaxed) assignment LP
``min sum C x  s.t.  sum_i x_ij = 1 (traces),  sum_j x_ij <= 1 (tags),  x >= 0``.
For *any* tag prices ``q >= 0`` the dual objective

    LB(q) = sum_j min_i (C_ij + q_i)  -  sum_i q_i

is a lower bound on the optimum, so ``gap = primal - LB(q)`` bounds the
suboptimality.  ``gap == 0`` iff the reduced costs ``C_ij + q_i - min_i(...)`` vanish
on the chosen pairs and every unused tag has price 0 (complementary slackness).  Each
solver supplies its own prices:

* ``hungarian`` (Jonker-Volgenant shortest augmenting paths): exact duals
  ``q = -v``; the gap is 0 up to float rounding.
* ``auction`` (forward auction + reverse auction for the asymmetric problem, with
  epsilon scaling): at termination the assignment satisfies eps-complementary slackness
  and every unassigned tag's price is <= lambda <= every assigned tag's price, so with
  ``q = max(p - lambda, 0)`` each trace contributes at most eps to the gap:
  ``gap <= M * eps``.  Hence for costs on a lattice of spacing ``r`` (integers: r = 1)
  a final ``eps < r / M`` proves optimality, because two assignment totals differ by a
  multiple of r (pass ``resolution=r``; the auction then uses ``eps = r / (M + 1)``).
  For float costs we do not rely on the bound: we compute the gap from the prices.
* ``sinkhorn``: the log-domain potentials of the (dummy-column balanced) entropic
  problem give tag potentials g; prices ``q = max(s - g, 0)`` for a couple of gauge
  shifts s (the best bound wins).  The min-reduction inside LB makes them feasible.
* ``optax_hungarian`` returns no duals; we recover prices for its assignment with a
  Bellman-Ford pass over the "move trace to another tag" graph (N rounds, O(N^3)).
* ``bruteforce`` enumerates every injective map, so it is optimal by construction
  (``gap = 0``, ``tag_prices = 0``, no LP certificate needed).

A result is ``STATUS_OPTIMAL`` when ``gap <= rtol * M * magnitude`` (float32 rounding
of M-term sums; ``magnitude = max(span, max price)``) or, if ``resolution`` is given,
when ``gap < resolution`` (the lattice argument above).

Ties are broken deterministically (same input -> same output, run to run); the exact
methods agree on the optimal *total*, not necessarily on which of several optimal
assignments they return.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

STATUS_OPTIMAL = 0
STATUS_APPROXIMATE = 1
STATUS_INVALID = 2

# The solver names, "auto" first; `SOLVERS` (below `match`) is the dispatch table and `register_solver` adds one.
METHODS: tuple[str, ...] = ("auto", "bruteforce", "hungarian", "auction", "sinkhorn", "optax_hungarian")
# 'auto' = brute force when the candidate table is small, else Hungarian.  From
# bench/bench_matching.py on 2 CPU cores, B=256: at the paper's 6x4 brute force (one
# matmul, 0.27 ms) beats Hungarian (0.54 ms) and a scipy loop (1.2 ms); for larger shapes
# Hungarian is the fastest exact solver (auction's batched Jacobi iterations touch the
# whole [B, M, N] block every step and lose by 10-60x on CPU; optax has no duals).
DEFAULT_METHOD = "auto"
# Largest static table of injective maps brute force will build (7! = 5040).
BRUTEFORCE_MAX_CANDIDATES = 5040

_F32 = jnp.float32
_NEG = -jnp.inf


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
        raise ValueError(f"unknown matching method {method!r}; expected one of {METHODS}")
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


def _prepare(cost, tag_valid, trace_valid) -> Prepared:
    B, N, M = cost.shape
    cost = cost.astype(_F32)
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


def _dual_lower_bound(cp, q):
    """LB(q) = sum_j min_i (C_ij + q_i) - sum_i q_i for q >= 0 ([B, N, M], [B, N] -> [B])."""
    q = jnp.maximum(q, 0.0)
    return jnp.sum(jnp.min(cp + q[:, :, None], axis=1), axis=1) - jnp.sum(q, axis=1)


def _prices_from_potentials(cp, g, tag_of_trace):
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
    better2 = _dual_lower_bound(cp, q2) > _dual_lower_bound(cp, q1)
    return jnp.where(better2[:, None], q2, q1)


def _finalize(cost, prep: Prepared, tag_full, q, iterations, *, exact, rtol, resolution, plan=None):
    """Common status / gap / total computation from a full injective assignment."""
    cp, forbidden, invalid_input, span, trace_valid = prep
    B, N, M = cp.shape
    tag_full = tag_full.astype(jnp.int32)
    idx = tag_full[:, None, :]
    chosen = jnp.take_along_axis(cp, idx, axis=1)[:, 0, :]
    primal = jnp.sum(chosen, axis=1)
    infeasible = jnp.any(jnp.take_along_axis(forbidden, idx, axis=1)[:, 0, :], axis=1)
    q = jnp.maximum(q.astype(_F32), 0.0)
    if exact:
        gap = jnp.zeros((B,), _F32)
        q = jnp.zeros_like(q)
        optimal = jnp.ones((B,), bool)
    else:
        gap = jnp.maximum(primal - _dual_lower_bound(cp, q), 0.0)
        magnitude = jnp.maximum(span, jnp.max(q, axis=1))
        tol = rtol * M * jnp.maximum(magnitude, jnp.finfo(jnp.float32).tiny)
        # span == 0: every assignment avoiding forbidden cells costs the same.
        optimal = (gap <= tol) | (span == 0)
        if resolution is not None:
            optimal = optimal | (gap < resolution)
    orig = jnp.take_along_axis(cost.astype(_F32), idx, axis=1)[:, 0, :]
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
        total_cost=total.astype(_F32),
        status=status.astype(jnp.int32),
        gap=gap.astype(_F32),
        iterations=iterations.astype(jnp.int32),
        tag_prices=q,
        plan=plan,
    )


def _greedy_complete(score, tag_of_trace):
    """Fills traces with tag -1 greedily: repeatedly the (free tag, open trace) pair with the
    highest score (ties -> lowest flat index).  Single problem: score [N, M], tags [M]."""
    N, M = score.shape

    def body(_, t):
        used = jnp.zeros((N + 1,), bool).at[jnp.where(t < 0, N, t)].set(True)[:N]
        s = jnp.where(~used[:, None] & (t < 0)[None, :], score, _NEG)
        k = jnp.argmax(s.ravel())
        i, j = k // M, k % M
        ok = s.ravel()[k] > _NEG
        return jnp.where(ok, t.at[j].set(i.astype(t.dtype)), t)

    return jax.lax.fori_loop(0, M, body, tag_of_trace)


# ----------------------------------------------------------------------------------------
# Solvers.  Each works on ONE dense problem cp[N, M] (finite, >= 0) and is vmapped.
# ----------------------------------------------------------------------------------------


def _hungarian_single(cp):
    """Jonker-Volgenant / Crouse shortest augmenting path (scipy's LSAP), with duals.

    Rows of the internal problem are traces (M <= N), columns are tags.  Returns the tag
    of each trace, the tag potentials v (<= 0, 0 on unused tags) and the number of
    Dijkstra steps.  Invariant: c[i, j] - u[i] - v[j] >= 0 with equality on matched pairs.
    """
    c = cp.T  # [M, N]
    M, N = c.shape
    rows = jnp.arange(M)

    def add_row(cur, st):
        u, v, col4row, row4col, iters = st

        def search_cond(s):
            return (s[6] < 0) & (s[7] < N)

        def search_body(s):
            spc, path, sr, sc, i, min_val, sink, k = s
            sr = sr.at[i].set(True)
            r = min_val + c[i] - u[i] - v
            better = ~sc & (r < spc)
            path = jnp.where(better, i, path)
            spc = jnp.where(better, r, spc)
            masked = jnp.where(sc, jnp.inf, spc)
            mv = jnp.min(masked)
            cand = masked == mv
            # Like scipy: among equally short columns prefer a free one (ends the search).
            free = cand & (row4col < 0)
            j = jnp.where(jnp.any(free), jnp.argmax(free), jnp.argmax(cand))
            sc = sc.at[j].set(True)
            is_free = row4col[j] < 0
            sink = jnp.where(is_free, j, -1)
            i = jnp.where(is_free, i, row4col[j])
            return spc, path, sr, sc, i, mv, sink, k + 1

        init = (
            jnp.full((N,), jnp.inf, c.dtype),
            jnp.full((N,), -1, jnp.int32),
            jnp.zeros((M,), bool),
            jnp.zeros((N,), bool),
            cur,
            jnp.zeros((), c.dtype),
            jnp.int32(-1),
            jnp.int32(0),
        )
        spc, path, sr, sc, _, min_val, sink, k = jax.lax.while_loop(search_cond, search_body, init)
        # Dual update (keeps reduced costs >= 0 and tight along the shortest-path tree).
        u = u.at[cur].add(min_val)
        other = sr & (rows != cur)
        u = jnp.where(other, u + min_val - spc[jnp.maximum(col4row, 0)], u)
        v = jnp.where(sc, v - (min_val - spc), v)

        # Augment along the path back from the sink (at most M flips).
        def aug_cond(s):
            return ~s[3]

        def aug_body(s):
            j, col4row, row4col, _ = s
            i = path[j]
            row4col = row4col.at[j].set(i)
            nxt = col4row[i]
            col4row = col4row.at[i].set(j)
            return nxt, col4row, row4col, (i == cur) | (sink < 0)

        _, col4row, row4col, _ = jax.lax.while_loop(
            aug_cond, aug_body, (jnp.maximum(sink, 0), col4row, row4col, sink < 0)
        )
        return u, v, col4row, row4col, iters + k

    init = (
        jnp.zeros((M,), c.dtype),
        jnp.zeros((N,), c.dtype),
        jnp.full((M,), -1, jnp.int32),
        jnp.full((N,), -1, jnp.int32),
        jnp.int32(0),
    )
    u, v, col4row, row4col, iters = jax.lax.fori_loop(0, M, add_row, init)
    return col4row, v, iters


def _auction_single(cp, span, *, resolution, theta, max_iter):
    """Asymmetric forward/reverse auction (Bertsekas & Castanon 1993) with eps scaling.

    Persons = traces (M), objects = tags (N >= M), benefit a = -C.  Each phase:
      1. forward (Jacobi) auction from the current prices until every trace holds a tag;
      2. lambda = min price of assigned tags; reverse auction iterations on unassigned
         tags priced above lambda until none is left (each either drops to lambda or
         buys a trace away from its tag).
    No dummy persons are added, so spare tags never start a price war: they only ever
    receive bids that are genuinely better than the alternatives.  The result satisfies
    eps-CS plus "unassigned prices <= lambda <= assigned prices", hence gap <= M * eps.
    Returns (tags[M], potentials g = -p [N], iterations, converged).
    """
    M, N = cp.shape[1], cp.shape[0]
    a = -cp.T  # [M, N]
    persons = jnp.arange(M)
    objects = jnp.arange(N)
    scale = jnp.where(span > 0, span, 1.0)
    # Float32 prices must still move by eps: keep eps >= ~8 ulp of the price scale.
    eps_floor = scale * 2.0**-20
    if resolution is None:
        eps_final = eps_floor
    else:
        eps_final = jnp.maximum(jnp.asarray(resolution, _F32) / (M + 1), eps_floor)
    eps0 = jnp.maximum(scale / 4.0, eps_final)

    def forward(p, eps, it):
        def cond(s):
            return jnp.any(s[1] < 0) & (s[3] < max_iter)

        def body(s):
            p, obj_of, owner, it = s
            vals = a - p[None, :]
            j1 = jnp.argmax(vals, axis=1)
            v1 = jnp.max(vals, axis=1)
            if N > 1:
                v2 = jnp.max(jnp.where(objects[None, :] == j1[:, None], _NEG, vals), axis=1)
            else:
                v2 = v1
            bid = p[j1] + (v1 - v2) + eps
            bidding = obj_of < 0
            bidmat = jnp.where(bidding[:, None] & (j1[:, None] == objects[None, :]), bid[:, None], _NEG)
            best = jnp.max(bidmat, axis=0)
            winner = jnp.argmax(bidmat, axis=0).astype(jnp.int32)
            has = best > _NEG
            lose = (obj_of >= 0) & has[jnp.maximum(obj_of, 0)]
            obj_of = jnp.where(lose, -1, obj_of)
            obj_of = obj_of.at[jnp.where(has, winner, M)].set(objects.astype(jnp.int32), mode="drop")
            owner = jnp.where(has, winner, owner)
            p = jnp.where(has, best, p)
            return p, obj_of, owner, it + 1

        init = (p, jnp.full((M,), -1, jnp.int32), jnp.full((N,), -1, jnp.int32), it)
        return jax.lax.while_loop(cond, body, init)

    def reverse(p, obj_of, owner, eps, it):
        ok = obj_of >= 0
        pi = jnp.where(ok, a[persons, jnp.maximum(obj_of, 0)] - p[jnp.maximum(obj_of, 0)], 0.0)
        lam = jnp.min(jnp.where(owner >= 0, p, jnp.inf))

        def active(p, owner):
            return (owner < 0) & (p > lam)

        def cond(s):
            return jnp.any(active(s[0], s[2])) & (s[4] < max_iter) & jnp.all(s[1] >= 0)

        def body(s):
            p, obj_of, owner, pi, it = s
            w = a - pi[:, None]  # [M, N] value of object j to person i at current profits
            i1 = jnp.argmax(w, axis=0)
            beta = jnp.max(w, axis=0)
            if M > 1:
                omega = jnp.max(jnp.where(persons[:, None] == i1[None, :], _NEG, w), axis=0)
            else:
                omega = jnp.full((N,), _NEG)
            act = active(p, owner)
            drop = act & (lam >= beta - eps)
            bid = act & ~drop
            offer = jnp.maximum(lam, omega - eps)
            profit = a[i1, objects] - offer
            offmat = jnp.where(bid[None, :] & (i1[None, :] == persons[:, None]), profit[None, :], _NEG)
            best = jnp.max(offmat, axis=1)
            jwin = jnp.argmax(offmat, axis=1).astype(jnp.int32)
            won = best > _NEG
            p = jnp.where(drop, lam, p)
            owner = owner.at[jnp.where(won, obj_of, N)].set(-1, mode="drop")
            owner = owner.at[jnp.where(won, jwin, N)].set(persons.astype(jnp.int32), mode="drop")
            p = p.at[jnp.where(won, jwin, N)].set(offer[jwin], mode="drop")
            obj_of = jnp.where(won, jwin, obj_of)
            pi = jnp.where(won, best, pi)
            return p, obj_of, owner, pi, it + 1

        p, obj_of, owner, pi, it = jax.lax.while_loop(cond, body, (p, obj_of, owner, pi, it))
        done = ~jnp.any(active(p, owner)) & jnp.all(obj_of >= 0)
        return p, obj_of, owner, it, done

    def phase_cond(s):
        return ~s[5] & (s[3] < max_iter)

    def phase_body(s):
        p, _, eps, it, _, _ = s
        p, obj_of, owner, it = forward(p, eps, it)
        p, obj_of, owner, it, done = reverse(p, obj_of, owner, eps, it)
        last = eps <= eps_final
        return p, obj_of, jnp.maximum(eps / theta, eps_final), it, done, last & done

    init = (jnp.zeros((N,), _F32), jnp.full((M,), -1, jnp.int32), eps0, jnp.int32(0), False, False)
    p, obj_of, _, it, _, converged = jax.lax.while_loop(phase_cond, phase_body, init)
    # Hit the iteration cap: finish the assignment greedily so the output stays injective;
    # the dual gap then reports how far from optimal it may be.
    obj_of = _greedy_complete(-cp, obj_of)
    return obj_of, -p, it, converged


def _sinkhorn_single(cp, span, *, n_temps, n_inner, tau_min_rel, repair_passes):
    """Annealed log-domain Sinkhorn on the balanced problem + greedy rounding + 2-opt repair.

    Tags have mass 1, traces demand 1 and (if N > M) a zero-cost dummy trace column
    demands the N - M spare units, which makes the transport problem balanced and
    exactly the LP relaxation of the rectangular assignment.
    """
    N, M = cp.shape
    extra = N > M
    C = jnp.concatenate([cp, jnp.zeros((N, 1), cp.dtype)], axis=1) if extra else cp
    log_b = jnp.zeros((C.shape[1],), _F32)
    if extra:
        log_b = log_b.at[-1].set(math.log(N - M))
    scale = jnp.where(span > 0, span, 1.0)
    total = n_temps * n_inner
    # temperature schedule: geometric from span down to tau_min_rel * span
    ratio = tau_min_rel ** (1.0 / max(n_temps - 1, 1))

    def tau_at(k):
        return scale * ratio ** (k // n_inner).astype(_F32)

    def body(k, fh):
        f, h = fh
        tau = tau_at(k)
        f = -tau * jax.nn.logsumexp((h[None, :] - C) / tau, axis=1)
        h = tau * log_b - tau * jax.nn.logsumexp((f[:, None] - C) / tau, axis=0)
        return f, h

    f, h = jax.lax.fori_loop(0, total, body, (jnp.zeros((N,), _F32), jnp.zeros((C.shape[1],), _F32)))
    tau = tau_at(jnp.int32(total - 1))
    plan = jnp.exp((f[:, None] + h[None, :] - C) / tau)[:, :M]
    # Tag potentials in the gauge where the dummy column's potential is 0 (so g <= 0
    # is the capacity-dual sign convention).
    g = f + h[-1] if extra else f
    tags = _greedy_complete(plan, jnp.full((M,), -1, jnp.int32))
    tags, passes = _two_opt(cp, tags, repair_passes)
    return tags, g, plan, jnp.int32(total) + passes


def _two_opt(cp, tags, max_passes):
    """Best-improvement local search: swap the tags of two traces, or move a trace to a
    free tag; one move per pass, until no move improves (or max_passes)."""
    N, M = cp.shape
    traces = jnp.arange(M)

    def deltas(t):
        cur = cp[t, traces]  # [M]
        ct = cp[t, :]  # [M(trace k's tag), M(trace j)] : cost of trace j on tag of trace k
        swap = ct + ct.T - cur[:, None] - cur[None, :]  # [k, j]
        swap = jnp.where(traces[:, None] == traces[None, :], jnp.inf, swap)
        used = jnp.zeros((N,), bool).at[t].set(True)
        move = jnp.where(used[:, None], jnp.inf, cp - cur[None, :])  # [N, M]
        return swap, move

    def cond(s):
        return s[2] & (s[1] < max_passes)

    def body(s):
        t, k, _ = s
        swap, move = deltas(t)
        bs, bm = jnp.min(swap), jnp.min(move)
        tol = -1e-7 * jnp.maximum(jnp.max(jnp.abs(cp)), 1e-30)
        use_swap = bs <= bm
        si = jnp.argmin(swap.ravel())
        sk, sj = si // M, si % M
        mi = jnp.argmin(move.ravel())
        mt, mj = mi // M, mi % M
        t_swap = t.at[sk].set(t[sj]).at[sj].set(t[sk])
        t_move = t.at[mj].set(mt.astype(t.dtype))
        improve = jnp.minimum(bs, bm) < tol
        t_new = jnp.where(use_swap, t_swap, t_move)
        return jnp.where(improve, t_new, t), k + 1, improve

    t, k, _ = jax.lax.while_loop(cond, body, (tags, jnp.int32(0), jnp.bool_(True)))
    return t, k


def _bellman_ford_prices(cp, tags):
    """Tag prices q >= 0 certifying a given assignment (used for optax, which has no duals).

    Constraint for optimality: C[t_j, j] + q[t_j] <= C[i, j] + q[i] for every tag i, with
    q = 0 on unused tags.  That is a shortest-path system on tags with edge
    i -> t_j of weight C[i, j] - C[t_j, j]; N rounds of Bellman-Ford from the unused tags.
    """
    N, M = cp.shape
    own = jnp.full((N,), -1, jnp.int32).at[tags].set(jnp.arange(M, dtype=jnp.int32))
    assigned = own >= 0
    j_of = jnp.maximum(own, 0)
    W = cp[:, j_of] - cp[jnp.arange(N), j_of][None, :]  # [i, k]
    W = jnp.where(assigned[None, :], W, jnp.inf)
    q0 = jnp.where(assigned, jnp.inf, 0.0) if N > M else jnp.zeros((N,), _F32)

    def body(_, q):
        return jnp.minimum(q, jnp.min(q[:, None] + W, axis=0))

    q = jax.lax.fori_loop(0, N, body, q0)
    q = jnp.where(jnp.isfinite(q), q, 0.0)
    if N == M:  # every tag used: any common shift is allowed
        q = q - jnp.min(q)
    return q


def _optax_single(cp):
    import optax  # local import: optional baseline only

    rows, cols = optax.assignment.hungarian_algorithm(cp)
    M = cp.shape[1]
    tags = jnp.zeros((M,), jnp.int32).at[cols].set(rows.astype(jnp.int32))
    return tags, _bellman_ford_prices(cp, tags)


def _bruteforce(cp):
    B, N, M = cp.shape
    # Static table of all injective maps in lexicographic order: argmin returns the first
    # minimiser, i.e. ties prefer lower tag indices for earlier traces.
    perms = np.asarray(list(itertools.permutations(range(N), M)), np.int32).reshape(-1, M)
    # Evaluate all K candidates with one matmul against a static 0/1 selection matrix
    # S[(i, j), k] = [perm_k(j) == i]: [B, N*M] @ [N*M, K].  A matmul beats a gather on
    # CPU and maps onto the MXU / tensor cores; HIGHEST precision keeps f32 sums exact
    # (TPU's default would round the costs to bf16).
    sel = np.zeros((N, M, perms.shape[0]), np.float32)
    sel[perms.T, np.arange(M)[:, None], np.arange(perms.shape[0])[None, :]] = 1.0
    vals = jnp.matmul(
        cp.reshape(B, N * M), jnp.asarray(sel.reshape(N * M, -1)), precision=jax.lax.Precision.HIGHEST
    )  # [B, K]
    best = jnp.argmin(vals, axis=1)
    return jnp.asarray(perms)[best]


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
      method: one of METHODS (static).  'auto' = bruteforce if N!/(N-M)! <=
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
    prep = _prepare(cost, tag_valid, trace_valid)
    kw = dict(rtol=rtol, resolution=resolution)
    if M == 0:
        return _finalize(cost, prep, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, N)), jnp.zeros((B,), jnp.int32),
                         exact=True, **kw)
    options = SolverOptions(resolution=resolution, auction_max_iter=auction_max_iter, auction_theta=auction_theta,
                            sinkhorn_temps=sinkhorn_temps, sinkhorn_inner=sinkhorn_inner,
                            sinkhorn_tau_min=sinkhorn_tau_min)
    solved = SOLVERS[method](prep, options)
    plan = solved.plan if return_plan and solved.plan is not None else None
    if plan is not None:
        plan = jnp.where(prep.trace_valid[:, None, :], plan, 0.0)
    return _finalize(cost, prep, solved.tag_of_trace, solved.tag_prices, solved.iterations, exact=solved.exact,
                     plan=plan, **kw)


# ----------------------------------------------------------------------------------------
# The dispatch table: a new solver is one function `(prepared problem, options) -> Solved` and one
# `register_solver` line; `match` then certifies its answer like every other solver's.
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


def _no_iterations(prep):
    return jnp.zeros((prep.cp.shape[0],), jnp.int32)


def _solve_bruteforce(prep, opt):
    B, N, _ = prep.cp.shape
    return Solved(_bruteforce(prep.cp), jnp.zeros((B, N)), _no_iterations(prep), exact=True)


def _solve_hungarian(prep, opt):
    tags, v, iters = jax.vmap(_hungarian_single)(prep.cp)
    return Solved(tags, -v, iters)


def _solve_optax(prep, opt):
    tags, q = jax.vmap(_optax_single)(prep.cp)
    return Solved(tags, q, _no_iterations(prep))


def _solve_auction(prep, opt):
    solve = lambda c, s: _auction_single(c, s, resolution=opt.resolution, theta=opt.auction_theta,
                                         max_iter=opt.auction_max_iter)
    tags, g, iters, _ = jax.vmap(solve)(prep.cp, prep.span)
    return Solved(tags, _prices_from_potentials(prep.cp, g, tags), iters)


def _solve_sinkhorn(prep, opt):
    M = prep.cp.shape[2]
    solve = lambda c, s: _sinkhorn_single(c, s, n_temps=opt.sinkhorn_temps, n_inner=opt.sinkhorn_inner,
                                          tau_min_rel=opt.sinkhorn_tau_min, repair_passes=2 * M)
    tags, g, plan, iters = jax.vmap(solve)(prep.cp, prep.span)
    return Solved(tags, _prices_from_potentials(prep.cp, g, tags), iters, plan=plan)


SOLVERS: dict[str, Callable[[Prepared, SolverOptions], Solved]] = {
    "bruteforce": _solve_bruteforce,
    "hungarian": _solve_hungarian,
    "auction": _solve_auction,
    "sinkhorn": _solve_sinkhorn,
    "optax_hungarian": _solve_optax,
}


def register_solver(name: str, solve: Callable[[Prepared, SolverOptions], Solved]) -> None:
    """Add a solver under `name` (then valid as `match(method=name)` and as `ssft.matcher`)."""
    global METHODS
    if name == "auto":
        raise ValueError("'auto' is not a solver name")
    SOLVERS[name] = solve
    METHODS = ("auto", *SOLVERS)


def unregister_solver(name: str) -> None:
    global METHODS
    SOLVERS.pop(name)
    METHODS = ("auto", *SOLVERS)


match_jit = jax.jit(
    match,
    static_argnames=(
        "method", "rtol", "resolution", "auction_max_iter", "auction_theta",
        "sinkhorn_temps", "sinkhorn_inner", "sinkhorn_tau_min", "return_plan",
    ),
)
