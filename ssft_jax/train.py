"""The SSFT trainer: config -> mesh -> run pieces (`assembly`) -> data -> state -> loop -> checkpoints -> HF export.

    python -m ssft_jax.train --config configs/demo.py[:arg] --workdir DIR [--config.ssft.method=random ...]

A run resumes from the latest complete checkpoint in `<workdir>/checkpoints` (weights, optimizer, step, RNG and
the data iterator's position), so re-running the same command after a crash or preemption continues the same run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ssft_jax import (
    assembly,
    checkpoint as ckpt_lib,
    config as config_lib,
    data as data_lib,
    datasets,
    lora as lora_lib,
    losses as losses_lib,
    memory_plan,
    mesh as mesh_lib,
    metrics_log,
    run_common,
    run_monitor,
    tokenization,
    train_state,
)
from ssft_jax.run_common import TrainingDivergedError  # noqa: F401  (raised by the loop; callers catch it here)

# ---------------------------------------------------------------------------------------------------------------
# The run: `run` reads on one screen; each concern is a named helper below it
# ---------------------------------------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, progress: bool = True,
        stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) and return a summary: losses, diagnostics, paths.

    stop_after: end this invocation after that many steps (checkpointed; e.g. a time-boxed Colab session); running
    again resumes.
    """
    r = open_training(config, epath.Path(workdir))
    logger = run_common.open_logger(config, r.workdir, r.start, r.config_json)
    guard = ckpt_lib.PreemptionGuard()
    bar = run_common.progress_bar(progress, r.num_steps, r.start, config.ssft.method)
    records = StepRecords(r, logger, bar)
    t0, stopped_early, step, pending = time.perf_counter(), False, r.start, None
    with run_common.loop_cleanup(r.checkpointer, guard, logger, bar):
        while step < r.num_steps:
            if guard.should_stop(step) or (stop_after is not None and step - r.start >= stop_after):
                stopped_early = True
                break
            r.checkpointer.check()  # a failed background write stops the run here, naming its step
            host_batch = next(r.iterator)
            records.before_step(step + 1, host_batch)
            r.state, metrics = r.train_step(r.state, mesh_lib.to_global(host_batch, r.mesh), r.table, r.lengths,
                                            *r.frozen_args)
            step += 1
            records.maybe_evaluate(step)
            if pending is not None:  # read one step late, so dispatch stays asynchronous
                records.consume(*pending)
            pending = (step, metrics)
            if run_common.should_save(step, config, r.num_steps):
                # Log this step before its checkpoint can exist: a restart from it then never lacks a record.
                records.consume(*pending)
                pending = None
                save(r, step)
            if bar is not None:
                bar.update(1)
        if pending is not None:
            records.consume(*pending)
        logger.log_histogram("assignment_patterns", dict(r.stats.top_patterns(20)), step)
        save(r, step, force=True)
        r.checkpointer.wait()
    elapsed = time.perf_counter() - t0
    export_dir = export(r) if config.export_hf and not stopped_early else None
    return finish(r, step, stopped_early, elapsed, export_dir)


@dataclasses.dataclass
class Training:
    """Everything `run` builds before its loop (`open_training`); `state` is the live train state."""
    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Any
    checkpointer: ckpt_lib.Checkpointer
    config_json: dict
    inputs: assembly.RunInputs
    num_steps: int
    lora_spec: Any  # None: full fine-tuning
    frozen: Any  # LoRA's frozen base (the step's fifth argument), else None
    state: dict
    iterator: Any
    start: int
    stats: Any  # RunStats
    step_config: ml_collections.ConfigDict  # config with ssft.cost_layout="auto" decided
    train_step: Any  # step_jit.CountedJit
    table: jax.Array
    lengths: jax.Array

    @property
    def frozen_args(self) -> tuple:
        return () if self.lora_spec is None else (self.frozen,)

    def model_params(self, params):
        """The weights the model runs with: the state's, or LoRA's base with the state's adapters applied."""
        if self.lora_spec is None:
            return params
        return lora_lib.adapted_params(self.inputs.model_config, self.lora_spec, self.frozen, params)


def open_training(config: ml_collections.ConfigDict, workdir: epath.Path) -> Training:
    """Config checked, mesh, run files, model and data (`assembly.build_inputs`), optimizer and state, restored
    from the latest checkpoint when there is one, and the jitted step."""
    # Before anything touches the JAX backend (even device_count): jax.distributed.initialize must come first.
    mesh_lib.maybe_initialize_distributed()
    if config.get("stage", "ssft") != "ssft":
        raise config_lib.ConfigError(f"stage={config.stage!r}: a GFPO config runs with `python -m ssft_jax.gfpo`, "
                                     "not the SSFT trainer")
    config_lib.validate(config, jax.device_count())
    datasets.check_source(config)
    m = config.mesh
    mesh = mesh_lib.make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[: m.num_devices or None])
    checkpointer, config_json = run_common.open_run(config, workdir)

    inputs = assembly.build_inputs(config, mesh)
    tokenizer, cfg, params, tags, layout, questions, report, table, lengths = inputs
    if jax.process_index() == 0 and not metrics_log.is_remote(workdir):
        # The tokenizer training uses, forking-tag tokens included: evaluation straight from the workdir reads it.
        tokenization.save_tokenizer(tokenizer, pathlib.Path(str(workdir / "tokenizer")), tags=tags)
    if len(questions) < config.batch_size:
        raise config_lib.ConfigError(
            f"only {len(questions)} usable questions for batch_size={config.batch_size} ({report.summary()})")
    num_steps = config.num_steps or math.ceil(config.num_epochs * len(questions) / config.batch_size)
    logging.info("%d questions, %d steps", len(questions), num_steps)  # the data report was logged as it was built

    optimizer = assembly.make_optimizer(config, num_steps)
    # LoRA: the state's params are the adapters only; the frozen base is the step's fifth argument.
    lora_spec, frozen, params = assembly.split_lora(config, cfg, params, tokenizer, tags, mesh)
    state = train_state.init_state(params, optimizer, config.seed, mesh)
    iterator = data_lib.make_iterator(questions, layout, table, lengths, seed=config.seed, epochs=None,
                                      process_index=jax.process_index(), process_count=jax.process_count())
    refuse_another_models_checkpoint(checkpointer, state)
    restored, stats = run_common.restore(checkpointer, state, config, num_tags=config.ssft.num_tags,
                                         per_step="losses", data=lambda d: iterator.set_state(d))
    start = 0
    if restored is not None:
        start, state = restored.step, restored.state
        iterator.set_state(restored.data)
        logging.info("resumed from step %d", start)

    position = iterator.get_state()
    first = next(iterator)  # its shapes fix the jit; then rewind, so no batch is skipped
    iterator.set_state(position)
    # ssft.cost_layout="auto" decided for this model and device (logged); the saved config keeps "auto"
    step_config = memory_plan.with_resolved_cost_layout(config, layout, mesh)
    train_step = assembly.make_step(step_config, cfg, layout, optimizer, state, mesh_lib.to_global(first, mesh),
                                    mesh, lora=lora_spec, frozen=frozen)
    return Training(config, workdir, mesh, checkpointer, config_json, inputs, num_steps, lora_spec, frozen, state,
                    iterator, start, stats, step_config, train_step, jnp.asarray(table), jnp.asarray(lengths))


def refuse_another_models_checkpoint(checkpointer: ckpt_lib.Checkpointer, state) -> None:
    """A checkpoint whose arrays do not fit this config's state is a config mismatch: say so, never suggest
    treating it as damaged."""
    latest = checkpointer.latest_step()
    mismatched = checkpointer.state_shape_mismatches(latest, state) if latest is not None else []
    if mismatched:
        raise config_lib.ConfigError(
            f"checkpoint step {latest} in {checkpointer.directory} does not fit the model this config builds (a config "
            "mismatch, not a damaged checkpoint):\n  " + "\n  ".join(mismatched[:8])
            + "\nUse the config the run was started with, or a new --workdir")


class StepRecords:
    """What the loop does with each step's metrics: throughput, run statistics, the divergence guard, in-training
    evaluation, the first step's compile line, and one record per logged step (metrics.jsonl, TensorBoard, the
    progress bar)."""

    def __init__(self, r: Training, logger: metrics_log.MetricsLogger, bar):
        c, (_, cfg, _, tags, layout, *_) = r.config, r.inputs
        self.r, self.logger, self.bar = r, logger, bar
        method = losses_lib.get_method(c.ssft.method)
        self.with_costs = method.needs_costs or c.ssft.baseline_costs
        self.schedule = train_state.learning_rate_schedule(c.optim, r.num_steps)
        self.throughput = run_monitor.make_throughput(r.step_config, cfg, layout, r.mesh, self.with_costs)
        self.evaluator: Callable | None = (
            run_monitor.InTrainingEval(c, r.inputs.tokenizer, tags, shared_tag=not method.distinct_tags)
            if c.eval_every else None)
        self.eval_results: dict[int, dict] = {}  # step -> eval scalars, merged into that step's record
        self.deferred_at: dict[int, tuple] = {}  # step -> (questions_deferred, questions or None): packed only
        self.consecutive_skips = 0

    def before_step(self, step: int, host_batch: dict) -> None:
        layout = self.r.inputs.layout
        if layout.packed:  # questions deferred so far by the packed iterator (part of its resumable state)
            # pack_fill="tokens": the questions in this batch vary (empty slots have question_index -1)
            n_questions = (int(np.sum(host_batch["question_index"] >= 0)) if layout.pack_fill == "tokens"
                           else None)
            self.deferred_at[step] = (self.r.iterator.deferred_total, n_questions)
        self.throughput.add_batch(step, host_batch, with_cost_pass=self.with_costs)

    def maybe_evaluate(self, step: int) -> None:
        if self.evaluator is not None and step % self.r.config.eval_every == 0:
            # On this step's weights, before the next step donates them; blocks until they are ready.
            t_eval = time.perf_counter()
            self.eval_results[step] = self.evaluator(self.r.inputs.model_config,
                                                     self.r.model_params(self.r.state["params"]),
                                                     self.r.stats.tag_counts)
            self.throughput.exclude(time.perf_counter() - t_eval)

    def consume(self, step: int, m) -> None:
        r, c, stats = self.r, self.r.config, self.r.stats
        was_ready = all(x.is_ready() for x in jax.tree.leaves(m) if hasattr(x, "is_ready"))
        m = jax.device_get(m)
        self.throughput.finished(step, was_ready=was_ready)
        if step in self.deferred_at:
            m["questions_deferred"], n_questions = self.deferred_at.pop(step)
            if n_questions is not None:
                m["questions"] = n_questions
        stats.add_assignments(m.pop("assignments"))
        if not self.with_costs:  # no cost pass ran: matched/unmatched NLL and the gap are undefined, not 0
            for k in ("matched_nll", "unmatched_nll", "second_best_gap", "second_best_gap_min"):
                m.pop(k, None)
        stats.tag_counts += np.asarray(m["tag_counts"], np.int64)
        stats.losses[step] = float(m["loss"])
        if m["step_skipped"]:
            stats.skipped_steps.append(step)
        self.consecutive_skips = self.consecutive_skips + 1 if m["step_skipped"] else 0
        diverged = self.consecutive_skips > c.max_consecutive_skips
        if step == r.start + 1:  # compilation is this step's: its own line, out of the bar's rate and ETA
            run_common.report_first_step(self.throughput.step_seconds(step), r.train_step.compiles, self.bar)
        if step % c.log_every == 0 or step == r.num_steps or diverged or step in self.eval_results:
            m.update(lr=float(self.schedule(step - 1)), **self.throughput.scalars(step),
                     **self.eval_results.pop(step, {}))
            self.logger.write(step, m)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{m['loss']:.3f}", **({"matched": f"{m['matched_nll']:.3f}"}
                                                                if "matched_nll" in m else {}),
                                     tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}")
        if diverged:
            k = self.consecutive_skips
            raise TrainingDivergedError(
                f"training diverged: {k} consecutive steps (steps {step - k + 1}..{step}) had a non-finite loss or "
                f"gradient norm, more than max_consecutive_skips={c.max_consecutive_skips}; none of them changed the "
                f"weights. Stopping. The latest checkpoint is step {r.checkpointer.latest_step()}; lower "
                "optim.learning_rate or check the data before resuming")


def save(r: Training, step: int, *, force: bool = False) -> None:
    r.checkpointer.save(step, r.state, data_state=r.iterator.get_state(), config=r.config_json,
                        stats=r.stats.to_json(), force=force)


def export(r: Training) -> epath.Path | None:
    """hf_export/ (LoRA: merged into the base), and LoRA's PEFT adapter folder when asked for."""
    return run_common.export_model(r.workdir, r.config, r.inputs.model_config, r.state["params"], r.inputs.tokenizer,
                                   r.inputs.tags, lora_spec=r.lora_spec, frozen=r.frozen)


def finish(r: Training, step: int, stopped_early: bool, elapsed: float, export_dir) -> dict[str, Any]:
    """summary.json (process 0) and the run's result: the summary plus the live state and model pieces."""
    stats = r.stats
    summary = {
        "method": r.config.ssft.method,
        "start_step": r.start,
        "final_step": step,
        "stopped_early": stopped_early,
        **run_common.stats_summary(stats, per_step="losses"),
        "assignment_patterns": stats.top_patterns(20),
        "trace_tag_counts": stats.trace_tag_counts(),
        "seconds": elapsed,
        "compiles": r.train_step.compiles,
        "questions": len(r.inputs.questions),
        "validation": r.inputs.report.summary(),
        "export_dir": str(export_dir) if export_dir else None,
    }
    summary.update(run_common.publish_export(export_dir, r.config, summary))
    if jax.process_index() == 0:
        run_common.write_summary(r.workdir, summary)
    r.checkpointer.close()
    return {**summary, "state": r.state, "model_config": r.inputs.model_config, "tokenizer": r.inputs.tokenizer,
            "tags": r.inputs.tags, **({"lora": r.lora_spec, "frozen": r.frozen} if r.lora_spec is not None else {})}


def cli() -> None:
    """`ssft-train` / `python -m ssft_jax.train`: absl flags, the config as an ml_collections config file."""
    run_common.stage_cli(run, config_help="a configs/*.py file, optionally with :arg (e.g. configs/demo.py:tiny); "
                         "any field overridden with --config.a.b=value",
                         workdir_help="where checkpoints, logs and the HF export go (local or gs://)")


if __name__ == "__main__":
    cli()
