"""Exact: Jonker-Volgenant / Crouse shortest augmenting paths (scipy's linear_sum_assignment), with the duals that
certify it."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssft_jax.matching.core import Solved, register_solver


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


def solve_hungarian(prep, opt):
    tags, v, iters = jax.vmap(_hungarian_single)(prep.cp)
    return Solved(tags, -v, iters)


register_solver("hungarian", solve_hungarian)
