"""Test-only fault injection, in one place. Nothing here runs unless a test asks for it:

* `debug.inject_nonfinite` (config): non-finite values written into the step's cost matrix, loss or gradients at
  chosen steps. `make_injector("")` is None, so a normal step is traced without any of it.
* `slow_write_registry(delay_s, items)`: a handler registry for `checkpoint.Checkpointer(handler_registry=...)`
  whose background writes take at least `delay_s`, so a chaos test's `kill -9` lands inside an async write
  (tests/slow_writes.py passes it to the trainer's checkpointer in a subprocess).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import jax.numpy as jnp
import orbax.checkpoint as ocp

INJECT_WHERE = ("cost", "loss", "grad")
INJECT_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


class FaultSpecError(ValueError):
    """A malformed `debug.inject_nonfinite` (config.validate re-raises it as a ConfigError)."""


def parse_inject_nonfinite(spec: str) -> list[tuple[str, int, int | None, float]]:
    """`debug.inject_nonfinite`: comma-separated "where:steps[:value]"; where = cost (C[0, 0, 0] of the first
    question of the batch), loss or grad (one gradient element); steps = K, K-J or K+ (1-based, as logged); value =
    nan (default), inf or -inf. E.g. "cost:2,loss:3,grad:4:inf,loss:10+". -> [(where, first, last or None, value)]."""
    rules = []
    for item in filter(None, (p.strip() for p in (spec or "").split(","))):
        parts = item.split(":")
        try:
            if len(parts) not in (2, 3) or parts[0] not in INJECT_WHERE:
                raise ValueError
            value = INJECT_VALUES[parts[2] if len(parts) == 3 else "nan"]
            steps = parts[1]
            if steps.endswith("+"):
                first, last = int(steps[:-1]), None
            elif "-" in steps:
                a, b = steps.split("-")
                first, last = int(a), int(b)
            else:
                first = last = int(steps)
            if first < 1 or (last is not None and last < first):
                raise ValueError
        except (ValueError, KeyError):
            raise FaultSpecError(
                f"debug.inject_nonfinite: {item!r} is not where:steps[:value] with where in {INJECT_WHERE}, steps K, "
                f"K-J or K+ (K >= 1) and value in {tuple(INJECT_VALUES)}") from None
        rules.append((parts[0], first, last, value))
    return rules


def make_injector(spec: str) -> Callable | None:
    """`(where, step, x, at=None) -> x` overwriting x (where the bool mask `at` holds) when a rule for `where`
    covers `step` (a traced 1-based step number); None when the spec is empty."""
    rules = parse_inject_nonfinite(spec)
    if not rules:
        return None

    def inject(where, step, x, at=None):
        for kind, first, last, value in rules:
            if kind != where:
                continue
            active = step >= first if last is None else (step >= first) & (step <= last)
            if at is not None:
                active = active & at
            x = jnp.where(active, jnp.asarray(value, x.dtype), x)
        return x
    return inject


class SlowJsonCheckpointHandler(ocp.JsonCheckpointHandler):
    """Orbax's JSON handler whose background commit ends no earlier than `delay` seconds after the save began.

    Built on public orbax seams only: `async_save` is the handler interface's extension point, and the futures it
    returns are chained (`ocp.future.ChainedFuture`) with a callback that sleeps out the rest of the delay. The
    item's file is written as usual; what waits is the commit, so the step stays a `*.orbax-checkpoint-tmp`
    directory (never restored) until the delay is over."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    async def async_save(self, directory, item=None, args=None):
        ready_at = time.monotonic() + self.delay
        futures = await super().async_save(directory, item, args) or []
        return [ocp.future.ChainedFuture(futures, cb=lambda: time.sleep(max(0.0, ready_at - time.monotonic())))]


def slow_write_registry(delay_s: float, json_items: Sequence[str]) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The `handler_registry` for a Checkpointer whose JSON items (`json_items`) commit at least `delay_s` after
    the save starts. Items not named here get orbax's default handler for their args, as without a registry."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name in json_items:
        handler = SlowJsonCheckpointHandler(delay_s)
        registry.add(name, ocp.args.JsonSave, handler)
        registry.add(name, ocp.args.JsonRestore, handler)
    return registry
