"""The SSFT set loss and its baselines, as pure functions the train step composes.

    cost view --(no-grad forward)--> C[B, N, M] --(assign)--> tag_of_trace[B, M] --(fill_tags)--> train rows
    train rows --(forward + chunked log-probs)--> token cross-entropy on the M matched sequences

Methods (one config switch, same data, same step; the table `METHODS`, extended with `register_method`):
  ssft       optimal one-to-one assignment minimising the summed cost (in-graph solver, `matching.match`)
  random     a uniformly random one-to-one assignment per question per step
  sft_mixed  every trace under one shared tag (tag 0): the paper's SFT-mixed baseline
  fixed      trace j always gets tag j

Normalisation: the loss is the sum of token NLL over every trace token (and end-of-turn token) of the matched
sequences in the global batch, divided by the number of those tokens: token-level SFT on the same traces, so the
methods differ only in which tag conditions each trace.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ssft_jax import cost_layouts, matching, rows as rows_lib
from ssft_jax.logprobs import token_logprobs
from ssft_jax.model import ModelConfig, Params, forward, output_embedding


def cost_matrix(cfg: ModelConfig, params: Params, cost_view: dict, num_tags: int, num_traces: int,
                chunk_size: int = 1024, *, layout: str = "packed", prompt_len: int | None = None,
                block_len: int | None = None) -> jax.Array:
    """C[b, i, j] = mean NLL of the first L tokens of trace j given (prompt, tag i), with no gradient.

    `layout` names how the pass runs (`cost_layouts`: "packed", the row in one forward, or "prefix_cache", the
    prompt once into a KV cache, which needs `prompt_len` = P and `block_len` = W = Lt + Le); the same C up to
    float rounding."""
    params = jax.lax.stop_gradient(params)
    nll = cost_layouts.get(layout).token_nll(cfg, params, cost_view, num_pairs=num_tags * num_traces,
                                             prompt_len=prompt_len, block_len=block_len, chunk_size=chunk_size)
    return jax.lax.stop_gradient(rows_lib.cost_matrix_from_token_nll(nll, cost_view, num_tags, num_traces))


# ---------------------------------------------------------------------------------------------------------------
# Methods: how each question's traces get their tags. A new method is one function and one `register_method` line.
# ---------------------------------------------------------------------------------------------------------------

# (cost [B, N, M], tag_valid [B, N], trace_valid [B, M], rng, matcher) ->
#     (tag_of_trace [B, M] with -1 for dropped traces, question_ok [B] bool, solver_status [B] int32)
AssignFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, str], tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Method:
    """needs_costs: the step runs the no-grad cost pass for it (other methods skip it unless
    `ssft.baseline_costs`, and then see zeros); distinct_tags: every trace of a question gets its own tag, so M <= N
    (False for a shared tag); cost_optimal: the assignment minimises the summed cost, so the step can report how far
    the second-best assignment was (`ssft.second_best_gap`)."""

    assign: AssignFn
    needs_costs: bool
    distinct_tags: bool = True
    cost_optimal: bool = False


METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> None:
    METHODS[name] = method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def optimal_assignment(cost, tag_valid, trace_valid, rng, matcher):
    """SSFT: the one-to-one assignment of least summed cost (`matching.match`, in-graph, certified)."""
    del rng
    res = matching.match(cost, tag_valid, trace_valid, method=matcher, return_plan=False)
    ok = res.status != matching.STATUS_INVALID
    return jnp.where(ok[:, None], res.tag_of_trace, -1), ok, res.status


def cost_blind(tags_fn: Callable[..., jax.Array]) -> AssignFn:
    """An AssignFn from `tags_fn(cost, tag_valid, trace_valid, rng) -> [B, M] tags` that ignores the costs' values.
    A question whose costs are not finite is still dropped: it would mean the model already produces NaNs on it,
    and every method must train on the same questions."""
    def assign_fn(cost, tag_valid, trace_valid, rng, matcher):
        del matcher
        finite = jnp.all(jnp.where(tag_valid[:, :, None] & trace_valid[:, None, :], jnp.isfinite(cost), True),
                         axis=(1, 2))
        tags = jnp.where(trace_valid & finite[:, None], tags_fn(cost, tag_valid, trace_valid, rng), -1)
        status = jnp.where(finite, matching.STATUS_OPTIMAL, matching.STATUS_INVALID).astype(jnp.int32)
        return tags, finite, status
    return assign_fn


def _random_tags(cost, tag_valid, trace_valid, rng):
    """A uniformly random one-to-one assignment per question (invalid tags never drawn)."""
    B, N = tag_valid.shape
    keys = jnp.where(tag_valid, jax.random.uniform(rng, (B, N)), 2.0)  # invalid tags sort last
    return jnp.argsort(keys, axis=1)[:, : cost.shape[2]].astype(jnp.int32)


def _shared_tag(cost, tag_valid, trace_valid, rng):
    return jnp.zeros(trace_valid.shape, jnp.int32)


def _fixed_tags(cost, tag_valid, trace_valid, rng):
    return jnp.broadcast_to(jnp.arange(trace_valid.shape[1], dtype=jnp.int32), trace_valid.shape)


register_method("ssft", Method(optimal_assignment, needs_costs=True, cost_optimal=True))
register_method("random", Method(cost_blind(_random_tags), needs_costs=False))
register_method("sft_mixed", Method(cost_blind(_shared_tag), needs_costs=False, distinct_tags=False))
register_method("fixed", Method(cost_blind(_fixed_tags), needs_costs=False))


def assign(method: str, cost: jax.Array, tag_valid: jax.Array, trace_valid: jax.Array, rng: jax.Array,
           matcher: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tag_of_trace [B, M] with -1 for dropped traces, question_ok [B] bool, solver_status [B] int32)."""
    return get_method(method).assign(cost, tag_valid, trace_valid, rng, matcher)


def set_loss_sums(cfg: ModelConfig, params: Params, rows: dict, chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """(sum of token NLL, number of loss tokens) over filled train rows [R, S]."""
    hidden = forward(cfg, params, rows["tokens"], rows["segment_ids"], rows["positions"], return_hidden=True)
    logp = token_logprobs(hidden, output_embedding(cfg, params), rows["targets"], chunk_size=chunk_size)
    mask = rows["loss_mask"].astype(jnp.float32)
    return -(logp * mask).sum(), mask.sum()


def second_best_gap(cost: jax.Array, tag_of_trace: jax.Array, tag_valid, trace_valid, matcher: str) -> jax.Array:
    """Exact cost gap between the best and the second-best assignment, per question ([B], +inf if unique).

    The second-best assignment differs from the best in at least one trace j, so it is optimal for the problem
    with the pair (best tag of j, j) forbidden; the minimum over j of those M re-solves is exactly its cost.
    """
    B, N, M = cost.shape
    best = jnp.sum(
        jnp.where(tag_of_trace >= 0, jnp.take_along_axis(cost, jnp.maximum(tag_of_trace, 0)[:, None, :], 1)[:, 0], 0.0),
        -1,
    )

    def forbid(j):
        hit = (jnp.arange(N)[None, :, None] == tag_of_trace[:, None, :]) & (jnp.arange(M)[None, None, :] == j)
        res = matching.match(jnp.where(hit, jnp.inf, cost), tag_valid, trace_valid, method=matcher, return_plan=False)
        valid_j = trace_valid[:, j] & (tag_of_trace[:, j] >= 0)
        return jnp.where(valid_j & (res.status != matching.STATUS_INVALID), res.total_cost, jnp.inf)

    alternatives = jax.vmap(forbid)(jnp.arange(M))  # [M, B]
    return jnp.min(alternatives, axis=0) - best


def diagnostics(cost, tag_of_trace, question_ok, status, tag_valid, trace_valid, *, num_tags: int,
                gap: jax.Array | None = None) -> dict[str, Any]:
    """Cheap on-device matching statistics for one step (summed over the batch where counts)."""
    onehot = (tag_of_trace[:, :, None] == jnp.arange(num_tags)[None, None, :])  # [B, M, N]
    matched = jnp.swapaxes(onehot, 1, 2) & question_ok[:, None, None]  # [B, N, M]
    pair_valid = tag_valid[:, :, None] & trace_valid[:, None, :] & question_ok[:, None, None]
    unmatched = pair_valid & ~matched
    finite_cost = jnp.where(pair_valid, cost, 0.0)
    out = {
        "tag_counts": onehot.sum(axis=(0, 1)).astype(jnp.int32),  # [N]
        "matched_nll": (finite_cost * matched).sum() / jnp.maximum(matched.sum(), 1),
        "unmatched_nll": (finite_cost * unmatched).sum() / jnp.maximum(unmatched.sum(), 1),
        "questions_dropped": jnp.sum(~question_ok & jnp.any(trace_valid, -1)).astype(jnp.int32),
        "solver_not_certified": jnp.sum(status == matching.STATUS_APPROXIMATE).astype(jnp.int32),
        "assignments": tag_of_trace,  # [B, M]; the host turns these into the pattern histogram
    }
    if gap is not None:
        finite_gap = jnp.isfinite(gap) & question_ok
        out["second_best_gap"] = jnp.where(finite_gap, gap, 0.0).sum() / jnp.maximum(finite_gap.sum(), 1)
        out["second_best_gap_min"] = jnp.min(jnp.where(finite_gap, gap, jnp.inf))
    return out
