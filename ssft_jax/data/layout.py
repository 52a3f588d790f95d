"""Static-shape SSFT layout: LayoutConfig, the tag table and the per-question cost/train views (numpy). See
``ssft_jax.data`` for the layout; ``ssft_jax.rows`` fills these rows in-graph."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np

from ssft_jax import tokenization
from ssft_jax.data.question import TokenizedQuestion

log = logging.getLogger("ssft_jax.data")


# --------------------------------------------------------------------------------------------
# Layout configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Static shapes of an SSFT batch (see the module docstring for the layout)."""

    num_tags: int  # N
    num_traces: int  # M
    cost_len: int  # L: cost prefix tokens per trace
    max_prompt_len: int  # P
    max_trace_len: int  # T: incl. the end-of-turn token
    tag_len: int  # Lt: tag slot length (longest tag)
    batch_size: int  # B: questions per batch (per process)
    tag_valid: tuple[bool, ...] | None = None  # None: all N tags usable
    # M > N is refused (each trace needs its own tag) unless this is set: the sft_mixed baseline puts every trace
    # under one tag and never matches, so it may run with fewer tags than traces.
    allow_more_traces_than_tags: bool = False
    # Packed train rows (``ssft_jax.data.packing``): pack_rows > 0 rows per process of pack_len slots (0: S, so any
    # one sequence fits) replace the M rows of S per question; 0 keeps the unpacked view (the reference).
    # pack_micro_batches: the step's micro-batch count, since each micro-batch's rows hold only its questions.
    pack_rows: int = 0
    pack_len: int = 0
    pack_micro_batches: int = 1
    # "questions": exactly batch_size questions per batch; "tokens": at most batch_size, as many as fill the rows
    # (``packing.PackedIterator``).
    pack_fill: str = "questions"

    def __post_init__(self):
        for name in ("num_tags", "num_traces", "cost_len", "max_prompt_len", "max_trace_len", "tag_len", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LayoutConfig.{name} must be a positive int, got {v!r}")
        if self.num_traces > self.num_tags and not self.allow_more_traces_than_tags:
            raise ValueError(
                f"M={self.num_traces} traces per question > N={self.num_tags} tags: SSFT needs N >= M "
                "(each trace gets its own tag)"
            )
        if self.tag_valid is not None:
            tv = tuple(bool(x) for x in self.tag_valid)
            if len(tv) != self.num_tags:
                raise ValueError(f"tag_valid has {len(tv)} entries, expected N={self.num_tags}")
            need = 1 if self.allow_more_traces_than_tags else self.num_traces
            if sum(tv) < need:
                raise ValueError(f"only {sum(tv)} valid tags for M={self.num_traces} traces (need {need})")
            object.__setattr__(self, "tag_valid", tv)
        for name in ("pack_rows", "pack_len"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"LayoutConfig.{name} must be an int >= 0, got {v!r}")
        if self.pack_fill not in ("questions", "tokens"):
            raise ValueError(f"LayoutConfig.pack_fill must be 'questions' or 'tokens', got {self.pack_fill!r}")
        if self.pack_micro_batches < 1:
            raise ValueError(f"LayoutConfig.pack_micro_batches must be >= 1, got {self.pack_micro_batches!r}")
        if self.cost_len > self.max_trace_len:
            log.info("cost_len L=%d > max_trace_len T=%d: the cost slot is clamped to T", self.cost_len,
                     self.max_trace_len)

    @classmethod
    def for_tokenizer(cls, tokenizer, tags: tokenization.ForkingTags, **kw) -> "LayoutConfig":
        """N from ``tags``, Lt = the longest tag in tokens; the other fields as keywords."""
        return cls(num_tags=tags.n, tag_len=tags.max_tag_len(tokenizer), **kw)

    @property
    def cost_slot_len(self) -> int:
        """Le = min(L, T)."""
        return min(self.cost_len, self.max_trace_len)

    @property
    def num_pairs(self) -> int:
        return self.num_tags * self.num_traces

    @property
    def pair_block_len(self) -> int:
        return self.tag_len + self.cost_slot_len

    @property
    def cost_row_len(self) -> int:
        """R = P + N*M*(Lt + Le)."""
        return self.max_prompt_len + self.num_pairs * self.pair_block_len

    @property
    def cost_tokens_repeated_prompt(self) -> int:
        """Slots per question if every (tag, trace) pair repeated the prompt: N*M*(P + Lt + Le)."""
        return self.num_pairs * (self.max_prompt_len + self.pair_block_len)

    @property
    def train_row_len(self) -> int:
        """S = P + Lt + T."""
        return self.max_prompt_len + self.tag_len + self.max_trace_len

    @property
    def packed(self) -> bool:
        return self.pack_rows > 0

    @property
    def pack_row_len(self) -> int:
        """S' = pack_len, or S when 0."""
        return self.pack_len or self.train_row_len

    @property
    def tag_valid_array(self) -> np.ndarray:
        return np.ones(self.num_tags, bool) if self.tag_valid is None else np.asarray(self.tag_valid, bool)

    def pair_block_start(self, i: int, j: int) -> int:
        return self.max_prompt_len + (i * self.num_traces + j) * self.pair_block_len


def tag_table(tokenizer, tags: tokenization.ForkingTags, tag_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(table [N, Lt] int32, lengths [N] int32)``: tag i's ids LEFT-padded with 0 to Lt (default: longest tag)."""
    ids = tags.all_tag_ids(tokenizer)
    lt = max(len(t) for t in ids) if tag_len is None else int(tag_len)
    table = np.zeros((tags.n, lt), np.int32)
    lengths = np.zeros(tags.n, np.int32)
    for i, t in enumerate(ids):
        if not 1 <= len(t) <= lt:
            raise ValueError(f"tag {i} ({tags.tag_string(i)!r}) has {len(t)} tokens; the tag slot holds 1..{lt}")
        table[i, lt - len(t):] = t
        lengths[i] = len(t)
    return table, lengths


# --------------------------------------------------------------------------------------------
# Layout of one question (numpy; runs inside the Grain map)
# --------------------------------------------------------------------------------------------


class QuestionLayout:
    """``TokenizedQuestion -> {"cost": ..., "train": ..., "question_index": ...}`` without the batch dimension."""

    def __init__(self, layout: LayoutConfig, tag_table: np.ndarray, tag_lengths: np.ndarray):
        tag_table, tag_lengths = np.asarray(tag_table, np.int32), np.asarray(tag_lengths, np.int32)
        if tag_table.shape != (layout.num_tags, layout.tag_len):
            raise ValueError(f"tag_table has shape {tag_table.shape}, expected (N, Lt)="
                             f"({layout.num_tags}, {layout.tag_len})")
        if tag_lengths.shape != (layout.num_tags,) or tag_lengths.min() < 1 or tag_lengths.max() > layout.tag_len:
            raise ValueError(f"tag_lengths must be [N] in 1..Lt, got {tag_lengths}")
        self.cfg = layout
        self.tags = [tag_table[i, layout.tag_len - tag_lengths[i]:] for i in range(layout.num_tags)]
        self.tag_valid = layout.tag_valid_array

    def __call__(self, q: TokenizedQuestion) -> dict[str, Any]:
        return {"cost": self.cost_view(q), "train": self.train_view(q), "question_index": np.int32(q.index)}

    def check_fits(self, q: TokenizedQuestion) -> None:
        """A ValueError naming the question when it does not fit this layout's budgets."""
        c = self.cfg
        if len(q.prompt_ids) > c.max_prompt_len or not 1 <= len(q.trace_ids) <= c.num_traces or any(
                not 1 <= len(t) <= c.max_trace_len for t in q.trace_ids):
            raise ValueError(f"{q.where}: question {q.id!r} does not fit {c} (tokenize with the same LayoutConfig)")

    def cost_view(self, q: TokenizedQuestion) -> dict[str, np.ndarray]:
        self.check_fits(q)
        c = self.cfg
        N, M, Lt, Le, R = c.num_tags, c.num_traces, c.tag_len, c.cost_slot_len, c.cost_row_len
        tokens, seg, prefix, pos, tgt, lm = (np.zeros(R, np.int32) for _ in range(6))
        pair = np.full(R, -1, np.int32)
        p = len(q.prompt_ids)
        tokens[:p], seg[:p], pos[:p] = q.prompt_ids, 1, np.arange(p)
        tgt[:p - 1] = q.prompt_ids[1:]
        nt = len(q.trace_ids)
        for i in range(N):
            if not self.tag_valid[i]:
                continue
            tag = self.tags[i]
            lt = len(tag)
            for j in range(nt):
                trace = q.trace_ids[j][:Le]
                base = c.pair_block_start(i, j)
                a, b = base + Lt - lt, base + Lt + len(trace)  # real tokens [a, b)
                tokens[a:base + Lt], tokens[base + Lt:b] = tag, trace
                seg[a:b], prefix[a:b], pos[a:b] = 2 + i * M + j, 1, p + np.arange(b - a)
                tgt[a:b - 1] = tokens[a + 1:b]
                lm[base + Lt - 1:b - 1] = 1
                pair[base + Lt - 1:b - 1] = i * M + j
        trace_valid = np.arange(M) < nt
        lengths = np.zeros(M, np.int32)
        lengths[:nt] = [len(t) for t in q.trace_ids]
        return {"tokens": tokens, "segment_ids": seg, "prefix_segment_ids": prefix, "positions": pos, "targets": tgt,
                "loss_mask": lm, "pair_ids": pair, "trace_valid": trace_valid, "tag_valid": self.tag_valid.copy(),
                "trace_lengths": lengths, "cost_lengths": np.minimum(lengths, Le).astype(np.int32)}

    def train_view(self, q: TokenizedQuestion) -> dict[str, np.ndarray]:
        self.check_fits(q)
        c = self.cfg
        M, P, Lt, S = c.num_traces, c.max_prompt_len, c.tag_len, c.train_row_len
        tokens, seg, tgt, lm = (np.zeros((M, S), np.int32) for _ in range(4))
        p, nt = len(q.prompt_ids), len(q.trace_ids)
        t0 = P + Lt  # first trace slot
        lengths = np.zeros(M, np.int32)
        truncated = np.zeros(M, bool)
        for j in range(nt):
            tr = q.trace_ids[j]
            n = len(tr)
            tokens[j, :p], seg[j, :p] = q.prompt_ids, 1
            tgt[j, :p - 1] = q.prompt_ids[1:]
            tokens[j, t0:t0 + n], seg[j, t0:t0 + n] = tr, 1
            tgt[j, t0 - 1:t0 + n - 1] = tr  # the slot's last position (last tag token) predicts trace token 0
            lm[j, t0 - 1:t0 + n - 1] = 1
            lengths[j], truncated[j] = n, q.truncated[j]
        valid = np.arange(M) < nt
        return {"tokens": tokens, "segment_ids": seg, "targets": tgt, "loss_mask": lm, "trace_valid": valid,
                "prompt_lengths": np.where(valid, p, 0).astype(np.int32), "trace_lengths": lengths,
                "tag_slot_start": np.full(M, P, np.int32), "truncated": truncated}


def batch_token_counts(batch: Mapping[str, Any]) -> dict[str, int]:
    """Real (non-padding) and slot token counts of a batch's cost and train views (for logging / benches)."""
    cost, train = batch["cost"], batch["train"]
    return {
        "cost_real": int(np.count_nonzero(cost["segment_ids"])),
        "cost_slots": int(np.size(cost["segment_ids"])),
        "train_real": int(np.count_nonzero(train["segment_ids"])),  # excludes the (empty) tag slots
        "train_slots": int(np.size(train["segment_ids"])),
        "train_loss_tokens": int(np.sum(train["loss_mask"])),
    }

