"""Devices, the mesh, and the one place where logical axis names meet mesh axes.

The model names every parameter dimension with a *logical* axis ('vocab', 'embed', 'heads', ...). This module
alone decides which physical mesh axis ('data', 'fsdp', 'tensor') each logical name is split over, so changing
a parallelism strategy is an edit to `LOGICAL_AXIS_RULES`, never to the model.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None for replicated).
# Batch rows are split over both data-parallel axes: FSDP is data parallelism with sharded weights.
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    # LoRA (ssft_jax/lora.py): the adapters' rank and the trained tag-token rows are small, kept whole.
    "lora_rank": None,
    "tag_rows": None,
}


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize` when launched on several hosts (a no-op on one).

    Cloud TPU pods and SLURM/MPI launchers are auto-detected by JAX; on a single host there is nothing to do, and
    calling initialize there would wait for a coordinator that never comes.
    """
    import os

    multi_host_markers = (
        "JAX_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
        "SLURM_NTASKS",
        "MEGASCALE_COORDINATOR_ADDRESS",
    )
    if any(os.environ.get(k) for k in multi_host_markers) and not jax.distributed.is_initialized():
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
        if "TPU_WORKER_HOSTNAMES" in os.environ and "," not in hosts and not os.environ.get("JAX_COORDINATOR_ADDRESS"):
            return  # a single-host TPU VM also sets TPU_WORKER_HOSTNAMES
        jax.distributed.initialize()


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh('data', 'fsdp', 'tensor') with GSPMD-style (Auto) axes. One axis may be -1: it takes what is left.

    Raises a ValueError naming the axis sizes when they do not multiply to the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or known == 0:
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh: {len(devices)} devices are not divisible by the fixed axes (product {known}) "
                f"of data={data} fsdp={fsdp} tensor={tensor}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} "
            f"does not match the {len(devices)} available devices"
        )
    device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, Any] = LOGICAL_AXIS_RULES,
) -> P:
    """PartitionSpec for one array from its logical axis names.

    With `shape` and `mesh`, a dimension that the mesh axes would not divide evenly is replicated instead (e.g. 2
    KV heads over tensor=4): correct, a little more memory, and logged once so it is never a silent surprise.
    A mesh axis is used at most once per array (the first logical dim that claims it wins).
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if axes and shape is not None and mesh is not None:
            split = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % split:
                logging.info("replicating dim %d (%s, size %d): not divisible by mesh axes %s (%d)",
                             dim, name, shape[dim], axes, split)
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def tree_shardings(logical_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays, given a matching pytree of logical-axis tuples."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    return jax.tree.map(
        lambda axes, arr: NamedSharding(mesh, logical_to_spec(axes, arr.shape, mesh)),
        logical_tree,
        shapes_tree,
        is_leaf=is_axes,
    )


def constrain_rows(x: jax.Array) -> jax.Array:
    """Split an activation's leading (row) dimension like the logical 'batch' axis, over the mesh in context, if any.

    Parameters are FSDP-sharded over 'fsdp' on their 'embed' dimension and batch rows over ('data', 'fsdp'); left
    alone, the partitioner may instead all-gather the rows and compute every activation for the global batch on each
    device (seen in the compiled 7B step: [16, 8192, 4864] MLP intermediates on every chip). Pinning the rows keeps
    each device on its own share. The mesh comes from `jax.sharding.use_abstract_mesh`, which `jit_train_step` sets
    while tracing; outside it (eval, sampling, tests on one device) this is a no-op.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rows = LOGICAL_AXIS_RULES["batch"]
    axes = tuple(a for a in ((rows,) if isinstance(rows, str) else rows) if a in mesh.axis_names and mesh.shape[a] > 1)
    split = math.prod(mesh.shape[a] for a in axes)
    if not axes or x.shape[0] % split:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows split over the data-parallel axes, everything else replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """Per-process numpy batch -> global jax arrays, rows split over the data-parallel axes (`batch_sharding`)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)), batch)


# ---------------------------------------------------------------------------------------------------------------
# Host arrays that every process holds whole (GFPO's prompts, rollouts and rewards) <-> global arrays
# ---------------------------------------------------------------------------------------------------------------

def rows_on_mesh(x: Any, mesh: Mesh | None) -> jax.Array:
    """A host array every process holds whole -> a global array, rows split over the data-parallel axes
    (`batch_sharding`; replicated when they do not divide the rows). Each process copies only the slices its own
    devices hold (`make_array_from_callback`), so this is the same call on one host or many. mesh None: an array on
    the default device (callers without a mesh)."""
    x = np.asarray(x)
    if mesh is None:
        return jax.numpy.asarray(x)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    sharding = batch_sharding(mesh, x.ndim) if x.ndim and x.shape[0] % dp == 0 else NamedSharding(mesh, P())
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicated_on_mesh(x: Any, mesh: Mesh | None) -> jax.Array:
    """A host array every process holds whole -> a global array replicated on every device of `mesh` (mesh None:
    an array on the default device)."""
    x = np.asarray(x)
    if mesh is None:
        return jax.numpy.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda index: x[index])


def fetch(x: jax.Array) -> np.ndarray:
    """The whole value of a global array, on every process (an all-gather across hosts when this process's
    devices do not hold all of it; a plain copy otherwise)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
