"""launch/: the TPU launcher's exact dry-run commands, its real mode against a fake gcloud, and the sweep expander."""
import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `launch` is a top-level folder of the repository, not an installed package

from launch import common, sweep, tpu  # noqa: E402

CONFIG_32B = "configs/qwen2p5_32b.py:hf_dir=/ckpt/Qwen2.5-32B-Instruct,data=/data/s1k_multi.jsonl"


def dry(capsys, module, *argv):
    rc = module.main([*argv])
    out, err = capsys.readouterr()
    return rc, [shlex.split(line) for line in out.splitlines()], err


def remote(argv):
    """The --command of a `gcloud ... tpu-vm ssh` argv, split into shell words."""
    [cmd] = [a for a in argv if a.startswith("--command=")]
    return cmd.removeprefix("--command=")


def train_argv(remote_cmd):
    words = shlex.split(remote_cmd)
    start = words.index("-m") - 1
    end = words.index("2>&1") if "2>&1" in words else len(words)
    return words[start:end]


def test_pinned_jax_version_is_read_from_requirements(tmp_path):
    assert common.pinned_version("jax") == next(
        l.split("==")[1].strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.startswith("jax=="))
    req = tmp_path / "r.txt"
    req.write_text("# jax==0.0.1 in a comment\njaxlib==9.9\njax[cpu] == 1.2.3  # pinned\n")
    assert common.pinned_version("jax", req) == "1.2.3" and common.pinned_version("jaxlib", req) == "9.9"
    with pytest.raises(common.LaunchError, match="no 'flax==<version>' pin"):
        common.pinned_version("flax", req)


def test_all_in_one_32b_queued_resource_dry_run(capsys):
    rc, lines, err = dry(capsys, tpu, "all", "--name", "ssft-q32", "--zone", "us-east5-a", "--project", "my-proj",
                         "--accelerator_type", "v5p-64", "--queued", "--spot", "--config", CONFIG_32B,
                         "--workdir", "gs://my-bucket/runs/q32", "--set", "num_epochs=3",
                         "--set", "data.path=/data/with space.jsonl", "--delete", "--dry_run")
    assert rc == 0, err
    loc = ["--zone=us-east5-a", "--project=my-proj"]
    create, describe, archive, scp, unpack, install, run, delete = lines
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "ssft-q32", "--node-id=ssft-q32", *loc,
                      "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--spot"]
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "ssft-q32"]
    assert archive[:2] == ["git", "-C"] and archive[3] == "archive" and archive[-1] == "HEAD"
    tarball = archive[-2].removeprefix("--output=")
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "ssft-q32:ssft-jax.tar.gz", *loc,
                   "--worker=all"]
    for ssh in (unpack, install, run):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ssft-q32"]
        assert ssh[6:9] == [*loc, "--worker=all"] and len(ssh) == 10
    assert "tar -xzf ~/ssft-jax.tar.gz -C ~/ssft-jax" in remote(unpack)

    inst = shlex.split(remote(install))
    assert inst[inst.index("-r") + 1] == "requirements.txt"
    assert f"jax[tpu]=={common.pinned_version('jax')}" in inst
    assert inst[inst.index("-f") + 1] == common.LIBTPU_FIND_LINKS

    train = train_argv(remote(run))
    assert train == ["~/ssft-venv/bin/python", "-m", "ssft_jax.train", f"--config={CONFIG_32B}",
                     "--workdir=gs://my-bucket/runs/q32", "--config.num_epochs=3",
                     "--config.data.path=/data/with space.jsonl"]
    assert remote(run).startswith("cd ~/ssft-jax && set -o pipefail && ")
    assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ssft-q32", *loc, "--force", "--quiet"]


def test_tpu_vm_steps_and_no_delete_unless_asked(capsys):
    common_args = ["--name", "t", "--zone", "us-central2-b", "--dry_run"]
    rc, lines, _ = dry(capsys, tpu, "create", *common_args, "--accelerator_type", "v4-32", "--spot")
    assert rc == 0 and lines == [["gcloud", "compute", "tpus", "tpu-vm", "create", "t", "--zone=us-central2-b",
                                  "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]
    rc, lines, _ = dry(capsys, tpu, "all", *common_args, "--accelerator_type", "v6e-8", "--version", "my-rt",
                       "--config", "configs/demo.py", "--workdir", "gs://b/r", "--detach")
    assert rc == 0 and "--version=my-rt" in lines[0] and not any("delete" in l for l in lines)
    assert lines[-1][-2:] == ["--worker=0", "--command=tail -n +1 -f ~/ssft-train.log"]  # detached: follow the log
    assert remote(lines[-2]).endswith(">> ~/ssft-train.log 2>&1 < /dev/null &")
    rc, lines, _ = dry(capsys, tpu, "delete", *common_args)
    assert lines == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=us-central2-b", "--quiet"]]
    rc, lines, err = dry(capsys, tpu, "create", *common_args, "--accelerator_type", "v9z-8")
    assert rc == 2 and lines == [] and "no default --version for accelerator type 'v9z-8'" in err
    rc, lines, err = dry(capsys, tpu, "run", *common_args)
    assert rc == 2 and "run needs --config and --workdir" in err


def test_missing_gcloud_fails_clearly_and_runs_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud (nor anything else) on PATH
    for step in (["create", "--accelerator_type", "v5p-8"], ["delete"]):
        runner = common.Runner(False)
        rc = tpu.main([*step, "--name", "t", "--zone", "z"], runner=runner)
        err = capsys.readouterr().err
        assert rc == 2 and "'gcloud' was not found on PATH" in err and "--dry_run" in err and runner.history == []
    rc = sweep.main(["--config", "configs/demo.py:tiny", "--workdir", "gs://b", "--set", "seed=0,1", "--tpu", "v",
                     "--zone", "z", "--run"])
    assert rc == 2 and "'gcloud' was not found on PATH" in capsys.readouterr().err


def test_real_mode_runs_the_dry_run_commands_and_deletes_after_a_failed_run(capsys, tmp_path):
    """A fake gcloud records its argv; the training ssh fails; the queued resource is still deleted."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "gcloud"
    fake.write_text(f"""#!{sys.executable}
import json, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    print("ACTIVE")
if any("ssft_jax.train" in a for a in sys.argv):
    sys.exit(3)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    args = ["all", "--name", "n", "--zone", "z", "--queued", "--accelerator_type", "v5p-8", "--config",
            "configs/demo.py", "--workdir", "gs://b/r", "--delete", "--gcloud", str(fake),
            "--tarball", str(tmp_path / "code.tar.gz")]
    rc, dry_lines, _ = dry(capsys, tpu, *args, "--dry_run")
    assert rc == 0
    rc = tpu.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "exit code 3" in err
    calls = [[str(fake), *json.loads(l)] for l in log.read_text().splitlines()]
    expected = [l for l in dry_lines if l[0] != "git"]
    assert calls == expected  # same commands as the dry run, in order, delete included after the failure
    assert (tmp_path / "code.tar.gz").stat().st_size > 0  # git archive really ran (read-only)


# ------------------------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------------------------

def test_sweep_file_expands_methods_times_seeds(capsys):
    rc, lines, err = dry(capsys, sweep, "--config", "configs/demo.py", "--sweep", "configs/sweeps/demo_methods.py",
                         "--workdir", "/tmp/base", "--fixed", "num_steps=10")
    assert rc == 0, err
    assert len(lines) == 8
    workdirs = [next(a for a in l if a.startswith("--workdir=")) for l in lines]
    assert len(set(workdirs)) == 8
    assert lines[4][1:] == ["-m", "ssft_jax.train", "--config=configs/demo.py",
                            "--workdir=/tmp/base/method-sft_mixed_seed-0", "--config.num_steps=10",
                            "--config.ssft.method=sft_mixed", "--config.seed=0"]


def test_cli_products_and_tpu_target(capsys):
    rc, lines, _ = dry(capsys, sweep, "--config", "configs/demo.py:tiny", "--set", "ssft.method=fixed,random",
                       "--set", "optim.learning_rate=1e-3,3e-3", "--workdir", "gs://b/sw", "--tpu", "v", "--zone", "z")
    assert rc == 0 and len(lines) == 4
    trains = [train_argv(remote(l)) for l in lines]
    assert [t[4] for t in trains] == ["--workdir=gs://b/sw/method-fixed_learning_rate-0.001",
                                      "--workdir=gs://b/sw/method-fixed_learning_rate-0.003",
                                      "--workdir=gs://b/sw/method-random_learning_rate-0.001",
                                      "--workdir=gs://b/sw/method-random_learning_rate-0.003"]
    assert trains[3][3:] == ["--config=configs/demo.py:tiny", "--workdir=gs://b/sw/method-random_learning_rate-0.003",
                             "--config.ssft.method=random", "--config.optim.learning_rate=0.003"]
    assert all("--worker=all" in l for l in lines)


@pytest.mark.parametrize("args,message", [
    (["--set", "ssft.methd=fixed,random"], "unknown config key 'ssft.methd'"),
    (["--set", "optimm.lr=1"], "unknown config key 'optimm.lr'.*'optimm' does not exist"),
    (["--set", "ssft.method=fixed,greedy"], "sweep point 1.*ssft.method='greedy'"),
    (["--set", "ssft=1"], "'ssft'.*is a section"),
    (["--fixed", "num_steps=many", "--set", "seed=0,1"], "num_steps"),
    ([], "nothing to sweep"),
])
def test_sweep_refuses_bad_points_before_launching_anything(capsys, args, message):
    rc, lines, err = dry(capsys, sweep, "--config", "configs/demo.py:tiny", "--workdir", "/tmp/x", *args)
    assert rc == 2 and lines == []
    assert __import__("re").search(message, err), err


@pytest.mark.slow
def test_sweep_runs_two_points_locally(tmp_path):
    cmd = [sys.executable, "-m", "launch.sweep", "--config", "configs/demo.py:tiny", "--workdir", str(tmp_path),
           "--set", "ssft.method=fixed,sft_mixed", "--fixed", "num_steps=2", "--fixed", "mesh.num_devices=1",
           "--fixed", "mesh.data=1", "--fixed", "export_hf=false", "--run"]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for method, name in (("fixed", "method-fixed"), ("sft_mixed", "method-sft_mixed")):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["method"] == method and summary["final_step"] == 2
        assert set(summary["losses"]) == {"1", "2"}
        assert f"{name}: method={method} steps=2" in p.stdout


def test_gfpo_32b_recipe_dry_run_runs_the_gfpo_stage_from_the_staged_ssft_export(capsys):
    config = "configs/qwen2p5_32b_gfpo.py:init_from=/ckpt/ssft32b,data=/data/math_prompts.jsonl"
    rc, lines, err = dry(capsys, tpu, "all", "--name", "q32-gfpo", "--zone", "us-east5-a", "--accelerator_type",
                         "v5p-64", "--config", config, "--stage", "gs://bucket/runs/q32/hf_export=/ckpt/ssft32b",
                         "--workdir", "gs://bucket/runs/q32_gfpo", "--dry_run")
    assert rc == 0, err
    stage = next(line for line in lines if "gs://bucket/runs/q32/hf_export" in " ".join(line))
    assert "/ckpt/ssft32b" in remote(stage)
    run = next(line for line in lines if "ssft_jax" in " ".join(line))
    assert train_argv(remote(run)) == ["~/ssft-venv/bin/python", "-m", "ssft_jax.gfpo", f"--config={config}",
                                       "--workdir=gs://bucket/runs/q32_gfpo"]
    with pytest.raises(common.LaunchError, match="cannot be read here"):
        common.stage_module("configs/no_such_config.py")
