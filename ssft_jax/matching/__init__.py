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

import jax

# Solver modules register themselves on import, in this order (solver_names(): auto first).
from ssft_jax.matching import auction, bruteforce, hungarian, optax_hungarian, sinkhorn  # noqa: F401
from ssft_jax.matching.core import (
                                    BRUTEFORCE_MAX_CANDIDATES,
                                    DEFAULT_METHOD,
                                    SOLVERS,
                                    STATUS_APPROXIMATE,
                                    STATUS_INVALID,
                                    STATUS_OPTIMAL,
                                    MatchResult,
                                    Prepared,
                                    Solved,
                                    SolverOptions,
                                    assignment_to_onehot,
                                    match,
                                    num_candidates,
                                    register_solver,
                                    resolve_method,
                                    solver_names,
                                    unregister_solver,
)

match_jit = jax.jit(
    match,
    static_argnames=(
        "method", "rtol", "resolution", "auction_max_iter", "auction_theta",
        "sinkhorn_temps", "sinkhorn_inner", "sinkhorn_tau_min", "return_plan",
    ),
)

__all__ = [
    "BRUTEFORCE_MAX_CANDIDATES", "DEFAULT_METHOD", "SOLVERS", "STATUS_APPROXIMATE", "STATUS_INVALID", "STATUS_OPTIMAL",
    "MatchResult", "Prepared", "Solved", "SolverOptions", "assignment_to_onehot", "match", "match_jit",
    "num_candidates", "register_solver", "resolve_method", "solver_names", "unregister_solver",
]
