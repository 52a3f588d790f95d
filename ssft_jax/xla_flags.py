"""The XLA GPU flags this workload runs with: the one place they are chosen, and how they get set.

XLA reads `XLA_FLAGS` once, when the backend starts (the first `jax.devices()` or computation; importing jax does
not start it), so the flags must be in the environment before that: `apply()` before anything touches a device, or
`export XLA_FLAGS="$(python -m ssft_jax.xla_flags)"` in a shell. An unknown flag or value makes XLA abort the
process at start-up (`parse_flags_from_env.cc: Unknown flag in XLA_FLAGS`), so `probe()` tries a set in a child
process first and `usable()` drops what that XLA does not know. On CPU and TPU these flags do nothing (they are
`xla_gpu_*`) and `apply()` leaves the environment alone unless asked.

The flags, and why (bench/accelerator.py --xla-flags-ab times the step with each setting in `SETTINGS`, one
process per setting since the flags cannot change inside a process; no GPU run has measured them yet):
  --xla_gpu_enable_latency_hiding_scheduler=true  schedule async work (copies, and collectives on >1 GPU) to
        overlap compute instead of in program order; the FSDP all-gathers of a multi-GPU run are what it is for.
  --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
        capture runs of kernels as CUDA graphs, loop and branch bodies included: the layer `lax.scan` of the
        step and the decode `while_loop` launch hundreds of small kernels per iteration, whose launch cost a
        graph replay removes (which types XLA's default set holds changes between versions: named here, it is fixed).
  --xla_gpu_autotune_level=4  XLA's default, written down so that a run's setting is explicit: level 4 autotunes
        every GEMM/fusion config at compile time (and checks the results); 0 skips it (faster compiles, slower
        steps).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Mapping, Sequence

GPU_FLAGS: tuple[str, ...] = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
    "--xla_gpu_autotune_level=4",
)

# The settings bench/accelerator.py --xla-flags-ab compares (each in a process of its own).
SETTINGS: dict[str, tuple[str, ...]] = {
    "xla_default": (),
    "ours": GPU_FLAGS,
    "no_command_buffers": ("--xla_gpu_enable_command_buffer=",),
    "autotune_0": (*GPU_FLAGS[:2], "--xla_gpu_autotune_level=0"),
}


def gpu_present() -> bool:
    """An NVIDIA GPU on this machine (the flags are only for XLA:GPU; TPU's runtime may refuse unknown ones)."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def merge(existing: str, flags: Sequence[str]) -> str:
    """`existing` XLA_FLAGS with `flags` added; a flag already set in `existing` keeps the user's value."""
    have = {_flag_name(f) for f in existing.split()}
    return " ".join([*existing.split(), *(f for f in flags if _flag_name(f) not in have)]).strip()


def apply(flags: Sequence[str] = GPU_FLAGS, *, env: "os._Environ | dict" = os.environ, force: bool = False) -> str:
    """Put `flags` into env["XLA_FLAGS"] (user-set flags win) and return the new value. Only when the run will be
    on a GPU (JAX_PLATFORMS empty or naming cuda/gpu), unless force. Call before jax starts its backend; calling it
    afterwards changes nothing in this process (the child processes it starts do see it)."""
    platforms = env.get("JAX_PLATFORMS", "")
    if not force and platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return env.get("XLA_FLAGS", "")
    if env is os.environ and not force and "jax" in sys.modules:
        # A backend already up would leave the flags silently unused. jax has no public "is a backend up?", so this
        # reads a private table; should a jax version move it, the check is skipped (never an ImportError here).
        try:
            import jax._src.xla_bridge as xb
            started = bool(getattr(xb, "_backends", None))
        except ImportError:
            started = False
        if started:
            raise RuntimeError("xla_flags.apply() after the JAX backend started: XLA_FLAGS is read once at start-up")
    env["XLA_FLAGS"] = merge(env.get("XLA_FLAGS", ""), flags)
    return env["XLA_FLAGS"]


def probe(flags: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120.0) -> tuple[bool, str]:
    """Does an XLA backend start with these flags? (ok, the tail of its output) from a child process (an unknown
    flag aborts the process that reads it, so this one must not)."""
    child = dict(os.environ if env is None else env)
    child["XLA_FLAGS"] = merge(child.get("XLA_FLAGS", ""), flags)
    try:
        p = subprocess.run([sys.executable, "-c", "import jax; jax.devices(); print('ok')"], env=child,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f}s"
    out = (p.stdout + p.stderr).strip().splitlines()
    return p.returncode == 0 and out[-1:] == ["ok"], "\n".join(out[-3:])


def usable(flags: Sequence[str] = GPU_FLAGS, *, env: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(kept, dropped): the whole set in one probe; only when that fails, each flag alone."""
    if probe(flags, env=env)[0]:
        return list(flags), []
    kept, dropped = [], []
    for f in flags:
        (kept if probe([f], env=env)[0] else dropped).append(f)
    return kept, dropped


if __name__ == "__main__":  # `export XLA_FLAGS="$(python -m ssft_jax.xla_flags)"`
    print(merge(os.environ.get("XLA_FLAGS", ""), GPU_FLAGS))
