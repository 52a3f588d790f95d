"""What every stage's jitted step shares: the one jit site (explicit shardings, the old state donated, traces
counted) and the finite-step guard. The SSFT train step (`train_step.jit_train_step`) and GFPO's update
(`gfpo.make_update`) are both built from these."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


class CountedJit:
    """`jax.jit(step_fn)` under the mesh's abstract mesh (for `mesh.constrain_rows` inside the model), with how
    many times it was traced: with fixed shapes and shardings every trace is one compile, so `compiles` > 1 in a run
    means something recompiled it (a public seam: jax's own cache size is private)."""

    def __init__(self, step_fn: Callable, mesh: jax.sharding.Mesh, *, in_shardings, out_shardings,
                 donate_argnums: tuple[int, ...] = (0,)):
        self.compiles = 0

        def counted(*args):
            self.compiles += 1  # runs at trace time only
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return step_fn(*args)

        self._jitted = jax.jit(counted, in_shardings=in_shardings, out_shardings=out_shardings,
                               donate_argnums=donate_argnums)

    def __call__(self, *args):
        return self._jitted(*args)

    def lower(self, *args):
        return self._jitted.lower(*args)


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step was finite, else `old`, leaf by leaf: a non-finite step never touches the weights or
    the optimizer's moments."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
