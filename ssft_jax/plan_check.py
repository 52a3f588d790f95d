"""The memory plan checked against XLA: the trainer's real step lowered and compiled on abstract inputs (no weights,
no data), and XLA's `memory_analysis()` read back beside the plan (`python -m ssft_jax.memory_plan --compile`; the
step-time benchmarks in bench/ read the same figures)."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ssft_jax import assembly, config as config_lib, lora as lora_lib, mesh as mesh_lib, quant, train_state


def memory_figures(compiled) -> dict[str, float] | None:
    """XLA's `memory_analysis()` of a compiled executable as a dict of bytes (per device), with peak =
    argument + output - alias + temp (and XLA's own `peak_memory_in_bytes` as peak_reported when the backend gives
    one); None if the backend reports nothing."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
           "temp": m.temp_size_in_bytes, "generated_code": m.generated_code_size_in_bytes}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    reported = getattr(m, "peak_memory_in_bytes", None)
    if reported:  # the CPU backend's figure leaves the temporaries out; kept for reference only
        out["peak_reported"] = reported
    return {k: float(v) for k, v in out.items()}


def abstract_step_inputs(config, cfg, tag_len: int, mesh):
    """(optimizer, state, batch, tag_table, tag_lengths, layout): the step's inputs as sharded
    `jax.ShapeDtypeStruct`s, built by `assembly` exactly as `train.run` builds the real ones (parameters and moments
    with their logical shardings, counters replicated, batch rows over data*fsdp). With `lora.enabled`, two more:
    the LoraSpec and the frozen base (the step's fifth argument)."""
    optimizer = assembly.make_optimizer(config, config.num_steps or 1000)
    params = assembly.abstract_params(cfg, mesh)
    spec = lora_lib.spec_for_plan(config, cfg)
    frozen = None
    if spec is not None:  # LoRA: the state holds the adapters; the frozen base (its dtype) is the fifth argument
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.dtype(spec.base_dtype), sharding=x.sharding),
                              params)
        if spec.base_quant:  # QLoRA: the projections as the quantized arrays the loader places
            frozen["layers"] = {k: quant.abstract_quantized(k, v, spec.base_quant) if k in quant.PROJECTIONS else v
                                for k, v in frozen["layers"].items()}
        params = lora_lib.abstract_trainable(cfg, spec, mesh)
    state = train_state.abstract_state(params, optimizer, mesh)
    layout = assembly.build_layout(config, tag_len, num_processes=1)
    batch = assembly.abstract_batch(layout, config.batch_size, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    tbl = jax.ShapeDtypeStruct((config.ssft.num_tags, tag_len), np.int32, sharding=replicated)
    lns = jax.ShapeDtypeStruct((config.ssft.num_tags,), np.int32, sharding=replicated)
    if spec is not None:
        return optimizer, state, batch, tbl, lns, layout, spec, frozen
    return optimizer, state, batch, tbl, lns, layout


def compile_step(config, cfg, tag_len: int, mesh, *, return_state: bool = False):
    """Lower and compile the trainer's real step (`assembly.make_step`) on abstract inputs: no weights or data are
    needed. `config.ssft.cost_layout` must be decided (`compile_for_plan` passes the plan's). Returns the compiled
    executable (and the abstract state)."""
    optimizer, state, batch, table, lengths, layout, *lora = abstract_step_inputs(config, cfg, tag_len, mesh)
    spec, frozen = lora if lora else (None, None)
    jitted = assembly.make_step(config, cfg, layout, optimizer, state, batch, mesh, lora=spec, frozen=frozen)
    compiled = jitted.lower(state, batch, table, lengths, *([frozen] if spec is not None else [])).compile()
    return (compiled, state) if return_state else compiled


def compile_for_plan(config, plan: Any):
    """Compile on the first plan.num_devices local devices (a `memory_plan.Plan`: its mesh, model and cost layout,
    "auto" as the planner decided it); a ConfigError when this host has fewer devices."""
    if plan.num_devices > jax.device_count():
        raise config_lib.ConfigError(f"--compile: the mesh needs {plan.num_devices} devices, this host has "
                                     f"{jax.device_count()} ({jax.devices()[0].platform}); fake more with XLA_FLAGS="
                                     f"--xla_force_host_platform_device_count={plan.num_devices} or shrink the "
                                     "model/mesh")
    sz = plan.sizes
    mesh = mesh_lib.make_mesh(sz["data"], sz["fsdp"], sz["tensor"], devices=jax.devices()[: plan.num_devices])
    decided = config.copy_and_resolve_references()
    decided.ssft.cost_layout = plan.dims["cost_layout"]
    return compile_step(decided, plan.cfg, plan.dims["Lt"], mesh, return_state=True)


def compile_notes(plan: Any, xla: Mapping[str, float] | None, state) -> list[str]:
    """What the compiled step says about the plan's assumptions: activations split over the data-parallel axes.
    (The optimizer moments are sharded like the parameters by construction: `train_state.opt_state_shardings`.)"""
    del state
    notes = []
    if xla and xla["temp"] > 2 * plan.temporaries:
        notes.append(f"XLA's temporaries are {xla['temp'] / plan.temporaries:.1f}x the estimate: the partitioner "
                     "probably computes some activations on more rows than this device's share (not split over "
                     "data*fsdp); look for the global batch size as a leading dimension in compiled.as_text()")
    return notes
