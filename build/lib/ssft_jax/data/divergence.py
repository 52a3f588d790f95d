"""The L advisor: where a question's traces first differ, and whether the cost prefix L sees it.

The cost C[i, j] reads only the first L tokens of trace j. Two traces of a question that agree on those L tokens
have the same cost under every tag, so the matching cannot tell them apart: they end up sharing tags across steps
and their modes merge. Measured once at data load: for every pair of a question's traces, the index of the first
token where they differ (pairs where one trace is a prefix of the other: the shorter length; identical traces are
left out, no L separates them). A pair is separated by L iff that index is < L.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

# Warn when more than this share of trace pairs agree on their first L tokens.
WARN_SHARE = 0.05


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where a and b differ; min(len) if one is a prefix of the other; None if equal."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    if diff.size:
        return int(diff[0])
    return None if a.size == b.size else n


@dataclasses.dataclass(frozen=True)
class DivergenceReport:
    """The distribution of first-divergence indices over all trace pairs, against the cost prefix L."""

    cost_len: int
    points: np.ndarray  # [pairs] first-divergence index per trace pair
    identical_pairs: int

    @property
    def num_pairs(self) -> int:
        return int(self.points.size)

    @property
    def share_unseparated(self) -> float:
        """Share of pairs that agree on their first L tokens (the matching cannot tell them apart)."""
        return float(np.mean(self.points >= self.cost_len)) if self.points.size else 0.0

    def quantile(self, q: float) -> int:
        return int(np.quantile(self.points, q, method="higher")) if self.points.size else 0

    @property
    def suggested_cost_len(self) -> int:
        """The smallest L that separates all but WARN_SHARE of the pairs."""
        return self.quantile(1.0 - WARN_SHARE) + 1 if self.points.size else 1

    @property
    def warn(self) -> bool:
        return self.share_unseparated > WARN_SHARE

    def summary(self) -> str:
        if not self.points.size:
            return "trace divergence: no pairs of distinct traces"
        s = (f"trace divergence over {self.num_pairs} trace pairs: first differing token at median "
             f"{self.quantile(0.5)}, p90 {self.quantile(0.9)}, max {int(self.points.max())}; "
             f"{self.share_unseparated:.1%} of pairs agree on their first L={self.cost_len} tokens")
        if self.identical_pairs:
            s += f"; {self.identical_pairs} pairs of identical traces"
        return s

    def warning(self) -> str | None:
        if not self.warn:
            return None
        return (f"ssft.cost_prefix_len L={self.cost_len} is shorter than where {self.share_unseparated:.0%} of trace "
                f"pairs first differ: the cost matrix cannot tell those traces apart, so their modes may share tags. "
                f"L={self.suggested_cost_len} separates {1 - WARN_SHARE:.0%} of pairs ({self.summary()})")

    def as_dict(self) -> dict:
        return {"cost_len": self.cost_len, "pairs": self.num_pairs, "identical_pairs": self.identical_pairs,
                "median": self.quantile(0.5), "p90": self.quantile(0.9),
                "max": int(self.points.max()) if self.points.size else 0,
                "share_unseparated": self.share_unseparated, "suggested_cost_len": self.suggested_cost_len}


def divergence_report(trace_sets: Sequence[Sequence[Sequence[int]]], cost_len: int) -> DivergenceReport:
    """trace_sets[q]: the token ids of question q's traces (e.g. `TokenizedQuestion.trace_ids`)."""
    points, identical = [], 0
    for traces in trace_sets:
        for a, b in itertools.combinations(traces, 2):
            d = first_divergence(a, b)
            if d is None:
                identical += 1
            else:
                points.append(d)
    return DivergenceReport(int(cost_len), np.asarray(points, np.int64), identical)

