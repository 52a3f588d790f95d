"""Shared pieces of the launch scripts: pinned versions, the command runner (real or --dry_run), training commands."""
from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Callable, Iterable, Mapping, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements.txt"

# Where pip finds libtpu wheels for `jax[tpu]` (JAX's installation guide).
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


class LaunchError(RuntimeError):
    """A launch cannot proceed (missing tool, bad argument, failed command); the message says which."""


def pinned_version(package: str, requirements: str | pathlib.Path = REQUIREMENTS) -> str:
    """The `package==X` pin in a requirements file (comments and extras ignored)."""
    text = pathlib.Path(requirements).read_text()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?\s*==\s*([^\s;]+)", line, flags=re.IGNORECASE)
        if m:
            return m.group(2)
    raise LaunchError(f"{requirements} has no '{package}==<version>' pin")


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """["a.b=1", "c=x y"] -> {"a.b": "1", "c": "x y"}; a missing '=' is an error naming the item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LaunchError(f"override {item!r}: expected key=value (e.g. ssft.method=sft_mixed)")
        out[key.removeprefix("config.")] = value
    return out


STAGE_MODULES = {"ssft": "ssft_jax.train", "gfpo": "ssft_jax.gfpo"}


def stage_module(config: str) -> str:
    """The module that runs a config (`configs/X.py[:arg]`, read here): `ssft_jax.gfpo` for a stage='gfpo' config,
    `ssft_jax.train` otherwise. A config that cannot be read is a LaunchError naming it (before anything starts)."""
    from ssft_jax import config as config_lib  # the launcher's other commands do not need jax

    path, _, arg = config.partition(":")
    try:
        stage = config_lib.load_config(path, arg).get("stage", "ssft")
    except (config_lib.ConfigError, OSError, ValueError, KeyError) as e:
        raise LaunchError(f"--config {config!r} cannot be read here ({e}); the launcher reads it to pick the stage") \
            from None
    return STAGE_MODULES[stage]


def train_command(config: str, workdir: str, overrides: Mapping[str, object] = (), *,
                  python: str = sys.executable) -> list[str]:
    """argv of one run of the config's stage: `python -m ssft_jax.train|ssft_jax.gfpo --config=... --workdir=...
    --config.k=v ...` (`stage_module`)."""
    cmd = [python, "-m", stage_module(config), f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={format_value(v)}" for k, v in dict(overrides).items()]
    return cmd


def format_value(value: object) -> str:
    """A value as absl/ml_collections parses it back (bools as true/false, the rest via str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Runner:
    """Runs argv lists, or with dry_run prints each as one shell-quoted line (`shlex.join`) and runs nothing."""

    def __init__(self, dry_run: bool, *, gcloud: str = "gcloud", out: Callable[[str], None] | None = None):
        self.dry_run = dry_run
        self.gcloud = gcloud
        self.out = out or (lambda line: print(line, flush=True))
        self.history: list[list[str]] = []

    def check_tools(self, *tools: str) -> None:
        """Fail early, with a clear message, when a needed program is not on PATH (real mode only)."""
        if self.dry_run:
            return
        for tool in tools:
            if shutil.which(tool) is None:
                hint = (" Install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), run "
                        "`gcloud auth login`, or pass --gcloud=/path/to/gcloud; --dry_run prints the commands "
                        "without it.") if tool == self.gcloud else ""
                raise LaunchError(f"{tool!r} was not found on PATH.{hint}")

    def run(self, argv: Sequence[str], *, check: bool = True, capture: bool = False) -> str:
        argv = [str(a) for a in argv]
        self.history.append(argv)
        if self.dry_run:
            self.out(shlex.join(argv))
            return ""
        self.out(f"+ {shlex.join(argv)}")
        proc = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else None)
        if check and proc.returncode != 0:
            raise LaunchError(f"command failed with exit code {proc.returncode}: {shlex.join(argv)}")
        return proc.stdout or ""


def modules_replaced(imported_before: Iterable[str], pip_output: str) -> list[str]:
    """Top-level modules this process had imported before a `pip install` that then installed (replaced) their
    distribution: the process still runs the old code, so the notebook restarts its runtime. `pip_output` holds pip's
    'Successfully installed name-1.0 other-2.0' line."""
    line = next((ln for ln in pip_output.splitlines() if ln.startswith("Successfully installed ")), "")
    names = {re.sub(r"-[^-]+$", "", item).lower().replace("-", "_") for item in line.split()[2:]}
    aliases = {"protobuf": "google", "pyyaml": "yaml", "pillow": "PIL", "scikit_learn": "sklearn",
               "absl_py": "absl", "ml_collections": "ml_collections"}
    before = {m.split(".")[0] for m in imported_before}
    return sorted({aliases.get(n, n) for n in names} & before)
