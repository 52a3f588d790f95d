"""The train state, in one place: the optimizer, the state dict, its shardings, and its abstract shape.

state = {params, opt_state, step, rng, consecutive_skips}: a plain pytree (NNX state split once, at model load),
the same dict for the step (`train_step`), checkpoints (`checkpoint`), restoring a run for generation
(`assembly.load_checkpoint_for_generation`) and the memory planner's compile (`memory_plan --compile`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ssft_jax.model import Params

State = dict[str, Any]
STATE_KEYS = ("params", "opt_state", "step", "rng", "consecutive_skips")


def learning_rate_schedule(optim, num_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_frac` of the steps, then cosine decay to `end_lr_frac` of the peak."""
    warmup = max(1, int(round(optim.warmup_frac * num_steps))) if optim.warmup_frac > 0 else 0
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim.learning_rate, peak_value=optim.learning_rate, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=optim.learning_rate * optim.end_lr_frac)


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    """AdamW with `learning_rate_schedule`, global-norm clipping, no weight decay on norms and biases."""
    schedule = learning_rate_schedule(optim, num_steps)

    def decay_mask(params):
        def keep(path, _):
            name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
            return not ("norm" in name or "bias" in name)
        return jax.tree_util.tree_map_with_path(keep, params)

    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                    mask=decay_mask),
    )


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Params, mesh: jax.sharding.Mesh):
    """Shardings of the optimizer state: every parameter-shaped copy (Adam's mu and nu) sharded like the parameters,
    everything else (counts) replicated. Passed as `out_shardings` to the jitted init: left to the partitioner,
    `zeros_like` outputs depend on no sharded input and come out replicated, a full copy of both moments per device.
    `params` may be arrays or sharded `jax.ShapeDtypeStruct`s.
    """
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, params), param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def init_state(params: Params, optimizer: optax.GradientTransformation, seed: int, mesh: jax.sharding.Mesh) -> State:
    """Optimizer moments sharded like the parameters (`opt_state_shardings`); everything not already on the mesh
    (counters, RNG) is replicated on it, so the step's input and output shardings match and it compiles once."""
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params)
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "consecutive_skips": jnp.zeros((), jnp.int32),
    }
    replicated = NamedSharding(mesh, P())

    def place(x):
        on_mesh = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if on_mesh else jax.device_put(x, replicated)
    return jax.tree.map(place, state)


def abstract_state(params: Params, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> State:
    """The state `init_state` would build, as sharded `jax.ShapeDtypeStruct`s (nothing allocated): what a restore
    targets and what `memory_plan --compile` lowers the step on. `params`: sharded ShapeDtypeStructs."""
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                             jax.eval_shape(optimizer.init, params), opt_state_shardings(optimizer, params, mesh))
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return {"params": params, "opt_state": opt_state, "step": scalar,
            "rng": jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated), "consecutive_skips": scalar}
