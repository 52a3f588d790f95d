"""Orbax checkpoints of the whole run: train state (params, optimizer state, step, RNG), data-iterator state and
the config, saved asynchronously, keep-N, restored straight into the target shardings (any mesh shape).

Guarantees (tested in tests/test_checkpoint.py and tests/test_reliability.py):
  * Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a step that
    `all_steps()` lists is whole; a crash or `kill -9` mid-write leaves only the tmp directory, which is never
    restored (the trainer removes such leftovers when it starts).
  * Every save also stores a fingerprint of each array (a position-weighted wrap-around sum of its bits, computed on
    device, independent of the sharding). A restore recomputes it on the restored arrays and refuses the step if any
    differ, so a damaged file can never turn into a silent partial restore (e.g. zero-filled chunks).
  * A write that fails in the background (disk full, permissions) surfaces at the next `save`, `check` or `wait` as
    a `CheckpointError` naming the step that was not saved.
  * `restore_latest(on_corrupt=...)`: an unreadable latest step is either an error naming it ("error") or moved
    aside to `<step>.corrupt` and the previous complete step is restored instead ("fallback").
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import threading
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("state", "data", "config", "integrity", "stats")
# Orbax's per-step metadata file; its `item_handlers` names every item the step was saved with, which tells an item
# that went missing (damage) from one the writing version did not have yet (a checkpoint that predates it).
STEP_METADATA = "_CHECKPOINT_METADATA"
# Items a step can lack because it predates them: restored without them (the caller is told), never silently.
OPTIONAL_ITEMS = ("integrity", "stats")


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns. `stats`: the run's statistics item (None if the step predates it);
    `unverified`: True when the step predates the integrity fingerprints (its arrays could not be checked)."""
    step: int
    state: Any
    data: Any
    config: dict | None
    stats: dict | None = None
    unverified: bool = False


def short_error(e: BaseException, limit: int = 300) -> str:
    """The first meaningful line of a library error: the deepest cause's first line (TensorStore's own, e.g.
    'FAILED_PRECONDITION: Error reading "<array>" ...: Truncated Zstd-compressed stream'), without the ~60 lines of
    spec that orbax puts after it; the whole chain is in the traceback that --debug shows."""
    root, seen = e, {id(e)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    full = str(root)
    text = full.split("See full TensorStore details")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(root).__name__
    if len(text) > limit:
        text = text[:limit] + " ..."
    cut = root is not e or text != full.strip()
    return text + (" [cut: --debug shows the whole error]" if cut else "")


# What a start does with a latest checkpoint that cannot be restored (`restore_latest`; config checkpoint.on_corrupt).
ON_CORRUPT = ("error", "fallback")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the message names the step and directory)."""

    def __init__(self, message: str, *, step: int | None = None):
        super().__init__(message)
        self.step = step


def ensure_writable(directory: epath.Path, what: str) -> None:
    """Create `directory` and prove it takes a file, or raise CheckpointError naming it (before any compute)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # One probe file per process: on a shared filesystem they would otherwise delete each other's.
        probe = directory / f".write_probe.{jax.process_index()}.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{what} {directory} is not writable: {e}") from e


def pending_commit_futures(manager: ocp.CheckpointManager) -> list:
    """The background write futures of the manager's last async save. Orbax exposes only "wait for all" (which
    stops at the first failure) and "is one in progress", not the futures themselves, so this is the one place that
    reads its private attributes; `tests/test_checkpoint.py::test_orbax_private_attributes_we_read_still_exist`
    fails loudly when orbax moves them."""
    async_manager = getattr(getattr(manager, "_checkpointer", None), "_async_manager", None)
    return list(getattr(async_manager, "_commit_futures", None) or ())


class Checkpointer:
    """One manager for a run's `<workdir>/checkpoints`. Items: 'state' (pytree), 'data', 'config' and 'integrity'
    (JSON). `cleanup_tmp`: delete half-written `*.orbax-checkpoint-tmp` steps left by a crash (the trainer only: a
    reader next to a live run must not delete its in-progress write). `handler_registry`: orbax's, for the JSON
    items (None: orbax's own handlers); a hook for tests, e.g. `faults.slow_write_registry`."""

    def __init__(self, directory: str | os.PathLike | epath.Path, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True, cleanup_tmp: bool = False,
                 handler_registry: ocp.handlers.DefaultCheckpointHandlerRegistry | None = None):
        # epath: local paths and gs:// alike (multi-host runs need a directory every host sees).
        self.directory = epath.Path(directory)
        if not str(directory).startswith(("gs://", "s3://")):
            self.directory = epath.Path(os.path.abspath(directory))
        ensure_writable(self.directory, "checkpoint directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
        )
        if handler_registry is not None:
            self._manager = ocp.CheckpointManager(self.directory, handler_registry=handler_registry, options=options)
        else:
            self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        self._pending: int | None = None  # step of the async write in flight

    # -- saving -------------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: Any = None, config: dict | None = None, *,
             stats: dict | None = None, force: bool = False) -> bool:
        """Start saving `step` (async: returns once device buffers are copied). True if a save was started; False
        if `step` is already saved (e.g. a finished run started again). A failure of the previous async write is
        raised here first, naming that step."""
        self.wait()
        if step in self.all_steps():
            return False
        try:
            args = {"state": ocp.args.StandardSave(state), "integrity": ocp.args.JsonSave(state_fingerprint(state))}
            if data_state is not None:
                args["data"] = ocp.args.JsonSave(data_state)
            if config is not None:
                args["config"] = ocp.args.JsonSave(config)
            if stats is not None:
                args["stats"] = ocp.args.JsonSave(stats)
            started = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # orbax raises assorted OS/value errors: name the step and place
            raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: {e}", step=step) from e
        if started:
            self._pending = step
        return started

    def check(self) -> None:
        """Non-blocking: if the async write in flight has ended with an error, raise it (naming its step)."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until pending async saves are on disk; errors from the background write surface here."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._drain_writes()
            step, self._pending = self._pending, None
            raise CheckpointError(
                f"writing checkpoint step {step} to {self.directory} failed: {e} (step {step} was NOT saved; the "
                f"last complete checkpoint is step {self.latest_step()})", step=step) from e
        self._pending = None

    def _drain_writes(self, timeout: float = 300.0) -> None:
        """After a failed async write, wait (best effort) for the writes of its other items: orbax stops waiting at
        the first failure and leaves them running, so a retry in the same process could race with them."""
        for f in pending_commit_futures(self._manager):
            try:
                f.result(timeout=timeout)
            except Exception:  # noqa: BLE001  (the first failure is the one reported)
                pass

    # -- restoring ----------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def state_shape_mismatches(self, step: int, abstract_state: Any) -> list[str]:
        """The state arrays whose saved shape differs from `abstract_state`'s, as "path: saved -> expected", read
        from the step's metadata (no array is read). Non-empty means the checkpoint belongs to another model or
        config, which is a config mismatch, not damage; empty when the metadata cannot be read (restore reports
        that)."""
        try:
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            saved = getattr(saved, "tree", saved)
        except Exception:  # noqa: BLE001  (unreadable metadata: restore's integrity checks name the problem)
            return []
        saved_flat = {jax.tree_util.keystr(k): tuple(getattr(v, "shape", ()))
                      for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
        out = []
        for k, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            key = jax.tree_util.keystr(k)
            if key in saved_flat and saved_flat[key] != tuple(v.shape):
                out.append(f"{key}: {saved_flat[key]} -> {tuple(v.shape)}")
        return out

    def saved_items(self, step: int) -> set[str] | None:
        """The items step `step` was saved with (its orbax metadata's item handlers), or None when that file is
        missing or unreadable (then nothing can be told apart: every known item is expected)."""
        try:
            meta = json.loads((self.directory / str(step) / STEP_METADATA).read_text())
            handlers = meta["item_handlers"]
            if not isinstance(handlers, Mapping):
                return None
            return set(handlers)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def restore(self, step: int | None, abstract_state: Any, *, require: tuple[str, ...] = ("state",),
                validate: Mapping[str, Callable[[int, Any], None]] | None = None) -> Restored:
        """`Restored(step, state, data, config, stats, unverified)` of `step` (default: latest), with arrays placed
        as `abstract_state` says: a pytree of `jax.ShapeDtypeStruct` carrying the target shardings (a different mesh
        is fine).

        Raises CheckpointError naming the step if an item in `require` is missing, an item the step was saved with
        is missing (its metadata lists it), a file cannot be read, the restored arrays differ from the saved
        fingerprint, or `validate[item](step, value)` rejects an item's content (raising ValueError, KeyError or
        TypeError: e.g. a data-iterator state that is valid JSON but not the iterator's). A step that predates an
        optional item ('integrity', 'stats') restores without it and says so in `unverified` / `stats=None`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        step_dir = self.directory / str(step)
        saved_with = self.saved_items(step)
        expected = set(require) | (saved_with if saved_with is not None else set(OPTIONAL_ITEMS))
        missing = sorted(name for name in expected if name in ITEMS and not (step_dir / name).exists())
        if missing:
            how = ("listed in its metadata" if saved_with is not None else
                   f"its {STEP_METADATA} is unreadable, so a missing item cannot be told from one it never had")
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: item(s) {missing} "
                                  f"missing ({how})", step=step)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        for name in ITEMS[1:]:
            if (step_dir / name).exists():
                args[name] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read: {short_error(e)}",
                                  step=step) from e
        saved = restored.get("integrity")
        if saved is not None:
            if not isinstance(saved, Mapping):
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: its integrity item is "
                                      "not a fingerprint table", step=step)
            got = state_fingerprint(restored["state"])
            if set(saved) != set(got) and len(saved) == len(got):  # same leaves under other names: compare in order
                saved, got = dict(enumerate(saved.values())), dict(enumerate(got.values()))
            bad = sorted(str(k) for k in set(saved) & set(got) if saved[k] != got[k])
            if bad:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} is corrupt: {len(bad)} restored array(s) differ from "
                    f"what was saved: {bad[:5]}{' ...' if len(bad) > 5 else ''}", step=step)
        for name, check in (validate or {}).items():
            if restored.get(name) is None:
                continue
            try:
                check(step, restored[name])
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: its {name!r} item "
                                      f"is not valid ({type(e).__name__}: {short_error(e)})", step=step) from e
        return Restored(step, restored["state"], restored.get("data"), restored.get("config"),
                        restored.get("stats"), unverified=saved is None)

    def restore_latest(self, abstract_state: Any, *, on_corrupt: str = "error",
                       require: tuple[str, ...] = ("state",),
                       validate: Mapping[str, Callable[[int, Any], None]] | None = None) -> Restored | None:
        """`restore` of the latest complete step, or None if there is none.

        on_corrupt="error": an unreadable latest step raises CheckpointError naming it. "fallback": it is moved
        aside to `<step>.corrupt` (kept for inspection, never listed again) with a warning, and the previous step is
        tried, and so on; if every step is unreadable, CheckpointError."""
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        moved = []
        while (step := self.latest_step()) is not None:
            try:
                restored = self.restore(step, abstract_state, require=require, validate=validate)
                if restored.unverified:
                    logging.warning("checkpoint step %d in %s predates the integrity fingerprints: restored without "
                                    "verifying its arrays", step, self.directory)
                return restored
            except CheckpointError as e:
                if on_corrupt == "error":
                    raise CheckpointError(
                        f"{e}\n(--config.checkpoint.on_corrupt=fallback moves it aside and resumes from the previous "
                        "complete step instead)", step=step) from e
                aside = self._move_aside(step)
                moved.append(step)
                logging.warning("checkpoint step %d is unusable (%s); moved it to %s, falling back to the previous "
                                "step", step, e, aside)
        if moved:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: every step ({moved}) was corrupt and "
                                  "was moved aside", step=moved[0])
        return None

    def _move_aside(self, step: int) -> epath.Path:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt"
        k = 1
        while dst.exists():
            dst, k = self.directory / f"{step}.corrupt{k}", k + 1
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"ssft_checkpoint_move_aside_{step}")
        self._manager.reload()
        return dst

    def close(self) -> None:
        self._manager.close()


# ---------------------------------------------------------------------------------------------------------------
# Integrity fingerprints
# ---------------------------------------------------------------------------------------------------------------

def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """uint32: sum over elements of mix(bits) * (2 * flat_index + 1), wrapping. Modular sums do not depend on the
    reduction order, so the value is the same on any mesh; a zeroed, dropped or moved chunk changes it."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8-byte dtypes gain a trailing dim of 2
    flat = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(bits.ndim)):
        flat = flat + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[d]
    mixed = (bits ^ (bits >> 15)) * jnp.uint32(0x2C1B3C6D)
    mixed = mixed ^ (mixed >> 12)
    return jnp.sum(mixed * (flat * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(leaves):
    return [_leaf_fingerprint(x) for x in leaves]


def state_fingerprint(tree: Any) -> dict[str, int]:
    """{leaf path: uint32 fingerprint} of a pytree of arrays (computed on device, one small jitted reduction)."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    groups: dict[frozenset, list[int]] = {}  # one jitted call per device set (a state may mix placements)
    leaves = [jnp.asarray(x) for _, x in paths_leaves]
    for k, x in enumerate(leaves):
        groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(k)
    values: list[Any] = [None] * len(leaves)
    for idx in groups.values():
        for k, v in zip(idx, _fingerprints([leaves[k] for k in idx])):
            values[k] = v
    values = jax.device_get(values)
    return {jax.tree_util.keystr(p): int(np.asarray(v)) for (p, _), v in zip(paths_leaves, values)}


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live pytree: the restore target that keeps its placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class PreemptionGuard:
    """Turns SIGTERM (the preemption signal on TPU VMs / Kubernetes) into a flag the train loop polls, so the loop
    saves a final checkpoint and exits cleanly instead of dying mid-step. Also honours JAX's multi-host
    preemption sync point where the runtime provides one.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in signals:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        logging.warning("received signal %d: will checkpoint and stop after this step", signum)
        self._event.set()

    def should_stop(self, step: int) -> bool:
        if self._event.is_set():
            return True
        try:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except Exception:  # no preemption service on this platform (CPU, single host)
            return False

    def restore_handlers(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def config_to_json(config: Any) -> dict:
    """A JSON-able dict of an ml_collections ConfigDict (or a plain dict)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(as_dict, default=str))


def read_json_item(path: str | os.PathLike) -> dict:
    """A JSON item of a saved step (e.g. `<dir>/<step>/config`), read without a CheckpointManager: a folder holding
    one JSON file (Orbax's JsonCheckpointHandler layout) or the file itself. For tools that only need the config."""
    path = pathlib.Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    files = [p for p in sorted(path.glob("*"), key=lambda p: p.name != "metadata")
             if p.is_file() and not p.name.startswith(".")]
    for p in files:
        try:
            return json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    raise FileNotFoundError(f"no JSON item in {path}")
