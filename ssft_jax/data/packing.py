"""Packed train rows: a batch's matched sequences ``prompt + tag + trace`` placed into a fixed number of rows of a
fixed length, so the train pass computes real tokens rather than ``M * (P + Lt + T)`` slots per question.

Why: traces of different teachers differ in length by an order of magnitude, and the unpacked train view pads every
trace to the longest allowed T. Packing keeps the step's shapes static (``pack_rows`` rows of ``pack_len`` slots)
and its losses identical: each sequence has its own segment id (attends to itself only) and positions restarting at
0, so every token sees exactly what it sees in its own unpacked row.

Layout (per process, numpy, built on the host inside the data iterator)::

    row r: [ seq | seq | ... | padding ]      seq = [ prompt (p) | tag slot (Lt, EMPTY) | trace (n) ]

  * Rows are filled first-fit decreasing (``first_fit_decreasing``), a deterministic function of the batch.
  * ``seq_index [R, S']``: ``b*M + j`` over the whole span of question b's trace j (b counted inside its
    micro-batch), -1 on row padding; ``segment_ids`` 1 on the prompt and trace tokens only (the tag slot is empty
    until ``rows.fill_packed_tags``); ``loss_mask`` 1 where the target is a trace token, as in the unpacked view.
  * ``tag_row``, ``tag_slot_start [B, M]``: where each sequence's tag slot lies (row inside the micro-batch's rows,
    slot in the row); ``rows.fill_packed_tags`` (in-graph, after matching) writes the assigned tag there, LEFT-padded
    to Lt like the unpacked slot, and rebuilds positions, targets and per-sequence segment ids.
  * Micro-batches and processes: the batch's questions are split into ``pack_groups`` contiguous groups (the finer
    of the micro-batch split and the process split: ``lcm(micro_batches, processes) / processes`` per process),
    each packed into its own ``pack_rows / pack_groups`` rows, so every micro-batch's rows hold only its questions.

A batch that does not fit: ``PackedIterator`` defers the question that does not fit to the next batch (counted;
the batch takes the next question of the stream instead), so the number of rows stays static. When nothing is
deferred the batches are exactly the unpacked pipeline's. A question that does not fit an empty group, or more than
``MAX_DEFERRED_BATCHES * B`` questions waiting (``data.pack_rows`` too small for the data), is a ``PackingError``.

Two ways to fill (``LayoutConfig.pack_fill``):
  * "questions": every batch has exactly B questions. The rows must hold the heaviest batches (up to a few
    deferrals), so with long-tailed lengths the average batch leaves ~20% of them empty.
  * "tokens": B is the most questions per batch; each group takes questions until its rows are full (a question
    that does not fit is deferred and the next one tried, up to ``FILL_TRIES`` times, then the group closes), and
    the deferred questions open the next group. Empty question slots are questions with no valid trace
    (``question_index`` -1): the cost pass computes them (static shapes), the matching and the loss skip them.
    The rows are then nearly full, at a varying number of questions per step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ssft_jax.data.layout import LayoutConfig, QuestionLayout
from ssft_jax.data.question import TokenizedQuestion

# The deferral queue may hold this many batches' worth of questions before the run is stopped: a queue that keeps
# growing means the rows are too few for the data on average, not an unlucky batch.
MAX_DEFERRED_BATCHES = 2
# pack_fill="tokens": questions tried after the first that does not fit, before a group closes with what it has.
# A row's last gap is smaller than most questions, so a few tries fill it; more would only reorder the stream.
FILL_TRIES = 3


class PackingError(ValueError):
    """The batch cannot be packed into the configured rows; the message names the question and the setting."""


def pack_groups(micro_batches: int, process_count: int) -> int:
    """Groups per process: each group lies inside one micro-batch and one process."""
    return math.lcm(micro_batches, process_count) // process_count


def first_fit_decreasing(lengths: Sequence[int], num_rows: int, row_len: int) -> list[tuple[int, int]] | None:
    """(row, offset) per item, longest first (ties by index: deterministic), each in the first row with room;
    None if an item finds no row."""
    fill = [0] * num_rows
    out: list[tuple[int, int]] = [(-1, -1)] * len(lengths)
    for k in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[k]
        for r in range(num_rows):
            if fill[r] + n <= row_len:
                out[k] = (r, fill[r])
                fill[r] += n
                break
        else:
            return None
    return out


class PackedTrainLayout:
    """B questions (one process's batch) -> the packed train view (module docstring)."""

    def __init__(self, layout: LayoutConfig, *, process_index: int = 0, process_count: int = 1):
        if not layout.packed:
            raise ValueError("PackedTrainLayout needs a LayoutConfig with pack_rows > 0")
        c = layout
        self.cfg = c
        self.groups = pack_groups(c.pack_micro_batches, process_count)
        if c.batch_size % self.groups or c.pack_rows % self.groups:
            raise ValueError(f"batch_size={c.batch_size} and pack_rows={c.pack_rows} (per process) must be multiples "
                             f"of {self.groups} groups (lcm(micro_batches={c.pack_micro_batches}, processes="
                             f"{process_count}) / processes)")
        self.q_per_group, self.rows_per_group = c.batch_size // self.groups, c.pack_rows // self.groups
        per_micro = math.lcm(c.pack_micro_batches, process_count) // c.pack_micro_batches
        # Group c of this process is global group process_index * groups + c; its place inside its micro-batch:
        pos = [(process_index * self.groups + g) % per_micro for g in range(self.groups)]
        self.q_offset = [p * self.q_per_group for p in pos]
        self.row_offset = [p * self.rows_per_group for p in pos]

    def seq_lengths(self, q: TokenizedQuestion) -> list[int]:
        return [len(q.prompt_ids) + self.cfg.tag_len + len(t) for t in q.trace_ids]

    def group_fits(self, questions: Sequence[TokenizedQuestion]) -> bool:
        lengths = [n for q in questions for n in self.seq_lengths(q)]
        return first_fit_decreasing(lengths, self.rows_per_group, self.cfg.pack_row_len) is not None

    def __call__(self, questions: Sequence[TokenizedQuestion | None]) -> dict[str, np.ndarray]:
        """B question slots, group by group; None is an empty slot (pack_fill="tokens"): no valid trace."""
        c = self.cfg
        B, M, Lt, Rg, S = c.batch_size, c.num_traces, c.tag_len, self.rows_per_group, c.pack_row_len
        if len(questions) != B:
            raise ValueError(f"expected {B} question slots, got {len(questions)}")
        R = c.pack_rows
        tokens, seg, lm = (np.zeros((R, S), np.int32) for _ in range(3))
        seq_index = np.full((R, S), -1, np.int32)
        tag_row, tag_start, plen, tlen = (np.zeros((B, M), np.int32) for _ in range(4))
        valid, truncated = np.zeros((B, M), bool), np.zeros((B, M), bool)
        for g in range(self.groups):
            group = questions[g * self.q_per_group:(g + 1) * self.q_per_group]
            items = [(k, j) for k, q in enumerate(group) if q is not None for j in range(len(q.trace_ids))]
            lengths = [self.seq_lengths(group[k])[j] for k, j in items]
            placed = first_fit_decreasing(lengths, Rg, S)
            if placed is None:
                longest = max((k for k, q in enumerate(group) if q is not None),
                              key=lambda k: sum(self.seq_lengths(group[k])))
                q = group[longest]
                raise PackingError(
                    f"{q.where}: question {q.id!r} and the {len(group) - 1} other(s) of its group need more than "
                    f"{Rg} rows of {S} slots ({sum(lengths)} tokens); raise data.pack_rows (or data.pack_len)")
            for (k, j), (r, off) in zip(items, placed):
                q, b = group[k], g * self.q_per_group + k
                bm = self.q_offset[g] + k  # the question's index inside its micro-batch
                row = g * Rg + r  # this process's row
                p, tr = q.prompt_ids, q.trace_ids[j]
                t0 = off + len(p) + Lt  # first trace slot
                end = t0 + len(tr)
                tokens[row, off:off + len(p)], tokens[row, t0:end] = p, tr
                seg[row, off:off + len(p)], seg[row, t0:end] = 1, 1
                lm[row, t0 - 1:end - 1] = 1  # the tag's last slot predicts trace token 0
                seq_index[row, off:end] = bm * M + j
                tag_row[b, j], tag_start[b, j] = self.row_offset[g] + r, off + len(p)
                plen[b, j], tlen[b, j], valid[b, j], truncated[b, j] = len(p), len(tr), True, q.truncated[j]
        return {"tokens": tokens, "segment_ids": seg, "loss_mask": lm, "seq_index": seq_index,
                "trace_valid": valid, "prompt_lengths": plen, "trace_lengths": tlen, "tag_row": tag_row,
                "tag_slot_start": tag_start, "truncated": truncated}


def question_element(layout: QuestionLayout):
    """The per-question map of the packed pipeline: the cost view, and the question itself for the packer."""
    def element(q: TokenizedQuestion) -> dict[str, Any]:
        layout.check_fits(q)
        return {"cost": layout.cost_view(q), "question": q, "question_index": np.int32(q.index)}
    return element


def empty_element(like: Mapping[str, Any]) -> dict[str, Any]:
    """An empty question slot shaped like the element ``like``: no valid trace (the matching assigns nothing, the
    loss sees nothing), no real token, question_index -1. Its tags stay valid: a question with zero traces."""
    cost = {k: (v.copy() if k == "tag_valid" else np.zeros_like(v)) for k, v in like["cost"].items()}
    cost["pair_ids"] = np.full_like(like["cost"]["pair_ids"], -1)
    return {"cost": cost, "question": None, "question_index": np.int32(-1)}


def stack_batch(elements: Sequence[Mapping[str, Any]], packer: PackedTrainLayout) -> dict[str, Any]:
    """B elements -> the batch dict: cost views stacked as in the unpacked pipeline, the train view packed."""
    cost = {k: np.stack([e["cost"][k] for e in elements]) for k in elements[0]["cost"]}
    return {"cost": cost, "train": packer([e["question"] for e in elements]),
            "question_index": np.stack([e["question_index"] for e in elements])}


class PackedIterator:
    """Batches of B questions with the train view packed, deferring a question that does not fit (module docstring).

    ``elements`` is random access (a ``grain.MapDataset`` of ``question_element`` outputs, finite or repeated), so
    the state is three small numbers and the deferred element indices: ``get_state``/``set_state`` resume exactly.
    """

    def __init__(self, elements, packer: PackedTrainLayout):
        self.elements, self.packer = elements, packer
        self.batch_size = packer.cfg.batch_size
        self._next, self._deferred, self.deferred_total = 0, [], 0
        try:
            self._length = len(elements)
        except (TypeError, OverflowError):
            self._length = None
        if self._length is not None and self._length >= 2 ** 62:  # grain's "forever"
            self._length = None

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, Any]:
        return {"next": self._next, "deferred": list(self._deferred), "deferred_total": self.deferred_total}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._next, self._deferred = int(state["next"]), [int(i) for i in state["deferred"]]
        self.deferred_total = int(state["deferred_total"])

    def __next__(self) -> dict[str, Any]:
        pk = self.packer
        by_tokens = pk.cfg.pack_fill == "tokens"
        queue, deferred, nxt = list(self._deferred), [], self._next
        groups: list[list[tuple[int, Any]]] = [[] for _ in range(pk.groups)]
        g, misses, n_deferred = 0, 0, 0
        while g < pk.groups:
            if queue:
                idx = queue.pop(0)
            elif self._length is None or nxt < self._length:
                idx, nxt = nxt, nxt + 1
            elif by_tokens and any(groups):  # the stream ends inside a batch: the batch leaves with what it has
                g = pk.groups
                continue
            else:
                raise StopIteration
            el = self.elements[idx]
            fits = pk.group_fits([e["question"] for _, e in groups[g]] + [el["question"]])
            if fits:
                groups[g].append((idx, el))
            elif not groups[g]:
                q = el["question"]
                raise PackingError(f"{q.where}: question {q.id!r} alone needs more than {pk.rows_per_group} rows of "
                                   f"{pk.cfg.pack_row_len} slots; raise data.pack_rows or data.pack_len")
            else:
                deferred.append(idx)
                n_deferred, misses = n_deferred + 1, misses + 1
                if len(queue) + len(deferred) > MAX_DEFERRED_BATCHES * self.batch_size:
                    raise PackingError(
                        f"more than {MAX_DEFERRED_BATCHES * self.batch_size} questions deferred: data.pack_rows="
                        f"{pk.cfg.pack_rows} rows (per process) of {pk.cfg.pack_row_len} slots are too few for this "
                        "data's batches on average; raise data.pack_rows")
            if len(groups[g]) == pk.q_per_group or (by_tokens and misses > FILL_TRIES):
                g, misses = g + 1, 0
                if by_tokens:  # the questions deferred so far open the next group, oldest first
                    queue, deferred = sorted(queue + deferred), []
        # Commit only now: a StopIteration or error above leaves the iterator where it was.
        self._next, self._deferred = nxt, sorted(queue + deferred) if by_tokens else queue + deferred
        self.deferred_total += n_deferred
        if not by_tokens:
            return stack_batch([e for grp in groups for _, e in grp], pk)
        empty = empty_element(groups[0][0][1])
        return stack_batch([grp[k][1] if k < len(grp) else empty for grp in groups for k in range(pk.q_per_group)],
                           pk)
