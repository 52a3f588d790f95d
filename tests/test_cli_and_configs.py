"""configs/*.py, the `python -m ssft_jax.train` CLI, and SIGTERM (preemption) handling."""
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from ssft_jax import config as config_lib

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


def _cli(workdir, *overrides, env=None, write_delay_s=None, **popen):
    """The trainer's CLI on configs/demo.py:tiny; write_delay_s: every checkpoint write takes at least that long
    (tests/slow_writes.py passes the hook to the trainer's checkpointer)."""
    main = ["-m", "ssft_jax.train"] if write_delay_s is None else [str(ROOT / "tests" / "slow_writes.py"),
                                                                  str(write_delay_s)]
    cmd = [sys.executable, *main, f"--config={ROOT / 'configs' / 'demo.py'}:tiny",
           f"--workdir={workdir}", "--config.mesh.num_devices=1", "--config.mesh.data=1", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, **popen}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)


def test_cli_trains_and_writes_logs(tmp_path):
    p = _cli(tmp_path, "--config.num_steps=2", "--config.ssft.method=random", "--config.export.dtype=bfloat16",
             "--config.optim.warmup_frac=0.0")  # warmup 0: optax logs "transition_steps" at INFO (filtered)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "random" and summary["final_step"] == 2
    assert (tmp_path / "metrics.jsonl").exists() and list((tmp_path / "tensorboard").iterdir())
    # the viewer installed with the project reads them (`tensorboard --logdir <workdir>/tensorboard`)
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    # the export in bf16 (export.dtype), with its model card
    raw = (tmp_path / "hf_export" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((tmp_path / "hf_export" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    card = (tmp_path / "hf_export" / "README.md").read_text()
    assert "SFT with a random assignment" in card and "forking_tag=k" in card and "| steps | 2 |" in card
    # the console: no library noise, the data report once, compilation on its own line, a short summary table
    assert "Unable to initialize backend" not in out and "transition_steps" not in out
    assert out.count("records kept") == 1 and "first step:" in out and "compilation included" in out
    assert "{" not in out.split("first step:")[-1]
    assert re.search(r"^summary +" + re.escape(str(tmp_path / "summary.json")) + "$", out, re.M)
    assert "traces per tag" in out and "steps" in out and "0 -> 2" in out


CLI_MISTAKES = {  # what a user mistypes -> what the one message must name
    "misspelled_key": (["--config.ssft.methd=ssft"], ["--config.ssft.methd", "method"]),
    "unknown_key": (["--config.nope=1"], ["--config.nope: no such config field"]),
    "missing_config_file": (["--config=configs/nope.py"], ["--config", "configs/nope.py", "No such file"]),
    "bad_config_argument": (["--config=configs/demo.py:nope"], ["configs/demo.py:nope", "accepts ['tiny']"]),
    "jsonl_without_a_path": (["--config.data.name=jsonl", "--config.mesh.num_devices=1", "--config.mesh.data=1"],
                             ["data.name='jsonl'", "data.path must name"]),
    "not_an_int": (["--config.num_steps=abc"], ["--config.num_steps=abc", "invalid literal"]),
    # a file given without data.name=jsonl used to train on the synthetic task without a word
    "path_with_a_synthetic_dataset": (["--config.data.path=my.jsonl", "--config.mesh.num_devices=1",
                                       "--config.mesh.data=1"],
                                      ["data.path='my.jsonl'", "data.name='synthetic'", "--config.data.name=jsonl"]),
}


@pytest.mark.parametrize("case", sorted(CLI_MISTAKES))
def test_every_cli_mistake_is_one_message_and_exit_2(tmp_path, case):
    """Through the real CLI: one `error:` line naming the flag or file (and a hint line), exit code 2, no
    traceback; nothing is written to the workdir."""
    overrides, names = CLI_MISTAKES[case]
    config = (
        [] if any(o.startswith("--config=") for o in overrides) else [f"--config={ROOT / 'configs' / 'demo.py'}:tiny"]
    )
    p = subprocess.run([sys.executable, "-m", "ssft_jax.train", *config, f"--workdir={tmp_path / 'wd'}", *overrides],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=300)
    err = p.stderr
    err_lines = [line for line in err.splitlines() if not re.match(r"^[IW]\d{4} ", line)]  # absl INFO/WARNING log
    assert p.returncode == 2, err
    assert "Traceback" not in err and len(err_lines) <= 3, err
    message = next(line for line in err_lines if line.startswith("error: "))
    for name in names:
        assert name in message, (name, message)
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_cli_refuses_an_impossible_config(tmp_path):
    p = _cli(tmp_path, "--config.ssft.max_traces=9")
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0 and "max_traces (M=9) > ssft.num_tags (N=6)" in out


def test_sigterm_checkpoints_and_the_run_resumes(tmp_path):
    """SIGTERM (preemption) while an async checkpoint write is in flight: the process finishes the step, lets that
    write complete, writes a final checkpoint and exits 0 within a bounded time; the same command resumes there
    and ends with the summary (losses, tag counts, assignment patterns) of a run that was never interrupted."""
    from ssft_jax import metrics_log, tag_policy
    from ssft_jax.evaluate import coverage_tag

    steps = 24
    flags = (f"--config.num_steps={steps}", "--config.checkpoint.every_steps=2", "--config.log_every=1",
             "--config.export_hf=False")
    wd = tmp_path / "preempted"
    log = open(tmp_path / "run.log", "w")  # a file: orbax logs every save, a pipe nobody reads would fill and block
    p = _cli(wd, *flags, write_delay_s=0.5, stdout=log, text=False)  # each write takes >= 0.5 s
    ckpts = wd / "checkpoints"

    def writing():  # at least 3 steps done and a checkpoint write in flight
        return (len(metrics_log.read_metrics(wd)) >= 3
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
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["stopped_early"] and 3 <= summary["final_step"] < steps
    saved = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
    assert saved[-1] == summary["final_step"]  # the final checkpoint is finalised...
    assert not [d.name for d in ckpts.iterdir() if "tmp" in d.name]  # ...and so is the write that was in flight
    assert len(summary["losses"]) == summary["final_step"]

    out, _ = _cli(wd, *flags).communicate(timeout=300)  # the same command resumes and finishes
    straight = tmp_path / "straight"
    out2, _ = _cli(straight, *flags).communicate(timeout=300)
    assert "resumed from step" in out and "resumed from step" not in out2, (out[-2000:], out2[-2000:])
    resumed, reference = (json.loads((d / "summary.json").read_text()) for d in (wd, straight))
    assert resumed["start_step"] == summary["final_step"] and resumed["final_step"] == steps
    assert [r["step"] for r in metrics_log.read_metrics(wd)] == list(range(1, steps + 1))
    per_process = ("start_step", "seconds", "compiles")
    assert ({k: v for k, v in resumed.items() if k not in per_process}
            == {k: v for k, v in reference.items() if k not in per_process})
    # what evaluation (coverage tag) and GFPO (valid_tags="used") read from it
    assert coverage_tag(resumed["tag_counts"]) == coverage_tag(reference["tag_counts"])
    assert (tag_policy.used_tags(resumed["tag_counts"], 6) == tag_policy.used_tags(reference["tag_counts"], 6)).all()
    assert sum(resumed["tag_counts"]) == steps * 4 * 4  # every matched trace of every step (B=4, M=4)


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


def test_pyproject_lists_every_package_on_disk():
    """pyproject.toml lists the packages (package-dir maps configs/ into ssft_jax.configs): a new subpackage that is
    not listed would be missing from `pip install .`."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ssft_jax").rglob("__init__.py")}
    assert listed == on_disk | {"ssft_jax.configs", "ssft_jax.configs.sweeps"}


@pytest.mark.slow
def test_installed_package_runs_its_configs_from_another_folder(tmp_path):
    """`pip install .` then a console script from a folder that is not the repository: `configs/demo.py` (as the
    README writes it) names the packaged config, which used to be missing from the install."""
    pip = [sys.executable, "-m", "pip", "-q"]
    # Built from a copy of the repository's files: setuptools writes build/ into the tree it builds.
    from launch.colab_zip import repo_files
    src = tmp_path / "src"
    for f in repo_files(ROOT):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((ROOT / f).read_bytes())
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(src)],
                   check=True, timeout=300, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("ssft_jax-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    probe = ("import ssft_jax, ssft_jax.config as c; print(ssft_jax.__file__); print(c.CONFIGS_DIR); "
             "c.load_config('demo', 'tiny'); assert (c.CONFIGS_DIR / 'sweeps' / 'demo_methods.py').is_file()")
    p = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    package_file, configs_dir = p.stdout.split()[:2]
    assert package_file.startswith(str(site)) and configs_dir == str(site / "ssft_jax" / "configs")
    p = subprocess.run([sys.executable, "-m", "ssft_jax.train", "--config", "configs/demo.py:tiny",
                        f"--workdir={tmp_path / 'wd'}", "--config.num_steps=1", "--config.export_hf=False",
                        "--config.mesh.num_devices=1", "--config.mesh.data=1"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "wd" / "summary.json").read_text())["final_step"] == 1


def test_help_config_lists_every_key_with_its_value_and_documentation(tmp_path):
    from ssft_jax import config_help
    c = config_lib.load_config("demo", "tiny")
    text = config_help.describe(c)
    keys = [line.split(" = ")[0] for line in text.splitlines() if " = " in line and not line.startswith((" ", "#"))]
    assert keys == [k for k, _ in config_help._flatten(c)] and len(keys) > 100
    assert "ssft.cost_prefix_len = 16\n    L: tokens of each trace scored for the cost matrix" in text
    assert "gfpo.estimator = 'grpo'\n    grpo: G tags sampled from pi per question" in text  # gfpo_defaults()
    assert "# [lora] LoRA (ssft_jax/lora.py)" in text
    # on one line with three others, the comment above names on_corrupt: only on_corrupt gets it
    assert "checkpoint.on_corrupt = 'error'\n" in text and "checkpoint.max_to_keep = 3\n    " not in text
    # through the CLI, overrides applied, no --workdir needed
    p = subprocess.run([sys.executable, "-m", "ssft_jax.train", f"--config={ROOT / 'configs' / 'demo.py'}",
                        "--config.batch_size=3", "--help_config"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "batch_size = 3\n    questions per step" in p.stdout and not (tmp_path / "checkpoints").exists()
