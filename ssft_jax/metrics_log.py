"""Run logs: a JSON-lines file and TensorBoard summaries in the workdir (process 0 only), and the host-side
histogram of assignment patterns (which tag each trace got), accumulated over the run."""
from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from etils import epath


def is_remote(path) -> bool:
    return str(path).startswith(("gs://", "s3://"))


class MetricsLogger:
    """Appends to `<workdir>/metrics.jsonl`. Object stores cannot append, so on gs:// the file is rewritten whole at
    each write (it is small); TensorBoard event files are written only for local workdirs.

    `resume_step`: the step the run (re)starts from (0 for a fresh start). Records past it were logged by an earlier
    process that died before checkpointing them and will be logged again, so they are dropped first (as is a line
    torn by a kill mid-write), and TensorBoard purges its events past it: the log holds exactly one record per
    logged step however often the run was interrupted.
    """

    def __init__(self, workdir, *, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._remote = is_remote(workdir)
        self._lines: list[str] = self.path.read_text().splitlines() if self._remote and self.path.exists() else []
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                self._truncate(resume_step)
            if tensorboard and not self._remote:
                from tensorboardX import SummaryWriter
                tb_dir = pathlib.Path(workdir) / "tensorboard"
                purge = resume_step + 1 if resume_step is not None and tb_dir.exists() else None
                self._tb = SummaryWriter(str(tb_dir), purge_step=purge)

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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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


class AssignmentHistogram:
    """Counts of assignment patterns: the tuple (tag of trace 1, ..., tag of trace M) per question and step.

    Padded traces (-1) are kept in the pattern so questions with fewer traces show up as their own patterns.
    """

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    def update(self, assignments: np.ndarray) -> None:
        for row in np.asarray(assignments).tolist():
            if any(t >= 0 for t in row):
                self.counts[tuple(row)] += 1

    def top(self, k: int = 10) -> list[tuple[str, int]]:
        return [(" ".join(str(t) for t in p), n) for p, n in self.counts.most_common(k)]
