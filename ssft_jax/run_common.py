"""What every stage's run loop shares (the SSFT trainer, `ssft_jax.train`, and GFPO, `ssft_jax.gfpo`): the
workdir check, the resume-config check, the atomic summary, the HF export and the divergence error."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib

import jax
from etils import epath

from ssft_jax import checkpoint as ckpt_lib
from ssft_jax import config as config_lib
from ssft_jax import hf_io, metrics_log, tokenization
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


def export_hf(dest, cfg, params, tokenizer, tags):
    """HF folder at `dest` (local, or gs:// via a local staging folder: safetensors writes local files only)."""
    eos = tokenization.eos_token_ids(tokenizer)
    if not metrics_log.is_remote(dest):
        return hf_io.save_hf_folder(dest, cfg, params, tokenizer=tokenizer, eos_token_ids=eos, tags=tags)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        local = hf_io.save_hf_folder(pathlib.Path(tmp) / "hf_export", cfg, params, tokenizer=tokenizer, eos_token_ids=eos,
                                     tags=tags)
        if jax.process_index() == 0:
            dest.mkdir(parents=True, exist_ok=True)
            for f in local.iterdir():
                (dest / f.name).write_bytes(f.read_bytes())
    return dest
