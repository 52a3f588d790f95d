"""configs/*.py, the `python -m ssft_jax.train` CLI, and SIGTERM (preemption) handling."""
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ssft_jax import config as config_lib
from ssft_jax import faults

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name, arg=""):
    return config_lib.load_config(name, arg)


@pytest.mark.parametrize("name,devices", [("demo", 1), ("smollm2_gsm8k", 1), ("qwen2p5_0p5b", 4),
                                          ("qwen2p5_7b", 16), ("qwen2p5_32b", 32)])
def test_configs_validate_on_their_slice(name, devices):
    c = load(name, "hf_dir=/ckpt,data=/d.jsonl" if name.startswith("qwen") else "")
    config_lib.validate(c, devices)
    if name.startswith("qwen"):
        s, o = c.ssft, c.optim
        assert (s.num_tags, s.max_traces, s.cost_prefix_len) == (6, 4, 1000)
        assert (o.learning_rate, o.warmup_frac, o.weight_decay, o.b1, o.b2) == (1e-5, 0.05, 1e-4, 0.9, 0.95)
        assert (c.num_epochs, c.batch_size, c.model.dtype) == (5, 16, "bfloat16")
        assert c.data.max_prompt_len + 6 + c.data.max_trace_len <= 32768
        assert c.data.max_prompt_len + 24 * (6 + 1000) <= 32768  # the packed cost row fits one sequence too
        assert c.model.hf_dir == "/ckpt" and c.data.path == "/d.jsonl"


def test_config_arg_errors_name_the_key():
    with pytest.raises(config_lib.ConfigError, match="hf_dirr"):
        load("qwen2p5_7b", "hf_dirr=/x")


@pytest.mark.parametrize("name", ["demo", "smollm2_gsm8k"])
def test_config_variants_are_parsed_strictly(name):
    assert load(name, "tiny").num_steps < load(name, "").num_steps
    with pytest.raises(config_lib.ConfigError, match=r"'tinyy'.*accepts \['tiny'\]"):
        load(name, "tinyy")
    with pytest.raises(config_lib.ConfigError, match="'tiny'"):
        load(name, "tiny,tiny")  # one variant at most


def test_every_config_and_sweep_file_refuses_an_unknown_argument():
    paths = sorted((ROOT / "configs").glob("*.py"))
    for path in paths:
        with pytest.raises(config_lib.ConfigError, match="'bogus_arg'"):
            load(path.stem, "bogus_arg")
    sweeps = sorted((ROOT / "configs" / "sweeps").glob("*.py"))
    for path in sweeps:
        spec = importlib.util.spec_from_file_location(f"_sweep_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.get_hyper("")  # the default arg works
        with pytest.raises(config_lib.ConfigError, match="'bogus_arg'"):
            mod.get_hyper("bogus_arg")
    assert len(paths) >= 5 and sweeps  # the globs found the files


def _cli(workdir, *overrides, env=None, **popen):
    cmd = [sys.executable, "-m", "ssft_jax.train", f"--config={ROOT / 'configs' / 'demo.py'}:tiny",
           f"--workdir={workdir}", "--config.mesh.num_devices=1", "--config.mesh.data=1", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)


def test_cli_trains_and_writes_logs(tmp_path):
    p = _cli(tmp_path, "--config.num_steps=2", "--config.ssft.method=random")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "random" and summary["final_step"] == 2
    assert (tmp_path / "metrics.jsonl").exists() and list((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "hf_export" / "model.safetensors").exists()


def test_cli_refuses_an_impossible_config(tmp_path):
    p = _cli(tmp_path, "--config.ssft.max_traces=9")
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "max_traces (M=9) > ssft.num_tags (N=6)" in out


def test_sigterm_checkpoints_and_the_run_resumes(tmp_path):
    """SIGTERM (preemption) while an async checkpoint write is in flight: the process finishes the step, lets that
    write complete, writes a final checkpoint and exits 0 within a bounded time; the same command resumes there."""
    from ssft_jax import checkpoint as ckpt_lib, metrics_log

    log = open(tmp_path / "run.log", "w")  # a file: orbax logs every save, a pipe nobody reads would fill and block
    p = _cli(tmp_path, "--config.num_steps=100000", "--config.checkpoint.every_steps=2", "--config.log_every=1",
             env={faults.WRITE_DELAY_ENV: "0.5"}, stdout=log, text=False)  # test hook: each write takes >= 0.5 s
    ckpts = tmp_path / "checkpoints"

    def writing():  # at least 3 steps done and a checkpoint write in flight
        return (len(metrics_log.read_metrics(tmp_path)) >= 3
                and any(".orbax-checkpoint-tmp" in d.name for d in ckpts.iterdir()))
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not writing():
        time.sleep(0.05)
    assert p.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    seconds = time.time() - t0
    log.close()
    assert p.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert seconds < 30, seconds  # bounded: the step in flight, the pending write, one final checkpoint
    print(f"\nSIGTERM -> exit 0 with a final checkpoint: {seconds:.1f} s")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_early"] and summary["final_step"] >= 3
    steps = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
    assert steps[-1] == summary["final_step"]  # the final checkpoint is finalised...
    assert not [d.name for d in ckpts.iterdir() if "tmp" in d.name]  # ...and so is the write that was in flight
    # Resumed with a shorter schedule: a change of the run's meaning, accepted by name.
    p2 = _cli(tmp_path, f"--config.num_steps={summary['final_step'] + 2}", "--config.resume.accept_changes=num_steps")
    out, _ = p2.communicate(timeout=300)
    assert p2.returncode == 0, out
    resumed = json.loads((tmp_path / "summary.json").read_text())
    assert resumed["start_step"] == summary["final_step"] and resumed["final_step"] == summary["final_step"] + 2
    assert [r["step"] for r in metrics_log.read_metrics(tmp_path)] == list(range(1, summary["final_step"] + 3))


@pytest.mark.slow
def test_smollm2_gsm8k_real_step(tmp_path):
    """One real SSFT step of SmolLM2-135M on GSM8K multi-trace questions (the real path, at CI size)."""
    from ssft_jax import train
    from ssft_jax.datasets import gsm8k
    if not (gsm8k.resolve_data_dir() / "test.jsonl").exists():
        pytest.skip(f"GSM8K data folder {gsm8k.resolve_data_dir()} is absent")
    c = load("smollm2_gsm8k", "tiny")
    c.mesh.update(data=1, num_devices=1)
    c.export_hf = False
    s = train.run(c, tmp_path, progress=False)
    loss = s["losses"][1]
    assert 0.1 < loss < 5.0, loss  # a pretrained instruct model: low but non-zero NLL on GSM8K solutions
    assert sum(s["tag_counts"]) > 0
    assert "prompt_over_budget" in s["validation"]  # the skipped questions are counted, not silently dropped
