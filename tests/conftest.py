"""Test environment: 8 fake CPU devices, offline hub, persistent compilation cache; how pytest-xdist shares the
suite between its workers.

Everything before `import jax` must happen before jax is imported anywhere, so it sits at module top level.
"""
import os
import pathlib

import pytest

# Compilation over run time: the suite compiles a few hundred programs that each run a handful of steps on tiny
# models, and on 2 cores a cold run is mostly XLA:CPU compiling them. LLVM at -O1 and the loop emitters instead of the
# fusion emitters halve a train step's compile (7.0 s -> 3.7 s for configs/demo.py:tiny) and do not slow the real
# 135M model's steps (its one-step test: 31 s, 34 s before; -O0 would compile faster still but took 39 s there).
# Only what the environment does not set already (README, Tests).
TEST_XLA_FLAGS = {
    "--xla_force_host_platform_device_count": "8",
    "--xla_backend_optimization_level": "1",
    "--xla_cpu_use_fusion_emitters": "false",
}
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_given] + [f"{k}={v}" for k, v in TEST_XLA_FLAGS.items() if k not in _given]).strip()


def xla_flags_for_one_device() -> str:
    """The suite's XLA flags without the fake devices: for subprocesses that run as one CPU device, as a user's."""
    return " ".join(f for f in os.environ["XLA_FLAGS"].split()
                    if not f.startswith("--xla_force_host_platform_device_count"))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# One cache for every worker and every process a test starts (they inherit the environment): the suite compiles
# the same small steps in many places, and a second worker or a subprocess reads what the first one compiled.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "ssft_jax", "jax_compile_cache"),
)
# Cache even quick compiles: the suite re-jits the same small functions on every run.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must come after the environment above)

jax.config.update("jax_enable_x64", False)


# ---------------------------------------------------------------------------------------------------------------
# Sharing the suite between xdist workers (`make test`: -n 2 --dist loadgroup --no-loadscope-reorder)
# ---------------------------------------------------------------------------------------------------------------
# A test file is one unit of work, so its module-scoped fixtures (a trained tiny run, a converted model) are built
# once, on one worker. A test that takes minutes by itself carries its own `xdist_group` mark and becomes a unit of
# its own. Units start longest first (longest-processing-time first keeps the two workers' ends close); the order
# below is by time measured with `--durations=0` (README, Tests), everything not named follows in file order.
LONGEST_FIRST = (
    "real_demo", "test_readme_quickstart", "test_bench", "test_cli_and_configs", "test_reliability", "test_demo",
    "test_qlora",
    "test_run_logging", "test_train", "test_packing", "test_gfpo", "test_multihost", "test_model", "test_accelerator",
    "test_hf_export_serving", "test_gguf_convert", "test_teacher_agreement", "test_launch", "test_lora_train",
    "test_matching", "test_colab_notebook", "test_memory_plan", "test_bench_lora", "test_lora",
)


def _unit(item) -> str:
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        return mark.args[0] if mark.args else mark.kwargs["name"]
    return pathlib.Path(str(item.fspath)).stem


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_unit(item)))
    # A stable sort: within a unit, tests keep their file order (module fixtures are built once either way).
    items.sort(key=lambda item: rank.get(_unit(item), len(rank)))


# ---------------------------------------------------------------------------------------------------------------
# Trained runs that several test files read
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_ssft_run(tmp_path_factory):
    """configs/demo.py:tiny trained 4 steps on one device: its workdir (final checkpoint, tokenizer, summary.json,
    hf_export/) and summary. Built once per worker for the evaluation, export and GFPO tests; they only read it (a
    test that writes into a workdir copies it first)."""
    from ssft_jax import config as config_lib, train
    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.num_steps = 4
    c.checkpoint.every_steps = 1000
    c.export_hf = True
    wd = tmp_path_factory.mktemp("tiny_ssft_run")
    summary = train.run(c, wd, progress=False)
    return wd, {k: v for k, v in summary.items() if k in ("tag_counts", "losses", "final_step", "questions")}
