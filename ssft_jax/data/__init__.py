"""SSFT data: multi-trace records -> validated, tokenized questions -> static-shape batches with Grain.

Modules: ``formats`` (reading sources, detecting and normalising their shapes, ids, the held-out split),
``records`` (validation, tokenization), ``question`` (TokenizedQuestion, what validation produces and the layout
consumes), ``layout`` (LayoutConfig, the per-question views), ``packing`` (packed train rows), ``pipeline`` (Grain);
everything is importable from here. Host side only (numpy; no jax): what the step does to these rows in-graph
(``fill_tags``, ``fill_packed_tags``, ``cost_matrix_from_token_nll``) is ``ssft_jax.rows``.

Pipeline
--------
1. ``read_records(sources, format="auto")``: JSONL files, parquet files, ``datasets`` folders, hub dataset ids and
   in-memory lists of dicts, each record tagged with where it came from (``file:line`` for JSONL, ``file:row N``
   for parquet and ``datasets``, ``name[index]`` for lists), each source's shape (native, s1K, s1K-1.1 teacher
   columns, TRL messages or prompt/completion rows) detected and normalised into native records (``formats``).
2. ``tokenize_records(records, tokenizer, tags, layout)``: validates every record, renders the prompt with the chat
   template (``tokenization.render_example``), tokenizes every trace and appends the end-of-turn token, applies the
   token budgets. Returns ``(questions, ValidationReport)``.
   **Everything is tokenized up front**: SSFT corpora are small (1k-10k questions, e.g. s1K), so this takes seconds
   to a minute, every bad record is found before training starts (not hours into a run), and the Grain source is a
   plain in-memory list of ``TokenizedQuestion`` whose per-step work is only array layout (cheap, deterministic,
   trivially checkpointable).
3. ``make_iterator(questions, layout, tag_table, tag_lengths, ...)``: ``grain.MapDataset.source(questions)``
   -> ``.shuffle(seed)`` -> ``.repeat(epochs)`` -> (questions with more than M traces: ``TraceSample``, a fresh M
   each epoch) -> shard ``[process_index::process_count]`` -> ``.map(layout)``
   -> ``.batch(B, drop_remainder=True)`` -> ``.to_iter_dataset(read_options)``. The iterator's ``get_state()`` is a
   small JSON-able dict; ``set_state`` on a fresh iterator resumes with exactly the same batches.

Record format (native): ``{"id": str|int?, "question": str | "messages": [{"role", "content"}, ...] (no final
assistant turn), "traces": [str | {"text": str, "source": str?}, ...] (distinct, at least 1), "answer": any?}``.
A record without an id is named by its prompt (``formats.prompt_id``: a hash of the canonical prompt JSON, stable
across runs and file orders). More than M traces: ``extra_traces='error'`` rejects the question
(``too_many_traces``), ``'first'`` keeps its first M, ``'sample'`` keeps all and the pipeline samples M per epoch.
The other shapes and how they map to this one: ``ssft_jax.data.formats``.

Bad records (``REASONS``) are never dropped silently: with ``on_bad_record='error'`` a ``DataError`` names the
first bad record in input order (``where``, its id and reason; the message lists others); with ``'skip'`` they are
counted per reason in the ``ValidationReport`` (logged with ``logging.warning``). A NUL character or a lone surrogate
is bad whether it is a JSON escape or raw bytes in the file (``nul_byte``, ``lone_surrogate``); other undecodable
bytes are ``invalid_utf8``; a NaN or Infinity anywhere in a record is ``non_finite_number``; a character the
tokenizer would turn into its unknown token (the character tokenizer's ``<unk>``) is ``unknown_characters``. Rows
of one question that disagree on its answer or id are ``conflicting_rows``. Control-token strings
(``<|im_end|>``, ``<think3>``) inside text are valid text and are encoded as text. Traces longer than T are
truncated to T tokens (they then lose their end-of-turn token; counted as ``truncated_traces``) or, with
``overlong='reject'``, make the record bad (``trace_over_budget``).

Static-shape layout
-------------------
Notation: N tags, M traces per question (M <= N; ``allow_more_traces_than_tags`` for the sft_mixed baseline),
L cost prefix length, P max prompt tokens, T max trace tokens (incl. the end-of-turn token), Lt tag slot length
(= the longest tag's token count), B questions per batch and process. ``Le = min(L, T)`` is the cost slot length
(a trace never has more than T tokens, so L > T is clamped).
A trace's ids are ``encode(text) + [end-of-turn]`` (truncated to T); tag i's ids are ``tags.tag_ids(tok, i)``, so
``prompt + tag_i + trace`` is exactly ``render_example(tok, q, text, tags, i).input_ids``.

Cost view (the no-grad forward that fills C), one packed row per question, ``R = P + N*M*(Lt + Le)`` slots::

    [ prompt (P, right-padded) | block (0,0) | block (0,1) | ... | block (N-1,M-1) ]
    block (i,j) = [ tag_i (Lt, LEFT-padded) | trace_j[:L'] (Le, right-padded) ]

  block (i, j) starts at ``P + (i*M + j) * (Lt + Le)``; ``L' = min(Le, len(trace_j))``.
  * ``segment_ids``: prompt 1, block (i,j) ``2 + i*M + j``, padding 0; ``prefix_segment_ids`` 1 on block tokens, so
    every continuation attends to the prompt and itself only (``model.attention_mask``).
  * ``positions``: prompt 0..p-1; block tokens continue from the real prompt length p: p, p+1, ... (as if alone).
  * ``targets[t]``: the next token of the same segment (0 where none); ``loss_mask`` 1 exactly at the L' positions
    whose target is one of trace_j's first L' tokens (the last tag token predicts trace token 0, which is why the
    tag is left-padded: it touches the trace); ``pair_ids = i*M + j`` there, -1 elsewhere.
  * Blocks of invalid traces (question with fewer than M) and of invalid tags are all padding.
  Versus repeating the prompt in every row (``N*M`` rows of ``P + Lt + Le``), prompt sharing saves ``(N*M - 1) * P``
  slots per question. ``rows.cost_matrix_from_token_nll`` reads the per-token NLL back into ``C[B, N, M]`` (mean over
  each pair's loss positions; ``+inf`` for invalid traces/tags, which the matcher ignores given the valid masks).

Train view (forward+backward on the matched sequences), M rows per question, ``[B, M, S]``, ``S = P + Lt + T``::

    [ prompt (P, right-padded) | tag slot (Lt, EMPTY until rows.fill_tags, then left-padded) | trace (T, right-padded) ]

  * ``segment_ids`` 1 on real tokens, 0 on padding and on the empty tag slot; ``loss_mask`` 1 at the positions whose
    target is a trace token (incl. the end-of-turn token): the slot's last position (the last tag token after
    filling) and the trace's first len-1 positions; all zero for invalid traces, never all zero for valid ones.
  * ``rows.fill_tags`` (jit-able) writes the assigned tag into each row's slot, recomputes ``positions`` (cumsum of real
    tokens - 1: contiguous across the padding gaps), ``targets`` (the next real token) and ``segment_ids``. Padding
    between prompt, tag and trace is segment 0: nothing attends to it, so a filled row computes exactly what the
    contiguous sequence ``prompt + tag + trace`` would.

Batch layout (numpy, static shapes, produced by the Grain iterator)::

    {"cost":  {tokens, segment_ids, prefix_segment_ids, positions, targets, loss_mask, pair_ids: [B, R] int32,
               trace_valid [B, M] bool, tag_valid [B, N] bool, trace_lengths [B, M], cost_lengths [B, M] int32},
     "train": {tokens, segment_ids, targets, loss_mask: [B, M, S] int32, trace_valid [B, M] bool,
               prompt_lengths, trace_lengths, tag_slot_start [B, M] int32, truncated [B, M] bool},
     "question_index": [B] int32 (index into the tokenized question list)}

Packed train view (``data.packed``; ``packing``): the same sequences ``prompt + tag + trace`` placed first-fit
decreasing into ``pack_rows`` rows of ``pack_len`` slots per batch, one segment id per sequence, the tag slot's place
in ``tag_row``/``tag_slot_start [B, M]``, filled by ``rows.fill_packed_tags`` (the step calls
``rows.fill_train_rows``, which picks the view's). A question that
does not fit is deferred to the next batch (``PackedIterator``, counted). With ``pack_fill="tokens"`` B is the most
questions per batch and the rows fill up; empty question slots have ``question_index`` -1 and no valid trace.

Token budget per question: cost ``P + N*M*(Lt+Le)`` (shared prompt) vs ``N*M*(P+Lt+Le)`` (repeated);
train ``M*(P+Lt+T)``. B is per process: the global batch is ``B * process_count``.
"""

from ssft_jax.data import packing
from ssft_jax.data.divergence import DivergenceReport, divergence_report, first_divergence
from ssft_jax.data.formats import (
                                   FORMATS,
                                   DataError,
                                   FormatError,
                                   RawRecord,
                                   heldout_count,
                                   prompt_id,
                                   read_jsonl,
                                   read_parquet,
                                   read_records,
                                   read_source,
                                   record_id,
                                   split_heldout,
)
from ssft_jax.data.layout import LayoutConfig, QuestionLayout, batch_token_counts, tag_table
from ssft_jax.data.packing import PackedIterator, PackedTrainLayout, PackingError
from ssft_jax.data.pipeline import TraceSample, make_dataset, make_iterator
from ssft_jax.data.question import TokenizedQuestion
from ssft_jax.data.records import (
                                   EXTRA_TRACES,
                                   ON_BAD_RECORD,
                                   OVERLONG,
                                   REASONS,
                                   ValidationReport,
                                   load_questions,
                                   tokenize_records,
)

__all__ = [
    "DivergenceReport", "divergence_report", "first_divergence",
    "REASONS", "DataError", "LayoutConfig", "tag_table", "RawRecord", "read_jsonl", "read_parquet", "read_records",
    "TokenizedQuestion", "ValidationReport", "tokenize_records", "load_questions", "QuestionLayout",
    "make_dataset", "make_iterator", "batch_token_counts", "ON_BAD_RECORD",
    "OVERLONG", "EXTRA_TRACES", "FORMATS", "FormatError", "read_source", "prompt_id", "record_id", "split_heldout",
    "heldout_count", "TraceSample", "packing", "PackedIterator", "PackedTrainLayout", "PackingError",
]
