"""Run logs: a JSON-lines file and TensorBoard summaries in the workdir (process 0 only). (The histogram of
assignment patterns over the run is part of the run statistics, `ssft_jax.run_stats`.)"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import uuid
from typing import Any

import jax
import numpy as np
from etils import epath


def is_remote(path) -> bool:
    return str(path).startswith(("gs://", "s3://"))


class MetricsLogger:
    """One record per logged step, to `<workdir>/metrics.jsonl`, TensorBoard (`<workdir>/tensorboard`) and, when a
    project is named, Weights & Biases. Process 0 only.

    Object stores cannot append, so on gs:// metrics.jsonl is rewritten whole at each write (it is small), and the
    TensorBoard events go to a local staging folder that is copied to `<workdir>/tensorboard` with `etils.epath` at
    every write (tensorboardX writes local files only here: its own GCS path needs extra packages).

    `resume_step`: the step the run (re)starts from (0 for a fresh start). Records past it were logged by an earlier
    process that died before checkpointing them and will be logged again, so they are dropped first (as is a line
    torn by a kill mid-write), and TensorBoard purges its events past it: the log holds exactly one record per
    logged step however often the run was interrupted.
    `config`: the resolved run config (JSON), written as TensorBoard hparams and as the wandb run's config.
    List-valued metrics (tag counts, per-tag accuracy) are logged per index and, to wandb, also as histograms.
    """

    def __init__(self, workdir, *, tensorboard: bool = True, resume_step: int | None = None, wandb_project: str = "",
                 wandb_entity: str = "", config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._remote = is_remote(workdir)
        self._lines: list[str] = self.path.read_text().splitlines() if self._remote and self.path.exists() else []
        self._tb = self._wandb = None
        self._tb_remote = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            tb_dir = epath.Path(workdir) / "tensorboard"
            local = tb_dir
            if self._remote:
                import tempfile
                local, self._tb_remote = pathlib.Path(tempfile.mkdtemp(prefix="ssft_tb_")), tb_dir
            purge = resume_step + 1 if resume_step is not None and tb_dir.exists() else None
            self._tb = SummaryWriter(str(local), purge_step=purge)
            self._tb_local = pathlib.Path(str(local))
            if config is not None:
                self._tb.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)
                _write_hparams(self._tb, config)
        if wandb_project:
            self._wandb = _start_wandb(workdir, wandb_project, wandb_entity, config)

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                if int(json.loads(line)["step"]) <= resume_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # torn or foreign line
                continue
        if len(kept) == len(lines):
            return
        text = "".join(line + "\n" for line in kept)
        if self._remote:
            self._lines = kept
            self.path.write_text(text)
        else:  # atomic: a kill during the rewrite leaves the old or the new file, never half of one
            tmp = self.path.parent / (self.path.name + ".tmp")
            tmp.write_text(text)
            os.replace(str(tmp), str(self.path))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for k, v in metrics.items():
            v = np.asarray(v)
            record[k] = v.item() if v.ndim == 0 else v.tolist()
        line = json.dumps(record)
        if self._remote:
            self._lines.append(line)
            self.path.write_text("\n".join(self._lines) + "\n")
        else:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{k}/{i}", x, step)
            self._tb.flush()
            if self._tb_remote is not None:
                self._tb_remote.mkdir(parents=True, exist_ok=True)
                for f in self._tb_local.iterdir():
                    (self._tb_remote / f.name).write_bytes(f.read_bytes())
        if self._wandb is not None:
            self._wandb.log(_wandb_record(record), step=int(step))

    def log_histogram(self, name: str, counts: dict[str, int], step: int) -> None:
        """A named histogram (e.g. the assignment patterns: pattern -> count) as a wandb table and a TB text."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(name, "\n".join(f"{k}: {v}" for k, v in counts.items()), step)
        if self._wandb is not None:
            import wandb
            table = wandb.Table(columns=["pattern", "count"], data=[[k, int(v)] for k, v in counts.items()])
            self._wandb.log({name: wandb.plot.bar(table, "pattern", "count", title=name)}, step=int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _flat_hparams(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def _write_hparams(writer, config: dict) -> None:
    """The config as TensorBoard hparams in the run's own event file (not tensorboardX's default sub-run)."""
    from tensorboardX.summary import hparams

    exp, ssi, sei = hparams(_flat_hparams(config), {"loss": 0.0})
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)


def _start_wandb(workdir, project: str, entity: str, config: dict | None):
    """A wandb run that a resumed process continues (its id is kept in the workdir). WANDB_MODE=offline logs to
    `<workdir>/wandb` without an account; `wandb sync` uploads it later."""
    try:
        import wandb
    except ImportError:
        raise ImportError("logging.wandb_project is set but wandb is not installed: pip install '.[wandb]' "
                          "(or clear --config.logging.wandb_project)") from None
    id_file = epath.Path(workdir) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    local_dir = str(workdir) if not is_remote(workdir) else None
    return wandb.init(project=project, entity=entity or None, id=run_id, resume="allow", dir=local_dir,
                      config=config, name=pathlib.Path(str(workdir)).name)


def _wandb_record(record: dict) -> dict:
    out = {}
    for k, v in record.items():
        if k == "step":
            continue
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            for i, x in enumerate(v):
                out[f"{k}/{i}"] = x
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


# INFO lines from libraries that bury the run's own: orbax logs every checkpoint step (over a hundred lines in a
# six-step run), optax one line per schedule piece when warmup is 0, and jax names every backend it did not find
# ("Unable to initialize backend 'tpu'" on every CPU run). Their warnings and errors always pass.
_QUIET_LIBRARY_PATHS = ("orbax", f"optax{os.sep}schedules", f"jax{os.sep}_src{os.sep}xla_bridge")


class _LibraryInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _QUIET_LIBRARY_PATHS)


def quiet_library_logs() -> None:
    """Keep only the warnings and errors of the libraries in `_QUIET_LIBRARY_PATHS` (the CLIs call this)."""
    for name in ("absl", ""):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LibraryInfo) for f in logger.filters):
            logger.addFilter(_LibraryInfo())
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _LibraryInfo) for f in h.filters):
            h.addFilter(_LibraryInfo())


# Measured wall-clock figures: they differ between two runs of the same steps, unlike every other logged number.
WALL_CLOCK_KEYS = ("step_time_s", "tokens_per_s", "slots_per_s", "mfu", "eval/seconds")


def without_wall_clock(records: list[dict]) -> list[dict]:
    """The records with the wall-clock figures left out: what a resumed run reproduces exactly."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in records]


def read_metrics(workdir) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` (a last line torn by a crash mid-write is left out)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    out = []
    for k, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if k != len(lines) - 1:
                raise
    return out


def plot_training_curves(workdir, out_path) -> pathlib.Path | None:
    """Loss, matched vs unmatched NLL, learning rate and throughput of a run against its step (metrics.jsonl), and
    for a GFPO run its rewards, policy entropy and KL, and pi per tag, as one PNG; None when the run logged nothing.
    `python -m ssft_jax.evaluate --workdir W` writes it beside its own figures."""
    records = read_metrics(workdir)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", ["loss", "matched_nll", "unmatched_nll"]), ("learning rate", ["lr"]),
              ("tokens / s", ["tokens_per_s", "slots_per_s"]), ("held-out (greedy)", ["eval/pass1_think1",
                                                                                       "eval/pass1_coverage",
                                                                                       "eval/consN_native"]),
              # GFPO: what the tag policy learns from and where it goes
              ("GFPO reward", ["reward", "policy_reward", "accuracy", "answer_rate"]),
              ("GFPO policy", ["entropy", "kl_to_init"]), ("GFPO pi per tag (batch mean)", ["pi_mean"])]
    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.ravel(), panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if k in r]
            marker = "." if len(pts) < 30 else None
            if pts and isinstance(pts[0][1], (list, tuple)):  # a vector per step (pi over the tags): one line each
                for t in range(len(pts[0][1])):
                    ax.plot([p[0] for p in pts], [p[1][t] for p in pts], marker=marker, label=f"<think{t + 1}>")
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=k)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
