"""Validating and tokenizing SSFT records (see ``ssft_jax.data`` for the record format; reading sources and
normalising their shapes is ``ssft_jax.data.formats``)."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Mapping

import numpy as np

from ssft_jax import tokenization
from ssft_jax.data.divergence import divergence_report
from ssft_jax.data.formats import (
    BadRecord,
    DataError,
    RawRecord,
    as_messages,
    check_text,
    native_prompt,
    prompt_id,
    read_records,
    record_id,
)
from ssft_jax.data.layout import LayoutConfig
from ssft_jax.data.question import TokenizedQuestion

log = logging.getLogger("ssft_jax.data")

# Every reason a record can be bad, with what it means.
REASONS = {
    "broken_json": "the line is not valid JSON",
    "invalid_utf8": "bytes that are not valid UTF-8",
    "lone_surrogate": "a lone UTF-16 surrogate in a string",
    "nul_byte": "a NUL character in a string",
    "non_finite_number": "a NaN or Infinity number anywhere in the record (not JSON, though Python's json reads it)",
    "wrong_type": "a field has the wrong type",
    "missing_field": "a required field is missing",
    "duplicate_id": "the record id (its own, or the one derived from its prompt) was already used by an earlier record",
    "bad_messages": "messages are not a non-empty list of {role, content} without a final assistant turn (per-trace "
                    "rows: prompt turns, then the assistant turn)",
    "conflicting_rows": "rows grouped into one question (same prompt) give it different answers or ids",
    "empty_prompt": "the question is empty",
    "no_traces": "the traces list is empty",
    "empty_trace": "a trace text is empty or whitespace only",
    "duplicate_trace": "two traces have exactly the same text",
    "too_many_traces": "more traces than M (extra_traces='error')",
    "unknown_characters": "characters the tokenizer cannot encode (they would become its unknown token)",
    "template_error": "the chat template cannot render the prompt safely",
    "prompt_over_budget": "the rendered prompt is longer than max_prompt_len",
    "trace_over_budget": "a trace (incl. end-of-turn token) is longer than max_trace_len (overlong='reject')",
}
ON_BAD_RECORD = ("error", "skip")
OVERLONG = ("truncate", "reject")
# A question with more than M traces: rejected (too_many_traces), its first M kept, or all kept and a fresh M of
# them sampled each epoch by the pipeline.
EXTRA_TRACES = ("error", "first", "sample")


# --------------------------------------------------------------------------------------------
# Validation and tokenization
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ValidationReport:
    """What ``tokenize_records`` did: counts of skipped records per reason, truncations, a few examples each."""

    num_records: int = 0
    num_kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated_traces: int = 0
    truncated_questions: int = 0
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    extra_traces: str = "error"
    questions_over_m: int = 0  # kept questions that had more than M traces (extra_traces 'first' or 'sample')
    max_traces: int = 0  # M
    divergence: Any = None  # divergence.DivergenceReport: where trace pairs first differ, against L (the L advisor)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        parts = [f"{self.num_kept}/{self.num_records} records kept"]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{r}={c}" for r, c in sorted(self.skipped.items())))
        if self.truncated_traces:
            parts.append(f"{self.truncated_traces} traces in {self.truncated_questions} questions truncated to "
                         "max_trace_len (end-of-turn token lost)")
        if self.questions_over_m:
            kept = "the first M kept" if self.extra_traces == "first" else "a fresh M of them sampled each epoch"
            parts.append(f"{self.questions_over_m} questions with more than M={self.max_traces} traces ({kept})")
        lines = ["; ".join(parts)]
        if self.divergence is not None:
            lines.append(self.divergence.warning() or self.divergence.summary())
        for reason, ex in sorted(self.examples.items()):
            lines.extend(f"  {reason}: {e}" for e in ex)
        return "\n".join(lines)


_MAX_EXAMPLES = 3


def _check_record(rec: Any, num_traces: int, extra_traces: str) -> tuple[str, Any, list[str], Any, bool]:
    """Structural checks of a native record. Returns (id, prompt (str or messages), trace texts (at most M unless
    extra_traces='sample'), answer, whether it had more than M traces); raises BadRecord."""
    if not isinstance(rec, Mapping):
        raise BadRecord("wrong_type", f"a record must be an object, got {type(rec).__name__}")
    prompt = native_prompt(rec)
    rid = rec.get("id")
    if rid is None:
        rid = prompt_id(prompt)
    elif isinstance(rid, bool) or not isinstance(rid, (str, int, np.integer)):
        raise BadRecord("wrong_type", f"'id' must be a string or an int, got {type(rid).__name__}")
    rid = check_text(str(rid), "'id'")
    if "traces" not in rec or rec["traces"] is None:
        raise BadRecord("missing_field", "no 'traces'")
    traces = rec["traces"]
    if not isinstance(traces, (list, tuple)):
        raise BadRecord("wrong_type", f"'traces' must be a list, got {type(traces).__name__}")
    if not traces:
        raise BadRecord("no_traces", "'traces' is empty")
    texts: list[str] = []
    for k, t in enumerate(traces):
        if isinstance(t, str):  # a plain-string trace
            t = {"text": t}
        if not isinstance(t, Mapping):
            raise BadRecord("wrong_type", f"traces[{k}] must be a string or an object with 'text', got "
                                          f"{type(t).__name__}", k)
        if "text" not in t or t["text"] is None:
            raise BadRecord("missing_field", f"traces[{k}] has no 'text'", k)
        text = check_text(t["text"], f"traces[{k}].text", k)
        if t.get("source") is not None:
            check_text(t["source"], f"traces[{k}].source", k)
        if not text.strip():
            raise BadRecord("empty_trace", f"traces[{k}] is empty", k)
        if text in texts:
            raise BadRecord("duplicate_trace", f"traces[{k}] repeats traces[{texts.index(text)}] exactly", k)
        texts.append(text)
    over = len(texts) > num_traces
    if over and extra_traces == "error":
        raise BadRecord("too_many_traces", f"{len(texts)} traces > M={num_traces} (data.extra_traces='first' keeps "
                                           "the first M, 'sample' a fresh M each epoch)")
    answer = rec.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float, np.number))):
        # A checker compares the answer's text with the generation's: an object or a list has no such text.
        raise BadRecord("wrong_type", f"'answer' must be a string or a number, got {type(answer).__name__}")
    return rid, prompt, texts[:num_traces] if extra_traces == "first" else texts, answer, over


def _encode_many(tokenizer, texts: list[str], chunk: int = 1024) -> list[list[int]]:
    """``encode_text`` on each text, in batched tokenizer calls (same ids, much faster)."""
    out: list[list[int]] = []
    for s in range(0, len(texts), chunk):
        enc = tokenizer(texts[s:s + chunk], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out.extend(list(e) for e in enc)
    return out


def _unknown_chars(tokenizer, text: str, unk: int) -> str:
    """The characters of `text` that `tokenizer` encodes as its unknown token `unk`, for the message."""
    chars = sorted(set(text))
    bad = [c for c, ids in zip(chars, _encode_many(tokenizer, chars)) if unk in ids]
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad)


def tokenize_records(
    records: Any,
    tokenizer,
    tags: tokenization.ForkingTags,
    layout: LayoutConfig,
    *,
    on_bad_record: str = "error",
    overlong: str = "truncate",
    extra_traces: str = "error",
    format: str = "auto",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[TokenizedQuestion], ValidationReport]:
    """Validate and tokenize all records (anything ``read_records`` takes, read with `format`; or ``RawRecord``s).

    Each prompt is rendered once (``render_example`` with the first trace: the generation prompt and the template's
    end-of-turn token are the same for every trace); trace texts are encoded as plain text in batched calls and get
    the end-of-turn token appended. A tokenizer with an unknown token must encode every character of the prompt and
    the traces (``unknown_characters``). Raises ``DataError`` (on_bad_record='error') or skips and counts.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if extra_traces not in EXTRA_TRACES:
        raise ValueError(f"extra_traces must be one of {EXTRA_TRACES}, got {extra_traces!r}")
    if tags.n != layout.num_tags:
        raise ValueError(f"tags.n={tags.n} != LayoutConfig.num_tags={layout.num_tags}")
    raws = read_records(records, format=format)
    report = ValidationReport(num_records=len(raws), extra_traces=extra_traces, max_traces=layout.num_traces)
    bad: list[tuple[int, str, str, str, str]] = []  # position, where, id, reason, detail

    def fail(where, rid, reason, detail):
        bad.append((pos, where, rid, reason, detail))

    def at(raw: RawRecord, trace: int | None) -> str:  # where a trace's row was (grouped questions), else the record
        return raw.trace_where[trace] if trace is not None and raw.trace_where else raw.where

    # Pass 1: structure.
    checked = []
    seen_ids: dict[str, str] = {}
    for pos, raw in enumerate(raws):
        rid = record_id(raw.record) or "?"
        if raw.reason is not None:
            fail(raw.where, rid, raw.reason, raw.detail)
            continue
        try:
            rid, prompt, texts, answer, over = _check_record(raw.record, layout.num_traces, extra_traces)
        except BadRecord as e:
            fail(at(raw, e.trace), rid, e.reason, e.detail)
            continue
        if rid in seen_ids:
            derived = "" if raw.record.get("id") is not None else " (derived from the prompt: the same question)"
            fail(raw.where, rid, "duplicate_id", f"id {rid!r}{derived} already used at {seen_ids[rid]}")
            continue
        seen_ids[rid] = raw.where
        checked.append((pos, raw, rid, prompt, texts, answer, over))
    if bad and on_bad_record == "error":
        # Strict mode names the first bad record in input order: the records before the first structural failure
        # still get the (tokenizer) checks of pass 2, the rest is not tokenized at all.
        checked = [c for c in checked if c[0] < bad[0][0]]

    # Pass 2: render prompts, encode traces, apply budgets.
    all_ids = iter(_encode_many(tokenizer, [t for c in checked for t in c[4]]))
    unk = tokenizer.unk_token_id
    # Only a tokenizer with an unknown token can lose characters; the prompt's texts are encoded for this check.
    prompt_texts = [[m["content"] for m in as_messages(c[3])] for c in checked] if unk is not None else []
    prompt_unk = iter(_encode_many(tokenizer, [t for ts in prompt_texts for t in ts])) if unk is not None else None
    questions: list[TokenizedQuestion] = []
    P, T = layout.max_prompt_len, layout.max_trace_len
    for n, (pos, raw, rid, prompt, texts, answer, over) in enumerate(checked):
        where = raw.where
        trace_ids = [next(all_ids) for _ in texts]
        prompt_pieces = [next(prompt_unk) for _ in prompt_texts[n]] if unk is not None else []
        try:
            ex = tokenization.render_example(tokenizer, prompt, texts[0], tags, None, add_eos=True, example_id=rid,
                                             chat_template_kwargs=chat_template_kwargs)
        except (tokenization.TemplateError, tokenization.PromptPrefixError) as e:
            fail(where, rid, "template_error", str(e))
            continue
        if unk is not None:
            hit = next((i for i, ids in enumerate(prompt_pieces) if unk in ids), None)
            if hit is not None:
                fail(where, rid, "unknown_characters", f"the prompt has characters the tokenizer cannot encode: "
                                                       f"{_unknown_chars(tokenizer, prompt_texts[n][hit], unk)}")
                continue
            k = next((k for k, ids in enumerate(trace_ids) if unk in ids), None)
            if k is not None:
                fail(at(raw, k), rid, "unknown_characters", f"traces[{k}] has characters the tokenizer cannot "
                                                            f"encode: {_unknown_chars(tokenizer, texts[k], unk)}")
                continue
        eos = ex.completion_ids[-1]
        if len(ex.prompt_ids) > P:
            fail(where, rid, "prompt_over_budget", f"prompt has {len(ex.prompt_ids)} tokens > max_prompt_len={P}")
            continue
        full = [ids + [eos] for ids in trace_ids]
        over_budget = [k for k, ids in enumerate(full) if len(ids) > T]
        if over_budget and overlong == "reject":
            k = over_budget[0]
            fail(at(raw, k), rid, "trace_over_budget",
                 f"traces[{k}] has {len(full[k])} tokens (incl. end-of-turn) > max_trace_len={T}")
            continue
        if over_budget:
            report.truncated_traces += len(over_budget)
            report.truncated_questions += 1
            ex_list = report.examples.setdefault("truncated", [])
            if len(ex_list) < _MAX_EXAMPLES:
                ex_list.append(f"{where}: record {rid!r}: traces {over_budget} cut to {T} tokens")
        report.questions_over_m += over
        questions.append(TokenizedQuestion(
            index=len(questions), id=rid, where=where, prompt_ids=np.asarray(ex.prompt_ids, np.int32),
            trace_ids=tuple(np.asarray(ids[:T], np.int32) for ids in full),
            truncated=tuple(len(ids) > T for ids in full), answer=answer,
        ))
    bad.sort(key=lambda b: b[0])
    bad = [b[1:] for b in bad]
    if bad and on_bad_record == "error":
        _raise(bad)
    for where, rid, reason, detail in bad:
        report.skipped[reason] = report.skipped.get(reason, 0) + 1
        ex_list = report.examples.setdefault(reason, [])
        if len(ex_list) < _MAX_EXAMPLES:
            ex_list.append(f"{where}: record {rid!r}: {detail}")
    report.num_kept = len(questions)
    report.divergence = divergence_report([q.trace_ids for q in questions], layout.cost_len)
    if report.divergence.warn:
        log.warning("SSFT data: %s", report.divergence.warning())
    if report.skipped or report.truncated_traces:
        log.warning("SSFT data: %s", report.summary())
    else:
        log.info("SSFT data: %s", report.summary())
    if not questions:
        raise DataError(f"no usable records among {len(raws)}: {report.summary()}", count=len(bad))
    return questions, report


def _raise(bad: list[tuple[str, str, str, str]]):
    lines = [f"{w}: record {rid!r}: {reason}: {detail}" for w, rid, reason, detail in bad[:20]]
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    counts = collections.Counter(b[2] for b in bad)
    w, rid, reason, _ = bad[0]
    raise DataError(
        f"{len(bad)} bad record(s) ({', '.join(f'{r}={c}' for r, c in sorted(counts.items()))}; "
        f"pass on_bad_record='skip' to skip and count them):\n  " + "\n  ".join(lines) + more,
        where=w, record_id=rid, reason=reason, count=len(bad),
    )


def load_questions(sources: Any, tokenizer, tags: tokenization.ForkingTags, layout: LayoutConfig, **kw):
    """``tokenize_records(sources, ...)``: files, folders, hub ids and/or in-memory lists -> (questions, report)."""
    return tokenize_records(sources, tokenizer, tags, layout, **kw)
