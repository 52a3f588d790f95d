"""Forward + reverse auction with epsilon scaling (Bertsekas & Castanon): prices certify it within M * eps."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ssft_jax.matching.core import F32, NEG, Solved, greedy_complete, prices_from_potentials, register_solver


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
        eps_final = jnp.maximum(jnp.asarray(resolution, F32) / (M + 1), eps_floor)
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
                v2 = jnp.max(jnp.where(objects[None, :] == j1[:, None], NEG, vals), axis=1)
            else:
                v2 = v1
            bid = p[j1] + (v1 - v2) + eps
            bidding = obj_of < 0
            bidmat = jnp.where(bidding[:, None] & (j1[:, None] == objects[None, :]), bid[:, None], NEG)
            best = jnp.max(bidmat, axis=0)
            winner = jnp.argmax(bidmat, axis=0).astype(jnp.int32)
            has = best > NEG
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
                omega = jnp.max(jnp.where(persons[:, None] == i1[None, :], NEG, w), axis=0)
            else:
                omega = jnp.full((N,), NEG)
            act = active(p, owner)
            drop = act & (lam >= beta - eps)
            bid = act & ~drop
            offer = jnp.maximum(lam, omega - eps)
            profit = a[i1, objects] - offer
            offmat = jnp.where(bid[None, :] & (i1[None, :] == persons[:, None]), profit[None, :], NEG)
            best = jnp.max(offmat, axis=1)
            jwin = jnp.argmax(offmat, axis=1).astype(jnp.int32)
            won = best > NEG
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

    init = (jnp.zeros((N,), F32), jnp.full((M,), -1, jnp.int32), eps0, jnp.int32(0), False, False)
    p, obj_of, _, it, _, converged = jax.lax.while_loop(phase_cond, phase_body, init)
    # Hit the iteration cap: finish the assignment greedily so the output stays injective;
    # the dual gap then reports how far from optimal it may be.
    obj_of = greedy_complete(-cp, obj_of)
    return obj_of, -p, it, converged


def solve_auction(prep, opt):
    solve = lambda c, s: _auction_single(c, s, resolution=opt.resolution, theta=opt.auction_theta,
                                         max_iter=opt.auction_max_iter)
    tags, g, iters, _ = jax.vmap(solve)(prep.cp, prep.span)
    return Solved(tags, prices_from_potentials(prep.cp, g, tags), iters)


register_solver("auction", solve_auction)
