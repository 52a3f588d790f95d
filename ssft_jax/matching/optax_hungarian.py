"""optax's Hungarian solver (no duals): prices for its answer from a Bellman-Ford pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ssft_jax.matching.core import F32, Solved, no_iterations, register_solver


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
    q0 = jnp.where(assigned, jnp.inf, 0.0) if N > M else jnp.zeros((N,), F32)

    def body(_, q):
        return jnp.minimum(q, jnp.min(q[:, None] + W, axis=0))

    q = jax.lax.fori_loop(0, N, body, q0)
    q = jnp.where(jnp.isfinite(q), q, 0.0)
    if N == M:  # every tag used: any common shift is allowed
        q = q - jnp.min(q)
    return q


def _optax_single(cp):
    rows, cols = optax.assignment.hungarian_algorithm(cp)
    M = cp.shape[1]
    tags = jnp.zeros((M,), jnp.int32).at[cols].set(rows.astype(jnp.int32))
    return tags, _bellman_ford_prices(cp, tags)


def solve_optax(prep, opt):
    tags, q = jax.vmap(_optax_single)(prep.cp)
    return Solved(tags, q, no_iterations(prep))


register_solver("optax_hungarian", solve_optax)
