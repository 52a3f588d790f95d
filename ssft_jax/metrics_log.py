"""Run logs: a JSON-lines file and TensorBoard summaries in the workdir (process 0 only), and the host-side
histogram of assignment patterns (which tag each trace got), accumulated over the run."""
from __future__ import annotations

import collections
import json
import pathlib
from typing import Any

import jax
import numpy as np
from etils import epath


def is_remote(path) -> bool:
    return str(path).startswith(("gs://", "s3://"))


class MetricsLogger:
    """Appends to `<workdir>/metrics.jsonl`. Object stores cannot append, so on gs:// the file is rewritten whole at
    each write (it is small); TensorBoard event files are written only for local workdirs."""

    def __init__(self, workdir, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._remote = is_remote(workdir)
        self._lines: list[str] = self.path.read_text().splitlines() if self._remote and self.path.exists() else []
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard and not self._remote:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

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
    path = epath.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


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
