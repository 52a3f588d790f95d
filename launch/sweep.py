"""Sweep expander: a grid of config overrides -> one training launch per point, each in its own workdir.

    # a sweep file (big_vision style): get_hyper(arg) returns a list of override dicts
    python -m launch.sweep --config configs/demo.py --sweep configs/sweeps/demo_methods.py --workdir /tmp/sweep
    # or products on the command line, plus overrides shared by every point
    python -m launch.sweep --config configs/demo.py:tiny --set ssft.method=ssft,sft_mixed --set seed=0,1 \
        --fixed num_steps=50 --workdir /tmp/sweep --run
    # the same points on a TPU VM / pod (each point = one `launch.tpu run` on all workers, one after another)
    python -m launch.sweep --config configs/qwen2p5_7b.py:hf_dir=/ckpt/q7,data=/data/s1k.jsonl \
        --sweep configs/sweeps/demo_methods.py:seeds=1 --workdir gs://bucket/sweeps/q7 --tpu q7 --zone us-east5-a

Every point's workdir is BASE/<name>, the name made from the point's keys and values (`ssft.method=sft_mixed,
seed=1` -> `method-sft_mixed_seed-1`). Override keys are checked against the config, and each point's config is
validated, before anything is launched. Without --run (or with --dry_run) the commands are printed, one per line.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import itertools
import json
import pathlib
import posixpath
import re
import shlex
import subprocess
import sys
import types
from typing import Any, Sequence

if __package__ in (None, ""):  # `python launch/sweep.py ...`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    __package__ = "launch"

from launch import common
from launch.common import LaunchError, Runner

# ---------------------------------------------------------------------------------------------------------------
# Loading configs and sweep files
# ---------------------------------------------------------------------------------------------------------------

def split_spec(spec: str) -> tuple[pathlib.Path, str]:
    """'configs/x.py:arg' -> (path, 'arg'); relative paths are taken from the cwd, else from the repository."""
    path, sep, arg = spec.partition(".py:")
    path = path + ".py" if sep else spec
    p = pathlib.Path(path)
    if not p.is_absolute() and not p.exists() and (common.ROOT / p).exists():
        p = common.ROOT / p
    if not p.exists():
        raise LaunchError(f"no such file: {path}")
    return p, arg


def _load_module(path: pathlib.Path) -> types.ModuleType:
    if str(common.ROOT) not in sys.path:
        sys.path.insert(0, str(common.ROOT))
    spec = importlib.util.spec_from_file_location(f"_launch_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_config(spec: str):
    path, arg = split_spec(spec)
    return _load_module(path).get_config(arg)


def load_sweep(spec: str) -> list[dict[str, Any]]:
    path, arg = split_spec(spec)
    mod = _load_module(path)
    if not hasattr(mod, "get_hyper"):
        raise LaunchError(f"{path} defines no get_hyper(arg) returning a list of override dicts")
    points = list(mod.get_hyper(arg))
    if not points or not all(isinstance(p, dict) for p in points):
        raise LaunchError(f"{path}: get_hyper({arg!r}) must return a non-empty list of dicts")
    return points


def parse_value(raw: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, 'fixed' -> 'fixed' (what a CLI value most likely means)."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def cli_products(items: Sequence[str]) -> list[dict[str, Any]]:
    """['a=1,2', 'b=x,y'] -> the product [{a:1,b:x}, {a:1,b:y}, {a:2,b:x}, {a:2,b:y}]."""
    axes = []
    for key, raw in common.parse_overrides(items).items():
        values = [parse_value(v) for v in raw.split(",")]
        axes.append([(key, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def expand(sweep_points: Sequence[dict] | None, set_items: Sequence[str], fixed: dict[str, Any]) -> list[dict]:
    """Sweep-file points x --set products, each with the --fixed overrides (point values win)."""
    base = list(sweep_points) if sweep_points else [{}]
    grid = cli_products(set_items) if set_items else [{}]
    points = [{**fixed, **{k.removeprefix("config."): v for k, v in p.items()}, **g} for p in base for g in grid]
    if points == [{}]:
        raise LaunchError("nothing to sweep: give --sweep FILE and/or --set key=v1,v2")
    return points


# ---------------------------------------------------------------------------------------------------------------
# Validation and naming
# ---------------------------------------------------------------------------------------------------------------

def apply_overrides(config, point: dict[str, Any], where: str = ""):
    """A copy of `config` with the point's overrides; unknown keys and wrong types raise LaunchError naming them."""
    c = copy.deepcopy(config)
    for key, value in point.items():
        *parents, leaf = key.split(".")
        node = c
        for i, name in enumerate(parents):
            if not hasattr(node, "keys") or name not in node:
                raise LaunchError(f"unknown config key {key!r}{where}: {'.'.join(parents[:i + 1])!r} does not exist")
            node = node[name]
        if not hasattr(node, "keys") or leaf not in node:
            options = sorted(node.keys()) if hasattr(node, "keys") else []
            raise LaunchError(f"unknown config key {key!r}{where}" + (f" (known here: {options})" if options else ""))
        if hasattr(node[leaf], "keys"):
            raise LaunchError(f"config key {key!r}{where} is a section, not a value")
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = str(value)  # e.g. --set tokenizer=... parsed as a number
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise LaunchError(f"config key {key!r}{where}: cannot set {value!r}: {e}") from e
    return c


def validate_points(config, points: Sequence[dict]) -> None:
    from ssft_jax import config as config_lib

    for i, point in enumerate(points):
        where = f" (sweep point {i}: {point})"
        c = apply_overrides(config, point, where)
        try:
            config_lib.validate(c)
        except config_lib.ConfigError as e:
            raise LaunchError(f"invalid config{where}: {e}") from e


def point_name(point: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """'ssft.method=sft_mixed, seed=1' -> 'method-sft_mixed_seed-1' (last key component, filesystem-safe)."""
    parts = []
    for key in keys if keys is not None else point:
        value = common.format_value(point[key])
        parts.append(f"{key.rsplit('.', 1)[-1]}-{re.sub(r'[^A-Za-z0-9._+-]+', '-', value).strip('-')}")
    return "_".join(parts) or "base"


def named_points(points: Sequence[dict], fixed: dict[str, Any]) -> list[tuple[str, dict]]:
    """Names from the keys that vary (or are swept at all) across points; duplicates get a numeric suffix."""
    swept = [k for k in dict.fromkeys(k for p in points for k in p) if k not in fixed or
             any(p.get(k) != fixed[k] for p in points)]
    varying = [k for k in swept if len({json.dumps(p.get(k), default=str) for p in points}) > 1] or swept
    out, seen = [], {}
    for p in points:
        name = point_name(p, [k for k in varying if k in p])
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}_{seen[name]}", p))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------------------------

def join_workdir(base: str, name: str) -> str:
    return posixpath.join(base, name) if "://" in base else str(pathlib.Path(base) / name)


def local_commands(config_spec: str, base: str, named: Sequence[tuple[str, dict]], python: str) -> list[list[str]]:
    return [common.train_command(config_spec, join_workdir(base, name), point, python=python) for name, point in named]


def tpu_commands(a, named: Sequence[tuple[str, dict]]) -> list[list[str]]:
    from launch import tpu

    out = []
    for name, point in named:
        ns = argparse.Namespace(name=a.tpu, zone=a.zone, project=a.project, gcloud=a.gcloud, config=a.config,
                                workdir=join_workdir(a.workdir, name), detach=False, env=a.env,
                                set=[f"{k}={common.format_value(v)}" for k, v in point.items()])
        out.append(tpu.ssh_command(ns, tpu.run_remote(ns)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/X.py[:arg]")
    p.add_argument("--workdir", required=True, help="base directory: each point runs in BASE/<point-name>")
    p.add_argument("--sweep", default="", help="a sweep file FILE.py[:arg] defining get_hyper(arg)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2", help="a swept key (repeatable; product)")
    p.add_argument("--fixed", action="append", default=[], metavar="KEY=VALUE", help="override for every point")
    p.add_argument("--run", action="store_true", help="run the points (locally one after another, or on --tpu)")
    p.add_argument("--dry_run", action="store_true", help="only print the commands (the default without --run)")
    p.add_argument("--keep_going", action="store_true", help="--run: continue after a failed point")
    p.add_argument("--python", default=sys.executable, help="local runs: the Python interpreter")
    tpu = p.add_argument_group("TPU target (each point: `launch.tpu run` on all workers)")
    tpu.add_argument("--tpu", default="", help="TPU VM name; empty: run locally")
    tpu.add_argument("--zone", default="")
    tpu.add_argument("--project", default="")
    tpu.add_argument("--gcloud", default="gcloud")
    tpu.add_argument("--env", action="append", metavar="NAME=VALUE")
    return p


def summarize(base: str, named: Sequence[tuple[str, dict]]) -> list[str]:
    lines = []
    for name, _ in named:
        f = pathlib.Path(join_workdir(base, name)) / "summary.json"
        if f.exists():
            s = json.loads(f.read_text())
            losses = s.get("losses") or {}
            last = losses[max(losses, key=int)] if losses else float("nan")
            lines.append(f"{name}: method={s['method']} steps={s['final_step']} last_loss={last:.4f}")
        else:
            lines.append(f"{name}: no summary.json")
    return lines


def main(argv=None, runner: Runner | None = None) -> int:
    a = build_parser().parse_args(argv)
    dry = a.dry_run or not a.run
    r = runner or Runner(dry, gcloud=a.gcloud)
    try:
        if a.tpu and not a.zone:
            raise LaunchError("--tpu needs --zone")
        config = load_config(a.config)
        fixed = {k: parse_value(v) for k, v in common.parse_overrides(a.fixed).items()}
        points = expand(load_sweep(a.sweep) if a.sweep else None, a.set, fixed)
        validate_points(config, points)  # every key and every point, before anything runs
        named = named_points(points, fixed)
        commands = tpu_commands(a, named) if a.tpu else local_commands(a.config, a.workdir, named, a.python)
        if a.tpu:
            r.check_tools(a.gcloud)
        failed = []
        for (name, _), cmd in zip(named, commands):
            if dry or a.tpu:
                try:
                    r.run(cmd)
                except LaunchError:
                    if not a.keep_going:
                        raise
                    failed.append(name)
                continue
            print(f"=== {name}: {shlex.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, cwd=common.ROOT, env={**__import__("os").environ,
                                                             "PYTHONPATH": str(common.ROOT)})
            if proc.returncode != 0:
                failed.append(name)
                if not a.keep_going:
                    raise LaunchError(f"point {name} failed with exit code {proc.returncode}")
        if a.run and not dry and not a.tpu:
            print("\n".join(summarize(a.workdir, named)))
        if failed:
            raise LaunchError(f"failed points: {failed}")
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
