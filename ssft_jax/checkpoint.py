"""Orbax checkpoints of the whole run: train state (params, optimizer state, step, RNG), data-iterator state and
the config, saved asynchronously, keep-N, restored straight into the target shardings (any mesh shape).

Orbax writes each step into a temporary directory and renames it when complete, so a step that `all_steps()`
lists is whole; a crash mid-write leaves only a tmp directory, which is never restored.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the message names the step and directory)."""


class Checkpointer:
    """One manager for a run's `<workdir>/checkpoints`. Items: 'state' (pytree), 'data' and 'config' (JSON)."""

    def __init__(self, directory: str | os.PathLike | epath.Path, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True):
        # epath: local paths and gs:// alike (multi-host runs need a directory every host sees).
        self.directory = epath.Path(directory)
        if not str(directory).startswith(("gs://", "s3://")):
            self.directory = epath.Path(os.path.abspath(directory))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # One probe file per process: on a shared filesystem they would otherwise delete each other's.
            probe = self.directory / f".write_probe.{jax.process_index()}.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {self.directory} is not writable: {e}") from e
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"), options=options)

    # -- saving -------------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: Any = None, config: dict | None = None, *, force: bool = False) -> bool:
        """Start saving `step` (async: returns once device buffers are copied). True if a save was started."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        if config is not None:
            args["config"] = ocp.args.JsonSave(config)
        try:
            return self._manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # orbax raises assorted OS/value errors: name the step and place
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {e}") from e

    def wait(self) -> None:
        """Block until pending async saves are on disk; errors from the background write surface here."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"finishing a checkpoint write in {self.directory} failed: {e}") from e

    # -- restoring ----------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, step: int | None, abstract_state: Any) -> tuple[int, Any, Any, dict | None]:
        """(step, state, data_state, config) of `step` (default: latest), with arrays placed as `abstract_state`
        says: a pytree of `jax.ShapeDtypeStruct` carrying the target shardings (a different mesh is fine)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        step_dir = self.directory / str(step)
        for name in ("data", "config"):
            if (step_dir / name).exists():
                args[name] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CheckpointError(f"restoring step {step} from {self.directory} failed: {e}") from e
        return step, restored["state"], restored.get("data"), restored.get("config")

    def close(self) -> None:
        self._manager.close()


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
