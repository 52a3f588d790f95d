"""One process of a localhost multi-process (multi-"host") CPU run of the trainer or of GFPO; `tests/test_multihost.py`
starts it.

    python tests/multihost_worker.py --workdir DIR --out result.json --devices 2 \
        [--coordinator localhost:PORT --num_processes 2 --process_id I] [--num_steps 3] [--stop_after K] \
        [--set key=value ...]

With --num_processes > 1 it calls `jax.distributed.initialize(coordinator, num_processes, process_id)` itself
(CPU cross-process collectives: gloo) before `ssft_jax.train.run`, and sets JAX_COORDINATOR_ADDRESS so that
`ssft_jax.mesh.maybe_initialize_distributed` sees a multi-host marker and must rely on
`jax.distributed.is_initialized()` to stay a no-op (a second initialize would raise).

The tiny demo config runs with method 'fixed' (deterministic assignment) on a data-parallel mesh over all devices
of all processes. Writes a JSON file with this process's view: process index/count, device counts, the losses, the
question indices of every local batch it fed the trainer, a fingerprint of the final weights.

--stage gfpo --init_from SSFT_WORKDIR runs `ssft_jax.gfpo` with the tiny GFPO demo config on the same kind of mesh
and writes the per-step rewards and an exact digest (sha256 of every weight's bytes) of the final weights.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="JSON file this process writes its results to")
    p.add_argument("--devices", type=int, default=2, help="fake CPU devices in this process")
    p.add_argument("--coordinator", default="", help="host:port of process 0 (multi-process only)")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_steps", type=int, default=3)
    p.add_argument("--stop_after", type=int, default=None)
    p.add_argument("--stage", choices=("ssft", "gfpo"), default="ssft")
    p.add_argument("--init_from", default="", help="the SSFT workdir GFPO starts from (--stage gfpo)")
    p.add_argument("--reward", choices=("checker", "text_parity"), default="checker",
                   help="GFPO's reward: the dataset's checker, or len(text) %% 2 (a reward that differs between "
                        "rollouts of an untrained model, so every step has a learning signal)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides (values parsed as Python literals when possible)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Environment first: nothing may import jax before this.
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    multi = args.num_processes > 1
    if multi:
        os.environ["JAX_COORDINATOR_ADDRESS"] = args.coordinator  # a marker maybe_initialize_distributed reacts to

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)

    import importlib.util
    import json

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in 0.10.2; explicit on purpose
    if multi:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=120)
        assert jax.distributed.is_initialized()

    from ssft_jax import mesh as mesh_lib, train

    if multi:
        mesh_lib.maybe_initialize_distributed()  # must be a no-op now (initialize twice would raise)
    if args.stage == "gfpo":
        out = run_gfpo(args, root)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        if multi:
            jax.distributed.shutdown()
        return

    spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(root, "configs", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.ssft.method = "fixed"
    c.mesh.update(data=-1, fsdp=1, tensor=1, num_devices=0)
    c.num_steps = args.num_steps
    c.export_hf = False
    c.checkpoint.async_save = False
    apply_sets(c, args.set)

    # Record which questions each local batch holds as the trainer turns it into global arrays (its own shard).
    local_batches: list[list[int]] = []
    to_global = mesh_lib.to_global

    def recording_to_global(batch, mesh):
        local_batches.append([int(i) for i in batch["question_index"]])
        return to_global(batch, mesh)

    mesh_lib.to_global = recording_to_global
    result = train.run(c, args.workdir, progress=False, stop_after=args.stop_after)
    params = result["state"]["params"]
    q = params["layers"]["q_proj"]
    out = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "distributed_initialized": jax.distributed.is_initialized(),
        "start_step": result["start_step"],
        "final_step": result["final_step"],
        "stopped_early": result["stopped_early"],
        "losses": {str(k): v for k, v in result["losses"].items()},
        "q_proj_devices": len(q.sharding.device_set),
        # a cheap fingerprint of the final weights (identical in every process: it is a global reduction)
        "param_sum": float(jax.jit(lambda t: sum(jax.numpy.sum(x.astype("float32") ** 2)
                                                 for x in jax.tree.leaves(t)))(params)),
        "local_batches": local_batches,  # question indices per to_global call (the shape probe, then each step)
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    if multi:
        jax.distributed.shutdown()


def apply_sets(c, sets):
    import ast
    for item in sets:
        key, _, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value


def run_gfpo(args, root) -> dict:
    import hashlib

    import jax
    import numpy as np

    from ssft_jax import config as config_lib, gfpo, mesh as mesh_lib

    c = config_lib.load_config(os.path.join(root, "configs", "gfpo_demo.py"), "tiny")
    c.mesh.update(data=-1, fsdp=1, tensor=1, num_devices=0)
    c.gfpo.update(init_from=args.init_from, num_steps=args.num_steps)
    c.checkpoint.update(async_save=False, every_steps=1)
    c.export_hf = False
    apply_sets(c, args.set)
    reward_fn = (lambda record, text, result: float(len(text) % 2)) if args.reward == "text_parity" else None
    result = gfpo.run(c, args.workdir, progress=False, stop_after=args.stop_after, reward_fn=reward_fn)
    digest = hashlib.sha256()
    leaves = [np.ascontiguousarray(mesh_lib.fetch(x)) for x in jax.tree.leaves(result["state"]["params"])]
    for leaf in leaves:
        digest.update(leaf.tobytes())
    if jax.process_index() == 0:
        np.savez(args.out + ".params.npz", *leaves)
    return {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "global_devices": jax.device_count(), "start_step": result["start_step"],
        "final_step": result["final_step"], "stopped_early": result["stopped_early"],
        "rewards": {str(k): v for k, v in result["rewards"].items()}, "rollout_tokens": result["rollout_tokens"],
        "rollout_seconds": result["rollout_seconds"], "update_seconds": result["update_seconds"],
        "params_sha256": digest.hexdigest(),
    }


if __name__ == "__main__":
    main()
