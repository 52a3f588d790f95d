"""Cloud TPU VM / pod launcher: create -> sync code -> install -> [stage data] -> train on every worker -> logs ->
delete.

    python -m launch.tpu all --name q32 --zone us-east5-a --project my-proj --accelerator_type v5p-64 --queued --spot \
        --config 'configs/qwen2p5_32b.py:hf_dir=/ckpt/Qwen2.5-32B-Instruct,data=/data/s1k_multi.jsonl' \
        --workdir gs://my-bucket/runs/q32 --set num_epochs=3 --delete --dry_run

Subcommands: create, sync, install, stage, run, logs, delete, all. Every one takes --dry_run, which prints the exact
commands (one per line, `shlex.join`-quoted) and runs nothing. Each worker of a pod runs the same training command
(`--worker=all`); on a pod `jax.distributed.initialize()` auto-detects the slice (via
`ssft_jax.mesh.maybe_initialize_distributed`) and every process reads its own shard of each global batch.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time

if __package__ in (None, ""):  # `python launch/tpu.py ...`
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    __package__ = "launch"

from launch import common
from launch.common import LaunchError, Runner

REMOTE_DIR = "~/ssft-jax"      # code on each worker
REMOTE_VENV = "~/ssft-venv"    # Python env on each worker (TPU images ship Python 3.10; the pins need >= 3.11)
REMOTE_LOG = "~/ssft-train.log"
TARBALL_REMOTE = "ssft-jax.tar.gz"  # relative to the worker's home (scp destination and shell path)

# Runtime (software) version per TPU generation, from the accelerator type's prefix.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def default_runtime_version(accelerator_type: str) -> str:
    prefix = accelerator_type.rsplit("-", 1)[0]
    if prefix not in RUNTIME_VERSIONS:
        raise LaunchError(f"no default --version for accelerator type {accelerator_type!r} "
                          f"(known: {sorted(RUNTIME_VERSIONS)}); pass --version")
    return RUNTIME_VERSIONS[prefix]


# ---------------------------------------------------------------------------------------------------------------
# Command builders (pure: argv lists)
# ---------------------------------------------------------------------------------------------------------------

def _loc(a) -> list[str]:
    out = [f"--zone={a.zone}"]
    if a.project:
        out.append(f"--project={a.project}")
    return out


def create_commands(a) -> list[list[str]]:
    version = a.version or default_runtime_version(a.accelerator_type)
    g = a.gcloud
    if a.queued:
        cmd = [g, "compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}", *_loc(a),
               f"--accelerator-type={a.accelerator_type}", f"--runtime-version={version}"]
        if a.spot:
            cmd.append("--spot")
        return [cmd]
    cmd = [g, "compute", "tpus", "tpu-vm", "create", a.name, *_loc(a), f"--accelerator-type={a.accelerator_type}",
           f"--version={version}"]
    if a.spot:
        cmd.append("--spot")
    return [cmd]


def queued_state_command(a) -> list[str]:
    return [a.gcloud, "compute", "tpus", "queued-resources", "describe", a.name, *_loc(a),
            "--format=value(state.state)"]


def ssh_command(a, remote: str, worker: str = "all") -> list[str]:
    return [a.gcloud, "compute", "tpus", "tpu-vm", "ssh", a.name, *_loc(a), f"--worker={worker}", f"--command={remote}"]


def sync_commands(a) -> list[list[str]]:
    """git archive of a commit -> scp to every worker -> unpack into a clean REMOTE_DIR."""
    tarball = a.tarball or f"/tmp/ssft-jax-{''.join(c if c.isalnum() or c in '-_.' else '_' for c in a.ref)}.tar.gz"
    unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf ~/{TARBALL_REMOTE} -C {REMOTE_DIR} "
              f"&& rm ~/{TARBALL_REMOTE}")
    return [
        ["git", "-C", str(common.ROOT), "archive", "--format=tar.gz", f"--output={tarball}", a.ref],
        [a.gcloud, "compute", "tpus", "tpu-vm", "scp", tarball, f"{a.name}:{TARBALL_REMOTE}", *_loc(a), "--worker=all"],
        ssh_command(a, unpack),
    ]


def install_remote(a) -> str:
    """One shell line for every worker: a uv-managed Python venv, then the pinned requirements plus jax[tpu] with
    the libtpu find-links (one resolve, so jax/jaxlib/libtpu agree), then an import check."""
    jax_version = a.jax_version or common.pinned_version("jax")
    uv, py = "~/.local/bin/uv", f"{REMOTE_VENV}/bin/python"  # '~' must stay unquoted to expand
    return (f"cd {REMOTE_DIR} && python3 -m pip install -q --user uv && {uv} venv --allow-existing "
            f"--python {shlex.quote(a.python)} {REMOTE_VENV} && {uv} pip install --python {py} -r requirements.txt "
            f"{shlex.quote(f'jax[tpu]=={jax_version}')} -f {shlex.quote(a.libtpu_find_links)} && {py} -c "
            + shlex.quote("import jax, libtpu; print(jax.__version__)"))


def stage_remote(a) -> list[str]:
    """Copy each SRC=DST (e.g. a GCS model folder to the worker's disk) on every worker."""
    out = []
    for item in a.stage or ():
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise LaunchError(f"--stage {item!r}: expected SRC=DST (e.g. gs://bucket/Qwen2.5-32B-Instruct=/ckpt/)")
        d = shlex.quote(dst)  # e.g. /ckpt is not writable by the ssh user: create it with sudo and take it
        out.append(f"sudo mkdir -p {d} && sudo chown $(id -u):$(id -g) {d} && "
                   f"gcloud storage cp -r {shlex.quote(src)} {d}")
    return out


def run_remote(a) -> str:
    """The training command every worker runs (foreground, output streamed and appended to REMOTE_LOG; or detached)."""
    overrides = common.parse_overrides(a.set or ())
    train = common.train_command(a.config, a.workdir, overrides, python="python")
    env = [f"{k}={shlex.quote(v)}" for k, v in common.parse_overrides(a.env or ()).items()]
    line = " ".join([*env, f"{REMOTE_VENV}/bin/python", shlex.join(train[1:])])  # '~' unquoted: it must expand
    if a.detach:
        return f"cd {REMOTE_DIR} && nohup {line} >> {REMOTE_LOG} 2>&1 < /dev/null &"
    return f"cd {REMOTE_DIR} && set -o pipefail && {line} 2>&1 | tee -a {REMOTE_LOG}"


def logs_command(a) -> list[str]:
    return ssh_command(a, f"tail -n +1 -f {REMOTE_LOG}", worker=str(a.log_worker))


def delete_commands(a) -> list[list[str]]:
    if a.queued:
        return [[a.gcloud, "compute", "tpus", "queued-resources", "delete", a.name, *_loc(a), "--force", "--quiet"]]
    return [[a.gcloud, "compute", "tpus", "tpu-vm", "delete", a.name, *_loc(a), "--quiet"]]


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------

def do_create(a, r: Runner) -> None:
    for cmd in create_commands(a):
        r.run(cmd)
    if a.queued:
        wait_active(a, r)


def wait_active(a, r: Runner) -> None:
    """Poll the queued resource until ACTIVE (dry run: print the poll command once)."""
    cmd = queued_state_command(a)
    if r.dry_run:
        r.run(cmd)
        return
    deadline = time.time() + a.wait_minutes * 60
    while True:
        state = r.run(cmd, capture=True).strip()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise LaunchError(f"queued resource {a.name} is {state}")
        if time.time() > deadline:
            raise LaunchError(f"queued resource {a.name} still {state or 'unknown'} after {a.wait_minutes} min")
        time.sleep(30)


def do_sync(a, r: Runner) -> None:
    for cmd in sync_commands(a):
        r.run(cmd)


def do_install(a, r: Runner) -> None:
    r.run(ssh_command(a, install_remote(a)))


def do_stage(a, r: Runner) -> None:
    for remote in stage_remote(a):
        r.run(ssh_command(a, remote))


def do_run(a, r: Runner) -> None:
    if not a.config or not a.workdir:
        raise LaunchError("run needs --config and --workdir")
    r.run(ssh_command(a, run_remote(a)))


def do_logs(a, r: Runner) -> None:
    r.run(logs_command(a))


def do_delete(a, r: Runner) -> None:
    for cmd in delete_commands(a):
        r.run(cmd)


def do_all(a, r: Runner) -> None:
    """create -> sync -> install -> stage -> run [-> logs when detached] [-> delete, also after a failure]."""
    if not a.config or not a.workdir:
        raise LaunchError("all needs --config and --workdir")
    do_create(a, r)
    try:
        do_sync(a, r)
        do_install(a, r)
        do_stage(a, r)
        do_run(a, r)
        if a.detach:
            do_logs(a, r)
    finally:
        if a.delete:
            do_delete(a, r)


STEPS = dict(create=do_create, sync=do_sync, install=do_install, stage=do_stage, run=do_run, logs=do_logs,
             delete=do_delete, all=do_all)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)

    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--name", required=True, help="TPU VM name (also the queued resource's name and node id)")
    base.add_argument("--zone", required=True)
    base.add_argument("--project", default="", help="GCP project (default: gcloud's configured project)")
    base.add_argument("--queued", action="store_true", help="use a queued resource instead of a plain TPU VM")
    base.add_argument("--dry_run", action="store_true", help="print the commands, one per line; run nothing")
    base.add_argument("--gcloud", default="gcloud", help="the gcloud executable")

    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--accelerator_type", default="v5p-8", help="e.g. v5p-64, v5litepod-16, v4-32, v6e-8")
    create.add_argument("--version", default="", help="TPU runtime version (default: by generation, "
                                                      f"{RUNTIME_VERSIONS})")
    create.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    create.add_argument("--wait_minutes", type=float, default=120, help="queued resource: how long to wait for ACTIVE")

    sync = argparse.ArgumentParser(add_help=False)
    sync.add_argument("--ref", default="HEAD", help="git commit/branch/tag to ship (committed files only)")
    sync.add_argument("--tarball", default="", help="local path of the archive (default /tmp/ssft-jax-<ref>.tar.gz)")

    install = argparse.ArgumentParser(add_help=False)
    install.add_argument("--python", default="3.11", help="Python version of the workers' venv (uv-managed)")
    install.add_argument("--jax_version", default="", help="default: the jax pin in requirements.txt")
    install.add_argument("--libtpu_find_links", default=common.LIBTPU_FIND_LINKS)

    stage = argparse.ArgumentParser(add_help=False)
    stage.add_argument("--stage", action="append", metavar="SRC=DST",
                       help="copy SRC (gs://...) to DST on every worker before training (repeatable)")

    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--config", default="", help="configs/X.py[:arg] (relative to the repository)")
    run.add_argument("--workdir", default="", help="run directory, e.g. gs://bucket/runs/name")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (repeatable)")
    run.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment for the trainer (repeatable)")
    run.add_argument("--detach", action="store_true",
                     help=f"start training in the background (nohup, {REMOTE_LOG}); stream it with `logs`")

    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument("--log_worker", default="0", help="which worker's log to follow (0, 1, ... or all)")

    delete = argparse.ArgumentParser(add_help=False)
    delete.add_argument("--delete", action="store_true", help="all: delete the resources at the end (also on failure)")

    parents = dict(create=[create], sync=[sync], install=[install], stage=[stage], run=[run], logs=[logs],
                   delete=[], all=[create, sync, install, stage, run, logs, delete])
    for step, extra in parents.items():
        doc = STEPS[step].__doc__ or step
        sub.add_parser(step, parents=[base, *extra], help=doc.splitlines()[0], description=doc)
    return p


def main(argv=None, runner: Runner | None = None) -> int:
    a = build_parser().parse_args(argv)
    r = runner or Runner(a.dry_run, gcloud=a.gcloud)
    try:
        r.check_tools(a.gcloud, *(["git"] if a.step in ("sync", "all") else []))
        STEPS[a.step](a, r)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
