"""What every stage's run loop shares (the SSFT trainer, `ssft_jax.train`, and GFPO, `ssft_jax.gfpo`): opening a
run (workdir check, checkpointer, resume-config check, config.json), restoring it, its metrics logger, progress bar
and save schedule, the loop's cleanup, the atomic summary, the HF export and the divergence error."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from typing import Any, Callable

import jax
from etils import epath

from ssft_jax import checkpoint as ckpt_lib, cli as cli_lib, config as config_lib, hf_io, metrics_log, tokenization
from ssft_jax.run_stats import RunStats


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps had non-finite loss or gradients."""


def prepare_workdir(workdir: epath.Path) -> None:
    """Create the workdir and check it is writable before any compute (a clear error, not a crash at step 200)."""
    if jax.process_index() == 0:
        ckpt_lib.ensure_writable(workdir, "workdir")


def check_resumed_config(checkpointer: ckpt_lib.Checkpointer, config) -> None:
    """Compare the config saved with the latest checkpoint with this one (`config.check_resume`): refuse a change of
    the run's meaning unless accepted, log the rest."""
    step = checkpointer.latest_step()
    if step is None:
        return
    try:
        saved = ckpt_lib.read_json_item(checkpointer.directory / str(step) / "config")
    except (FileNotFoundError, ValueError):  # a damaged step: restore_latest reports it with its own message
        return
    if not _looks_like_config(saved):  # valid JSON, but not a config: restore's item check names it
        return
    for line in config_lib.check_resume(saved, config):
        logging.info("resume from step %d: %s", step, line)


def open_run(config, workdir: epath.Path) -> tuple[ckpt_lib.Checkpointer, dict]:
    """The workdir checked writable before any compute, its checkpointer (half-written steps of a crashed earlier
    process removed: they are never restored anyway), the resume-config check (a changed method, model, data or
    schedule refuses here) and config.json (process 0). -> (checkpointer, the config as JSON: written at start,
    saved with every checkpoint, logged as hparams)."""
    prepare_workdir(workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save, cleanup_tmp=True)
    check_resumed_config(checkpointer, config)
    config_json = ckpt_lib.config_to_json(config)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
    return checkpointer, config_json


def restore(checkpointer: ckpt_lib.Checkpointer, state, config, *, num_tags: int, per_step: str, data):
    """The latest complete checkpoint (None for a new run) and the run statistics to continue from. data: applies
    the data item (see `item_validators`)."""
    restored = checkpointer.restore_latest(
        ckpt_lib.abstract_like(state), require=("state", "data"), on_corrupt=config.checkpoint.on_corrupt,
        validate=item_validators(num_tags, per_step=per_step, data=data))
    return restored, restored_stats(restored, num_tags, per_step=per_step)


def open_logger(config, workdir: epath.Path, start: int, config_json: dict) -> metrics_log.MetricsLogger:
    """One record per logged step, in metrics.jsonl, TensorBoard and (optionally) wandb."""
    return metrics_log.MetricsLogger(workdir, resume_step=start, tensorboard=config.logging.tensorboard,
                                     wandb_project=config.logging.wandb_project,
                                     wandb_entity=config.logging.wandb_entity, config=config_json)


def progress_bar(progress: bool, total: int, initial: int, desc: str):
    """A tqdm bar on process 0 when `progress`, else None."""
    if not progress or jax.process_index() != 0:
        return None
    from tqdm import tqdm  # only runs with a bar need it
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def should_save(step: int, config, num_steps: int) -> bool:
    """A periodic checkpoint after `step` (the last step's is the final save, forced)."""
    return step % config.checkpoint.every_steps == 0 and step < num_steps


def _looks_like_config(item) -> bool:
    return isinstance(item, dict) and all(isinstance(item.get(k), dict) for k in ("model", "ssft", "data"))


def _check_config_item(step: int, item) -> None:
    if not _looks_like_config(item):
        raise ValueError("not a run config (an object with 'model', 'ssft' and 'data' sections)")


def item_validators(num_tags: int, *, per_step: str, data):
    """What a stage checks in each restored checkpoint item before using it (`Checkpointer.restore(validate=)`), so
    damage that is still valid JSON is a CheckpointError naming the step (and `on_corrupt=fallback` applies) rather
    than a KeyError later. data: applies the data-iterator item (raising on content it cannot use)."""
    return {"data": lambda step, item: data(item),
            "config": _check_config_item,
            "stats": lambda step, item: RunStats.from_json(item, num_tags=num_tags, step=step, per_step=per_step)}


def restored_stats(restored, num_tags: int, *, per_step: str) -> RunStats:
    """The run statistics to continue from: fresh for a new run, the checkpoint's for a resumed one. A checkpoint
    written before the statistics were checkpointed covers only the steps after it, and the run says so."""
    if restored is None:
        return RunStats(num_tags)
    if restored.stats is None:
        logging.warning("checkpoint step %d predates the run-statistics item: summary.json's %s, tag counts and "
                        "assignment patterns cover steps %d.. only", restored.step, per_step, restored.step + 1)
        return RunStats(num_tags, since=restored.step)
    return RunStats.from_json(restored.stats, num_tags=num_tags, step=restored.step, per_step=per_step)


def stats_summary(stats: RunStats, *, per_step: str) -> dict:
    """summary.json's view of the run statistics (every step of the run, however often it was resumed)."""
    out = {per_step: dict(getattr(stats, per_step)), "tag_counts": stats.tag_counts.tolist(),
           "skipped_steps": list(stats.skipped_steps)}
    if stats.since:
        out["stats_cover_steps_from"] = stats.since + 1
    return out


@contextlib.contextmanager
def loop_cleanup(checkpointer: ckpt_lib.Checkpointer, guard: ckpt_lib.PreemptionGuard,
                 logger: metrics_log.MetricsLogger, bar=None):
    """Around a stage's step loop. On any failure (a crash, Ctrl-C) let an in-flight checkpoint write of an earlier
    step finish, so the next start has it (its own failure is secondary: logged); always close the progress bar,
    restore the signal handlers and close the metrics logger."""
    try:
        yield
    except BaseException:
        try:
            checkpointer.close()
        except Exception as e:  # noqa: BLE001
            logging.error("while stopping: %s", e)
        raise
    finally:
        if bar is not None:
            bar.close()
        guard.restore_handlers()
        logger.close()


def write_summary(workdir: epath.Path, summary: dict) -> None:
    """summary.json; atomic on a local disk (a kill mid-write leaves the previous summary, never half of one)."""
    text = json.dumps(summary, indent=2, default=str)
    if metrics_log.is_remote(workdir):
        (workdir / "summary.json").write_text(text)
    else:
        (workdir / "summary.json.tmp").write_text(text)
        os.replace(str(workdir / "summary.json.tmp"), str(workdir / "summary.json"))


def export_hf(dest, cfg, params, tokenizer, tags, dtype: str | None = None):
    """HF folder at `dest` (local, or gs:// via a local staging folder: safetensors writes local files only), its
    weights in `dtype` (`export.dtype`; "" or None: the params' dtype)."""
    dtype = dtype or None
    eos = tokenization.eos_token_ids(tokenizer)
    if not metrics_log.is_remote(dest):
        return hf_io.save_hf_folder(dest, cfg, params, tokenizer=tokenizer, eos_token_ids=eos, tags=tags, dtype=dtype)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        local = hf_io.save_hf_folder(
            pathlib.Path(tmp) / "hf_export", cfg, params, tokenizer=tokenizer, eos_token_ids=eos, tags=tags, dtype=dtype
        )
        if jax.process_index() == 0:
            dest.mkdir(parents=True, exist_ok=True)
            for f in local.iterdir():
                (dest / f.name).write_bytes(f.read_bytes())
    return dest


def export_model(workdir: epath.Path, config, cfg, params, tokenizer, tags, *, lora_spec=None, frozen=None):
    """A stage's exports: `<workdir>/hf_export` (a LoRA run's adapters merged into its base, in the base's dtype
    unless `export.dtype` says otherwise) and, for a LoRA run with `lora.export_adapter`, the PEFT adapter folder
    `<workdir>/lora_adapter` with the tokenizer (its grown vocabulary: special tags). Every process calls it."""
    from ssft_jax import lora as lora_lib

    merged = params if lora_spec is None else lora_lib.merge(cfg, lora_spec, frozen, params, dtype=cfg.param_dtype)
    export_dir = export_hf(workdir / "hf_export", cfg, merged, tokenizer, tags, dtype=config.export.dtype)
    if lora_spec is not None and config.lora.export_adapter and not metrics_log.is_remote(workdir):
        adapter = lora_lib.save_peft_adapter(pathlib.Path(str(workdir / "lora_adapter")), cfg, lora_spec, params,
                                             base_model=config.model.hf_dir)
        if jax.process_index() == 0:
            tokenization.save_tokenizer(tokenizer, adapter, tags=tags)
    return export_dir


def report_first_step(seconds: float | None, compiles: int, bar) -> None:
    """Log the run's first step on its own line (it holds the compilation) and restart the progress bar's clock
    after it, so its rate and ETA are those of the steps that follow."""
    if seconds is not None:
        logging.info("first step: %.1f s, compilation included (%d compile%s); the rates logged leave it out",
                     seconds, compiles, "" if compiles == 1 else "s")
    if bar is not None and not bar.disable:  # tqdm.reset restarts its clock and smoothing; the steps done stay
        done = bar.n
        bar.reset()
        bar.initial = bar.n = bar.last_print_n = done  # its rate is (n - initial) / (now - start_t)


def summary_table(summary: dict, workdir) -> str:
    """The end of a run on the console: a few lines (the whole summary is `<workdir>/summary.json`)."""
    rows = [("steps", f"{summary.get('start_step', 0)} -> {summary['final_step']}"
             + (" (stopped early: run the same command to resume)" if summary.get("stopped_early") else ""))]
    per_step = summary.get("losses") or summary.get("rewards") or {}
    if per_step:
        values = list(per_step.values())
        rows.append(("loss" if summary.get("losses") else "mean reward", f"{values[0]:.4f} -> {values[-1]:.4f}"))
    if summary.get("tag_counts") is not None:
        rows.append(("traces per tag", " ".join(str(int(n)) for n in summary["tag_counts"])))
    if summary.get("skipped_steps"):
        rows.append(("skipped steps", str(summary["skipped_steps"])))
    if summary.get("seconds") is not None:
        rows.append(("wall time", f"{summary['seconds']:.1f} s"))
    if summary.get("export_dir"):
        rows.append(("HF export", str(summary["export_dir"])))
    rows.append(("summary", str(epath.Path(workdir) / "summary.json")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def help_config_requested() -> bool:
    """The absl CLIs' `--help_config`: print the config's keys (`config_help.describe`) and say so; otherwise
    require `--workdir` (a ConfigError: one `error:` line)."""
    from absl import flags

    from ssft_jax import config_help
    if flags.FLAGS.help_config:
        print(config_help.describe(flags.FLAGS.config))
        return True
    if not flags.FLAGS.workdir:
        raise config_lib.ConfigError("--workdir is required (where checkpoints, logs and the HF export go)")
    return False


def publish_export(export_dir, config, summary: dict) -> dict:
    """The export's model card (README.md, from the run's config and summary) and, with `export.hub_repo_id`, its
    upload to the Hub; the summary entries that record it. Process 0 only; a local export only (a gs:// export is
    published from where it is read)."""
    if not export_dir or jax.process_index() != 0 or metrics_log.is_remote(export_dir):
        return {}
    from ssft_jax import hub
    hub.write_model_card(export_dir, config, summary)
    if not config.export.hub_repo_id:
        return {}
    url = hub.push_to_hub(export_dir, config.export.hub_repo_id, private=config.export.hub_private)
    logging.info("uploaded %s to the Hub: %s", export_dir, url)
    return {"hub_url": url}


def stage_cli(run: Callable[[Any, str], dict], *, config_help: str, workdir_help: str,
              extra_flags: Callable[[], None] | None = None,
              apply_flags: Callable[[Any, Any], None] | None = None) -> None:
    """The whole command line of a training stage (`ssft-train`, `ssft-gfpo`): --config (a config file,
    --config.KEY=VALUE overrides), the stage's own flags (`extra_flags` defines them, `apply_flags(config, FLAGS)`
    writes them into the config), --workdir, --debug and --help_config; then `run(config, workdir)` and the run's
    summary table. (Here, not in `cli`, which every console script imports and which stays free of the run
    modules: `cli` -> run_common -> hub -> cli would be a cycle.)"""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    if extra_flags is not None:
        extra_flags()
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_bool("debug", False, "show the traceback of a config, data or checkpoint error")
    flags.DEFINE_bool("help_config", False, "print every config key with its value (overrides applied) and its "
                      "documentation, then exit")
    flags.mark_flags_as_required(["config"])  # --workdir too, unless --help_config (help_config_requested)

    def main(argv):
        del argv
        metrics_log.quiet_library_logs()
        if help_config_requested():
            return
        config = flags.FLAGS.config
        if apply_flags is not None:
            apply_flags(config, flags.FLAGS)
        summary = run(config, flags.FLAGS.workdir)
        print(summary_table(summary, flags.FLAGS.workdir))

    cli_lib.absl_run(main)
