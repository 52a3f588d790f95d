"""The prepared accelerator check (bench/accelerator.py) and its XLA flags (ssft_jax/xla_flags.py) cannot rot: the
script's --cpu-smoke mode runs every code path the GPU run takes (step variants, plan vs XLA memory, MFU, matching,
decode, and the per-setting child processes of --xla-flags-ab), and every flag we set is one this XLA knows (an
unknown flag aborts the process at start-up, which on the GPU machine would cost the whole run)."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import xla_flags_for_one_device

from ssft_jax import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "accelerator.py"


def _run(*args, out):
    # One CPU device (the conftest's 8 fake devices are for the mesh tests); the persistent compile cache the
    # conftest set up is inherited, so a second run of the suite compiles little.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags_for_one_device(), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_merge_keeps_the_users_value_and_adds_the_rest():
    merged = xla_flags.merge("--xla_gpu_autotune_level=0 --foo=1", xla_flags.GPU_FLAGS)
    assert "--xla_gpu_autotune_level=0" in merged and "--xla_gpu_autotune_level=4" not in merged
    assert merged.startswith("--xla_gpu_autotune_level=0 --foo=1")
    assert all(f in merged for f in xla_flags.GPU_FLAGS[:2])


def test_apply_sets_flags_only_for_a_gpu_run():
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--a=1"}
    assert xla_flags.apply(env=env, force=False) == "--a=1" and env["XLA_FLAGS"] == "--a=1"
    env = {"JAX_PLATFORMS": "cuda"}
    xla_flags.apply(env=env, force=True)
    assert env["XLA_FLAGS"].split() == list(xla_flags.GPU_FLAGS)


def test_every_flag_setting_is_known_to_this_xla():
    flags = sorted({f for s in xla_flags.SETTINGS.values() for f in s})
    ok, tail = xla_flags.probe(flags, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert ok, tail
    ok, tail = xla_flags.probe(["--xla_gpu_no_such_flag=1"], env={**os.environ, "XLA_FLAGS": "",
                                                                  "JAX_PLATFORMS": "cpu"})
    assert not ok and "Unknown flag" in tail


@pytest.mark.slow
def test_cpu_smoke_reports_every_figure(tmp_path):
    proc = _run(out=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads((tmp_path / "accelerator.json").read_text())
    md = (tmp_path / "accelerator.md").read_text()
    assert md in proc.stdout
    m = res["models"]["smoke-tiny"]
    assert set(m["variants"]) == {"sft_mixed", "ssft L=8 packed", "ssft L=8 prefix_cache"}
    for name, v in m["variants"].items():
        assert v["step_ms"] > 0 and v["tokens_per_s"] > 0 and v["plan_bytes"] > 0, name
        assert v["xla"]["peak"] > 0 and v["floor"] >= 1.0, name
        assert re.search(rf"^\| smoke-tiny \| {re.escape(name)} \| .* \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", md, re.M)
    assert m["variants"]["ssft L=8 packed"]["floor"] > 1.0  # the cost pass costs FLOPs; sft_mixed has none
    assert 0 < m["matching"]["share"] < 1 and m["matching"]["solver"]
    assert m["decode"]["decode_tokens_per_s"] > 0 and m["decode"]["rows"] == 2 * 6
    assert res["device"]["matmul_bf16_flops_per_s"] > 0 and res["versions"]["jax"]
    assert "MaxText" in md


@pytest.mark.slow
def test_cpu_smoke_xla_flags_ab_runs_a_process_per_setting(tmp_path):
    proc = _run("--xla-flags-ab", "--ab-settings", "xla_default,ours", out=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads((tmp_path / "xla_flags_ab.json").read_text())
    assert set(res["median_ms"]) == {"xla_default", "ours"}
    for setting, variants in res["median_ms"].items():
        assert set(variants) == {"sft_mixed", "ssft L=8 packed"} and min(variants.values()) > 0, setting
    assert re.search(r"^\| ours \| .* \| ssft L=8 packed \| [\d.]+ \| [\d.]+ \|$", proc.stdout, re.M)
