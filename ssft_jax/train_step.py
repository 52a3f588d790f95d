"""The one pure train step and the one `jax.jit` site.

state = {params, opt_state, step, rng, consecutive_skips}: a plain pytree (`train_state`).
Per micro-batch: cost matrix (no grad) -> assignment -> tags written into the train rows -> value_and_grad of the
summed token NLL. Gradients and token counts are summed over micro-batches (`lax.scan`), then divided once, so the
update equals one big batch's token-mean loss. A step whose loss or gradients are not finite leaves the weights and
optimizer state untouched and is counted.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssft_jax import faults, lora as lora_lib, losses, mesh as mesh_lib, rows as rows_lib
from ssft_jax.model import ModelConfig
from ssft_jax.step_jit import CountedJit, keep_if_finite
from ssft_jax.train_state import State


def _split_micro(tree, k: int):
    return jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), tree)


def make_train_step(model_cfg: ModelConfig, ssft, optimizer: optax.GradientTransformation, *, micro_batches: int,
                    logprob_chunk: int = 1024, inject_nonfinite: str = "",
                    cost_dims: tuple[int, int] | None = None, lora=None
                    ) -> Callable[..., tuple[State, dict]]:
    """The pure step `(state, batch, tag_table, tag_lengths) -> (state, metrics)`; jit it with `jit_train_step`.

    cost_dims: (P, W) of the cost row (`LayoutConfig.max_prompt_len`, `.pair_block_len`), needed by
    `ssft.cost_layout='prefix_cache'` (see `losses.cost_matrix`).
    inject_nonfinite: test-only faults (see `faults.parse_inject_nonfinite`); empty in real runs.
    lora: a `lora.LoraSpec`: the step becomes `(state, batch, tag_table, tag_lengths, frozen)`, state['params']
    being the adapters (the only thing differentiated and optimised) and `frozen` the base weights; the cost pass,
    matching and set loss all run on `lora.adapted_params(frozen, params)` (LoRA dropout in the set loss only)."""
    cost_layout = ssft.cost_layout
    prompt_len, block_len = cost_dims if cost_dims is not None else (None, None)
    N, M = ssft.num_tags, ssft.max_traces
    method = ssft.method
    need_costs = losses.get_method(method).needs_costs or ssft.baseline_costs
    inject = faults.make_injector(inject_nonfinite)  # None in real runs: nothing is traced
    if lora is None:
        model_params = lambda params, frozen, rng: params
    else:
        def model_params(params, frozen, rng):
            drop = jax.random.fold_in(rng, 1) if rng is not None else None  # never the matcher's own stream
            return lora_lib.adapted_params(model_cfg, lora, frozen, params, drop)

    def micro_step(params, frozen, mb, rng, tag_table, tag_lengths, step_no, micro_index):
        tag_valid, trace_valid = mb["cost"]["tag_valid"], mb["train"]["trace_valid"]
        if need_costs:
            cost = losses.cost_matrix(model_cfg, model_params(params, frozen, None), mb["cost"], N, M,
                                      logprob_chunk, layout=cost_layout,
                                      prompt_len=prompt_len, block_len=block_len)
        else:  # baselines need no cost pass: that is the step-time difference the paper's cost analysis is about
            cost = jnp.zeros(tag_valid.shape + (M,), jnp.float32)
        if inject is not None:  # C[0, 0, 0] of the step's first question (tag 0 and trace 0 are always valid)
            first = (jnp.arange(cost.size).reshape(cost.shape) == 0) & (micro_index == 0)
            cost = inject("cost", step_no, cost, at=first)
        tag_of_trace, ok, status = losses.assign(method, cost, tag_valid, trace_valid, rng, ssft.matcher)
        # [B*M, S] rows, or the packed view's [rows, S'] (data.packing): the same loss either way
        rows = rows_lib.fill_train_rows(mb["train"], tag_of_trace, tag_table, tag_lengths)

        def loss_sum(p):
            s, n = losses.set_loss_sums(model_cfg, model_params(p, frozen, rng), rows, logprob_chunk)
            return s, n

        (nll_sum, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
        gap = (losses.second_best_gap(cost, tag_of_trace, tag_valid, trace_valid, ssft.matcher)
               if losses.get_method(method).cost_optimal and ssft.second_best_gap else None)
        diag = losses.diagnostics(cost, tag_of_trace, ok, status, tag_valid, trace_valid, num_tags=N, gap=gap)
        return grads, nll_sum, count, diag

    def step_fn(state: State, batch: dict, tag_table: jax.Array, tag_lengths: jax.Array, frozen=None):
        params = state["params"]
        rng = jax.random.wrap_key_data(state["rng"])
        rng, step_rng = jax.random.split(rng)
        micro = _split_micro(batch, micro_batches)
        rngs = jax.random.split(step_rng, micro_batches)
        step_no = state["step"] + 1  # 1-based, as logged

        def body(acc, xs):
            mb, r, k = xs
            g, s, n, diag = micro_step(params, frozen, mb, r, tag_table, tag_lengths, step_no, k)
            acc = (jax.tree.map(jnp.add, acc[0], g), acc[1] + s, acc[2] + n)
            return acc, diag

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, nll_sum, count), diags = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)),
                                                      (micro, rngs, jnp.arange(micro_batches)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll_sum / denom
        if inject is not None:
            loss = inject("loss", step_no, loss)
            leaves, treedef = jax.tree.flatten(grads)
            first = jnp.arange(leaves[0].size).reshape(leaves[0].shape) == 0
            grads = jax.tree.unflatten(treedef, [inject("grad", step_no, leaves[0], at=first)] + leaves[1:])
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {
            "params": keep_if_finite(finite, new_params, params),
            "opt_state": keep_if_finite(finite, new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": jax.random.key_data(rng),
            "consecutive_skips": jnp.where(finite, 0, state["consecutive_skips"] + 1),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "loss_tokens": count,
            "step_skipped": (~finite).astype(jnp.int32),
            "tag_counts": diags["tag_counts"].sum(0),
            "matched_nll": diags["matched_nll"].mean(),
            "unmatched_nll": diags["unmatched_nll"].mean(),
            "questions_dropped": diags["questions_dropped"].sum(),
            "solver_not_certified": diags["solver_not_certified"].sum(),
            "assignments": diags["assignments"].reshape(-1, diags["assignments"].shape[-1]),
        }
        if "second_best_gap" in diags:
            metrics["second_best_gap"] = diags["second_best_gap"].mean()
            metrics["second_best_gap_min"] = diags["second_best_gap_min"].min()
        return new_state, metrics

    return step_fn


def jit_train_step(step_fn, state: State, batch_example: dict, mesh: jax.sharding.Mesh, frozen=None) -> CountedJit:
    """The one jit site: explicit in/out shardings from the live state and the batch layout; the old state is
    donated so parameters and optimizer moments are updated in place. `state` and `batch_example` may be arrays
    or sharded ShapeDtypeStructs. `frozen` (LoRA): the base weights, a fifth argument in their own shardings, read
    only (never donated, never in the state)."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_shardings = jax.tree.map(lambda x: mesh_lib.batch_sharding(mesh, x.ndim), batch_example)
    replicated = NamedSharding(mesh, P())
    in_shardings = (state_shardings, batch_shardings, replicated, replicated)
    if frozen is not None:
        in_shardings += (jax.tree.map(lambda x: x.sharding, frozen),)
    # called as step(state, batch, tag_table, tag_lengths[, frozen])
    return CountedJit(step_fn, mesh, in_shardings=in_shardings, out_shardings=(state_shardings, replicated))
