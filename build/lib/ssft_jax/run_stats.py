"""The run's statistics over all of its steps (what `summary.json` reports about them), checkpointed with every
step as the 'stats' item, so a run resumed after a kill, a SIGTERM or a plain re-run reports the whole run and not
only the share of its last process. Evaluation's coverage tag and GFPO's `valid_tags="used"` read `tag_counts`
from that summary, so a resume that forgot them would silently pick the wrong tags.

Everything here is a pure function of the steps' metrics, so a resumed run's statistics equal the uninterrupted
run's exactly (JSON keeps Python floats exactly, and the patterns keep their first-seen order, which breaks ties in
`top`).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping

import numpy as np

VERSION = 1


@dataclasses.dataclass
class RunStats:
    """Per-step losses (SSFT) or mean rewards (GFPO), matching statistics and skipped steps of steps 1..`step`."""
    num_tags: int
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    rewards: dict[int, float] = dataclasses.field(default_factory=dict)
    tag_counts: np.ndarray = None  # [num_tags] int64: traces matched to each tag, over the run
    patterns: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_steps: list[int] = dataclasses.field(default_factory=list)  # steps whose update was skipped (non-finite)
    # The statistics cover steps since+1..: 0, unless the run resumed from a checkpoint written before this item
    # existed (then the steps before it are unknown, and the summary says so rather than pretend).
    since: int = 0
    rollout_tokens: int = 0  # GFPO: tokens sampled over the run

    def __post_init__(self):
        if self.tag_counts is None:
            self.tag_counts = np.zeros(self.num_tags, np.int64)

    # -- accumulating -------------------------------------------------------------------------------------------
    def add_assignments(self, assignments: np.ndarray) -> None:
        """One step's [B, M] assignment (tag per trace, -1 for padded traces): the pattern per question. Padded
        traces are kept in the pattern, so questions with fewer traces show up as their own patterns."""
        for row in np.asarray(assignments).tolist():
            if any(t >= 0 for t in row):
                self.patterns[tuple(row)] += 1

    def trace_tag_counts(self) -> list[list[int]]:
        """[M][num_tags]: how often trace position j was matched to each tag over the run (from the patterns). For a
        dataset whose trace j is always the same source (`gsm8k_teachers`), row j is that source's tag histogram."""
        num_traces = max((len(p) for p in self.patterns), default=0)
        counts = np.zeros((num_traces, self.num_tags), np.int64)
        for pattern, n in self.patterns.items():
            for j, tag in enumerate(pattern):
                if tag >= 0:
                    counts[j, tag] += n
        return counts.tolist()

    def top_patterns(self, k: int = 20) -> list[tuple[str, int]]:
        return [(" ".join(str(t) for t in p), n) for p, n in self.patterns.most_common(k)]

    # -- the checkpoint item ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION,
                "losses": {str(k): v for k, v in self.losses.items()},
                "rewards": {str(k): v for k, v in self.rewards.items()},
                "tag_counts": [int(x) for x in self.tag_counts],
                "patterns": [[list(p), int(n)] for p, n in self.patterns.items()],  # first-seen order kept
                "skipped_steps": [int(s) for s in self.skipped_steps],
                "since": int(self.since), "rollout_tokens": int(self.rollout_tokens)}

    @classmethod
    def from_json(cls, item: Any, *, num_tags: int, step: int, per_step: str) -> "RunStats":
        """The statistics saved with checkpoint `step`; ValueError naming what is wrong when the item is not what
        `to_json` wrote for a run of `num_tags` tags at that step (`per_step`: "losses" (SSFT) or "rewards" (GFPO),
        the record every step adds)."""
        if not isinstance(item, Mapping):
            raise ValueError(f"expected an object, got {type(item).__name__}")
        missing = [k for k in ("version", "losses", "rewards", "tag_counts", "patterns", "skipped_steps", "since")
                   if k not in item]
        if missing:
            raise ValueError(f"field(s) {missing} missing")
        if item["version"] != VERSION:
            raise ValueError(f"version {item['version']!r}, this code reads {VERSION}")
        since = item["since"]
        if not isinstance(since, int) or isinstance(since, bool) or not 0 <= since <= step:
            raise ValueError(f"'since' must be a step in 0..{step}, got {since!r}")
        out = cls(num_tags, since=since)
        for name in ("losses", "rewards"):
            values = item[name]
            if not isinstance(values, Mapping):
                raise ValueError(f"'{name}' is not an object")
            try:
                parsed = {int(k): float(v) for k, v in values.items()}
            except (TypeError, ValueError):
                raise ValueError(f"'{name}' must map step numbers to numbers") from None
            setattr(out, name, dict(sorted(parsed.items())))
        steps = sorted(getattr(out, per_step))
        if steps != list(range(since + 1, step + 1)):
            raise ValueError(f"'{per_step}' must hold steps {since + 1}..{step}, has {len(steps)} step(s)"
                             + (f" ({steps[0]}..{steps[-1]})" if steps else ""))
        counts = item["tag_counts"]
        if (not isinstance(counts, list) or len(counts) != num_tags
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
            raise ValueError(f"'tag_counts' must be {num_tags} non-negative integers")
        out.tag_counts = np.asarray(counts, np.int64)
        patterns = item["patterns"]
        if not isinstance(patterns, list):
            raise ValueError("'patterns' is not a list")
        for entry in patterns:
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], list)
                    or not all(isinstance(t, int) and -1 <= t < num_tags for t in entry[0])
                    or not isinstance(entry[1], int) or entry[1] <= 0):
                raise ValueError(f"'patterns' entry {entry!r} is not [[tag per trace], count]")
            out.patterns[tuple(entry[0])] += entry[1]
        skipped = item["skipped_steps"]
        if not isinstance(skipped, list) or not all(isinstance(s, int) and since < s <= step for s in skipped):
            raise ValueError(f"'skipped_steps' must be steps in {since + 1}..{step}")
        out.skipped_steps = list(skipped)
        tokens = item.get("rollout_tokens", 0)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError("'rollout_tokens' must be a non-negative integer")
        out.rollout_tokens = tokens
        return out
