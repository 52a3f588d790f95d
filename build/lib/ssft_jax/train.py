"""The SSFT trainer: config -> mesh -> run pieces (`assembly`) -> data -> state -> loop -> checkpoints -> HF export.

    python -m ssft_jax.train --config configs/demo.py[:arg] --workdir DIR [--config.ssft.method=random ...]

A run resumes from the latest complete checkpoint in `<workdir>/checkpoints` (weights, optimizer, step, RNG and
the data iterator's position), so re-running the same command after a crash or preemption continues the same run.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ssft_jax import assembly
from ssft_jax import checkpoint as ckpt_lib
from ssft_jax import config as config_lib
from ssft_jax import data as data_lib
from ssft_jax import datasets
from ssft_jax import memory_plan, mesh as mesh_lib, metrics_log, model as model_lib, run_monitor, tokenization
from ssft_jax import lora as lora_lib, losses as losses_lib, run_common, train_state
# Shared with the GFPO stage; re-exported here, where callers have always found them.
from ssft_jax.run_common import (TrainingDivergedError, check_resumed_config, export_hf, loop_cleanup,  # noqa: F401
                                 prepare_workdir, write_summary)


class RunInputs(NamedTuple):
    """Everything a run builds from its config before the train state: model, tags and tokenized data."""
    tokenizer: Any
    model_config: model_lib.ModelConfig
    params: model_lib.Params
    tags: tokenization.ForkingTags
    layout: data_lib.LayoutConfig
    questions: list
    report: Any  # data_lib's validation report (kept / skipped / truncated counts)
    tag_table: np.ndarray
    tag_lengths: np.ndarray


def build_inputs(config, mesh) -> RunInputs:
    """The run's pieces (`assembly.build`: tokenizer, model on `mesh`, tags, layout) and its tokenized training
    questions: the part of `run` before the optimizer, for tests and tools that drive the step themselves."""
    pieces = assembly.build(config, mesh=mesh)
    train_records, _ = datasets.build_records(config)
    questions, report = data_lib.tokenize_records(
        train_records, pieces.tokenizer, pieces.tags, pieces.layout, on_bad_record=config.data.on_bad_record,
        overlong=config.data.overlong, extra_traces=config.data.extra_traces, format=config.data.format)
    if config.data.num_questions:
        questions = questions[: config.data.num_questions]
    return RunInputs(pieces.tokenizer, pieces.model_config, pieces.params, pieces.tags, pieces.layout, questions,
                     report, pieces.tag_table, pieces.tag_lengths)


def to_global(batch: dict, mesh) -> dict:
    """Per-process numpy batch -> global jax arrays split over the data-parallel axes."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, np.ndim(x)), np.asarray(x)),
        batch)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, progress: bool = True,
        stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) and return a summary: losses, diagnostics, paths.

    stop_after: end this invocation after that many steps (checkpointed; e.g. a time-boxed Colab session); running
    again resumes.
    """
    # Before anything touches the JAX backend (even device_count): jax.distributed.initialize must come first.
    mesh_lib.maybe_initialize_distributed()
    workdir = epath.Path(workdir)
    if config.get("stage", "ssft") != "ssft":
        raise config_lib.ConfigError(f"stage={config.stage!r}: a GFPO config runs with `python -m ssft_jax.gfpo`, "
                                     "not the SSFT trainer")
    config_lib.validate(config, jax.device_count())
    datasets.check_source(config)
    m = config.mesh
    mesh = mesh_lib.make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[: m.num_devices or None])
    prepare_workdir(workdir)
    # cleanup_tmp: half-written steps of a crashed earlier process are removed (they are never restored anyway).
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save, cleanup_tmp=True)
    check_resumed_config(checkpointer, config)  # a changed method, model, data or schedule refuses here
    config_json = ckpt_lib.config_to_json(config)  # written at start, saved with every checkpoint, logged as hparams
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))

    tokenizer, cfg, params, tags, layout, questions, report, table, lengths = build_inputs(config, mesh)
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
    frozen_args = () if lora_spec is None else (frozen,)
    model_params = ((lambda p: p) if lora_spec is None
                    else (lambda p: lora_lib.adapted_params(cfg, lora_spec, frozen, p)))
    state = train_state.init_state(params, optimizer, config.seed, mesh)
    iterator = data_lib.make_iterator(questions, layout, table, lengths, seed=config.seed, epochs=None)
    start = 0
    latest = checkpointer.latest_step()
    mismatched = checkpointer.state_shape_mismatches(latest, state) if latest is not None else []
    if mismatched:  # another model's checkpoint: say so, never suggest treating it as damaged
        raise config_lib.ConfigError(
            f"checkpoint step {latest} in {checkpointer.directory} does not fit the model this config builds (a config "
            "mismatch, not a damaged checkpoint):\n  " + "\n  ".join(mismatched[:8])
            + "\nUse the config the run was started with, or a new --workdir")
    restored = checkpointer.restore_latest(
        ckpt_lib.abstract_like(state), require=("state", "data"), on_corrupt=config.checkpoint.on_corrupt,
        validate=run_common.item_validators(config.ssft.num_tags, per_step="losses", data=lambda d: iterator.set_state(d)))
    stats = run_common.restored_stats(restored, config.ssft.num_tags, per_step="losses")
    if restored is not None:
        start, state = restored.step, restored.state
        iterator.set_state(restored.data)
        logging.info("resumed from step %d", start)

    position = iterator.get_state()
    first = next(iterator)  # its shapes fix the jit; then rewind, so no batch is skipped
    iterator.set_state(position)
    # ssft.cost_layout="auto" decided for this model and device (logged); the saved config keeps "auto"
    step_config = memory_plan.with_resolved_cost_layout(config, layout, mesh)
    train_step = assembly.make_step(step_config, cfg, layout, optimizer, state, to_global(first, mesh), mesh,
                                    lora=lora_spec, frozen=frozen)
    table_d, lengths_d = jnp.asarray(table), jnp.asarray(lengths)

    method = losses_lib.get_method(config.ssft.method)
    with_costs = method.needs_costs or config.ssft.baseline_costs
    schedule = train_state.learning_rate_schedule(config.optim, num_steps)
    throughput = run_monitor.make_throughput(step_config, cfg, layout, mesh, with_costs)
    evaluator = (run_monitor.InTrainingEval(config, tokenizer, tags, shared_tag=not method.distinct_tags)
                 if config.eval_every else None)
    eval_results: dict[int, dict] = {}  # step -> eval scalars, merged into that step's record
    # One record per logged step, in metrics.jsonl, TensorBoard and (optionally) wandb.
    logger = metrics_log.MetricsLogger(workdir, resume_step=start, tensorboard=config.logging.tensorboard,
                                       wandb_project=config.logging.wandb_project,
                                       wandb_entity=config.logging.wandb_entity, config=config_json)
    guard = ckpt_lib.PreemptionGuard()
    pending = None  # metrics of the previous step, read one step late so dispatch stays asynchronous
    consecutive_skips = 0
    deferred_at: dict[int, tuple] = {}  # step -> (questions_deferred, questions or None): packed layout only

    def consume(step_done: int, m) -> None:
        nonlocal consecutive_skips
        was_ready = all(x.is_ready() for x in jax.tree.leaves(m) if hasattr(x, "is_ready"))
        m = jax.device_get(m)
        throughput.finished(step_done, was_ready=was_ready)
        if step_done in deferred_at:
            m["questions_deferred"], n_questions = deferred_at.pop(step_done)
            if n_questions is not None:
                m["questions"] = n_questions
        stats.add_assignments(m.pop("assignments"))
        if not with_costs:  # no cost pass ran: matched/unmatched NLL and the gap are undefined, not 0
            for k in ("matched_nll", "unmatched_nll", "second_best_gap", "second_best_gap_min"):
                m.pop(k, None)
        stats.tag_counts += np.asarray(m["tag_counts"], np.int64)
        stats.losses[step_done] = float(m["loss"])
        if m["step_skipped"]:
            stats.skipped_steps.append(step_done)
        consecutive_skips = consecutive_skips + 1 if m["step_skipped"] else 0
        diverged = consecutive_skips > config.max_consecutive_skips
        if step_done == start + 1:  # compilation is this step's: its own line, out of the bar's rate and ETA
            run_common.report_first_step(throughput.step_seconds(step_done), train_step.compiles, bar)
        if (step_done % config.log_every == 0 or step_done == num_steps or diverged
                or step_done in eval_results):
            m.update(lr=float(schedule(step_done - 1)), **throughput.scalars(step_done),
                     **eval_results.pop(step_done, {}))
            logger.write(step_done, m)
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.3f}", **({"matched": f"{m['matched_nll']:.3f}"}
                                                           if "matched_nll" in m else {}),
                                tok_s=f"{m['tokens_per_s']:.0f}", lr=f"{m['lr']:.2e}")
        if diverged:
            raise TrainingDivergedError(
                f"training diverged: {consecutive_skips} consecutive steps (steps {step_done - consecutive_skips + 1}"
                f"..{step_done}) had a non-finite loss or gradient norm, more than max_consecutive_skips="
                f"{config.max_consecutive_skips}; none of them changed the weights. Stopping. The latest checkpoint "
                f"is step {checkpointer.latest_step()}; lower optim.learning_rate or check the data before resuming")

    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=num_steps, initial=start, desc=f"{config.ssft.method}", dynamic_ncols=True)
    t0, stopped_early = time.perf_counter(), False
    step = start
    with loop_cleanup(checkpointer, guard, logger, bar):
        while step < num_steps:
            if guard.should_stop(step) or (stop_after is not None and step - start >= stop_after):
                stopped_early = True
                break
            checkpointer.check()  # a failed background write stops the run here, naming its step
            host_batch = next(iterator)
            if layout.packed:  # questions deferred so far by the packed iterator (part of its resumable state)
                # pack_fill="tokens": the questions in this batch vary (empty slots have question_index -1)
                n_questions = (int(np.sum(host_batch["question_index"] >= 0)) if layout.pack_fill == "tokens"
                               else None)
                deferred_at[step + 1] = (iterator.deferred_total, n_questions)
            throughput.add_batch(step + 1, host_batch, with_cost_pass=with_costs)
            state, metrics = train_step(state, to_global(host_batch, mesh), table_d, lengths_d, *frozen_args)
            step += 1
            if evaluator is not None and step % config.eval_every == 0:
                # On this step's weights, before the next step donates them; blocks until they are ready.
                t_eval = time.perf_counter()
                eval_results[step] = evaluator(cfg, model_params(state["params"]), stats.tag_counts)
                throughput.exclude(time.perf_counter() - t_eval)
            if pending is not None:
                consume(*pending)
            pending = (step, metrics)
            if step % config.checkpoint.every_steps == 0 and step < num_steps:
                # Log this step before its checkpoint can exist: a restart from it then never lacks a record.
                consume(*pending)
                pending = None
                checkpointer.save(step, state, data_state=iterator.get_state(), config=config_json,
                                  stats=stats.to_json())
            if bar is not None:
                bar.update(1)
        if pending is not None:
            consume(*pending)
        logger.log_histogram("assignment_patterns", dict(stats.top_patterns(20)), step)
        checkpointer.save(step, state, data_state=iterator.get_state(), config=config_json, stats=stats.to_json(),
                          force=True)
        checkpointer.wait()
    elapsed = time.perf_counter() - t0

    export_dir = None
    if config.export_hf and not stopped_early:
        export_params = (state["params"] if lora_spec is None
                         else lora_lib.merge(cfg, lora_spec, frozen, state["params"], dtype=cfg.param_dtype))
        export_dir = export_hf(workdir / "hf_export", cfg, export_params, tokenizer, tags,
                               dtype=config.export.dtype or None)
        if lora_spec is not None and config.lora.export_adapter and not metrics_log.is_remote(workdir):
            adapter = lora_lib.save_peft_adapter(pathlib.Path(str(workdir / "lora_adapter")), cfg, lora_spec,
                                                 state["params"], base_model=config.model.hf_dir)
            if jax.process_index() == 0:  # the grown vocabulary (special tags) comes with the adapter
                tokenization.save_tokenizer(tokenizer, adapter, tags=tags)
    summary = {
        "method": config.ssft.method,
        "start_step": start,
        "final_step": step,
        "stopped_early": stopped_early,
        **run_common.stats_summary(stats, per_step="losses"),
        "assignment_patterns": stats.top_patterns(20),
        "trace_tag_counts": stats.trace_tag_counts(),
        "seconds": elapsed,
        "compiles": train_step.compiles,
        "questions": len(questions),
        "validation": report.summary(),
        "export_dir": str(export_dir) if export_dir else None,
    }
    summary.update(run_common.publish_export(export_dir, config, summary))
    if jax.process_index() == 0:
        write_summary(workdir, summary)
    checkpointer.close()
    return {**summary, "state": state, "model_config": cfg, "tokenizer": tokenizer, "tags": tags,
            **({"lora": lora_spec, "frozen": frozen} if lora_spec is not None else {})}


def main(argv):
    del argv
    from absl import flags
    metrics_log.quiet_library_logs()
    if run_common.help_config_requested():
        return
    summary = run(flags.FLAGS.config, flags.FLAGS.workdir)
    print(run_common.summary_table(summary, flags.FLAGS.workdir))


def cli() -> None:
    """`ssft-train` / `python -m ssft_jax.train`: absl flags, the config as an ml_collections config file."""
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    from ssft_jax import cli as cli_lib

    config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally with :arg (e.g. "
                                    "configs/demo.py:tiny); any field overridden with --config.a.b=value",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, logs and the HF export go (local or gs://)")
    flags.DEFINE_bool("debug", False, "show the traceback of a config, data or checkpoint error")
    flags.DEFINE_bool("help_config", False, "print every config key with its value (overrides applied) and its "
                      "documentation, then exit")
    flags.mark_flags_as_required(["config"])  # --workdir too, unless --help_config (checked in main)
    cli_lib.absl_run(main)


if __name__ == "__main__":
    cli()
