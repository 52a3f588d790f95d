"""Annealed log-domain Sinkhorn with greedy rounding and a 2-opt repair; its potentials give the certificate's
prices."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ssft_jax.matching.core import F32, Solved, greedy_complete, prices_from_potentials, register_solver


def _sinkhorn_single(cp, span, *, n_temps, n_inner, tau_min_rel, repair_passes):
    """Annealed log-domain Sinkhorn on the balanced problem + greedy rounding + 2-opt repair.

    Tags have mass 1, traces demand 1 and (if N > M) a zero-cost dummy trace column
    demands the N - M spare units, which makes the transport problem balanced and
    exactly the LP relaxation of the rectangular assignment.
    """
    N, M = cp.shape
    extra = N > M
    C = jnp.concatenate([cp, jnp.zeros((N, 1), cp.dtype)], axis=1) if extra else cp
    log_b = jnp.zeros((C.shape[1],), F32)
    if extra:
        log_b = log_b.at[-1].set(math.log(N - M))
    scale = jnp.where(span > 0, span, 1.0)
    total = n_temps * n_inner
    # temperature schedule: geometric from span down to tau_min_rel * span
    ratio = tau_min_rel ** (1.0 / max(n_temps - 1, 1))

    def tau_at(k):
        return scale * ratio ** (k // n_inner).astype(F32)

    def body(k, fh):
        f, h = fh
        tau = tau_at(k)
        f = -tau * jax.nn.logsumexp((h[None, :] - C) / tau, axis=1)
        h = tau * log_b - tau * jax.nn.logsumexp((f[:, None] - C) / tau, axis=0)
        return f, h

    f, h = jax.lax.fori_loop(0, total, body, (jnp.zeros((N,), F32), jnp.zeros((C.shape[1],), F32)))
    tau = tau_at(jnp.int32(total - 1))
    plan = jnp.exp((f[:, None] + h[None, :] - C) / tau)[:, :M]
    # Tag potentials in the gauge where the dummy column's potential is 0 (so g <= 0
    # is the capacity-dual sign convention).
    g = f + h[-1] if extra else f
    tags = greedy_complete(plan, jnp.full((M,), -1, jnp.int32))
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


def solve_sinkhorn(prep, opt):
    M = prep.cp.shape[2]
    solve = lambda c, s: _sinkhorn_single(c, s, n_temps=opt.sinkhorn_temps, n_inner=opt.sinkhorn_inner,
                                          tau_min_rel=opt.sinkhorn_tau_min, repair_passes=2 * M)
    tags, g, plan, iters = jax.vmap(solve)(prep.cp, prep.span)
    return Solved(tags, prices_from_potentials(prep.cp, g, tags), iters, plan=plan)


register_solver("sinkhorn", solve_sinkhorn)
