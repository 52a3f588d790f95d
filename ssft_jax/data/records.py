"""Reading, validating and tokenizing SSFT records (see ``ssft_jax.data`` for the record format)."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from ssft_jax import tokenization
from ssft_jax.data.layout import LayoutConfig

log = logging.getLogger("ssft_jax.data")

# Every reason a record can be bad, with what it means.
REASONS = {
    "broken_json": "the line is not valid JSON",
    "invalid_utf8": "bytes that are not valid UTF-8",
    "lone_surrogate": "a lone UTF-16 surrogate in a string",
    "nul_byte": "a NUL character in a string",
    "wrong_type": "a field has the wrong type",
    "missing_field": "a required field is missing",
    "duplicate_id": "the record id was already used by an earlier record",
    "bad_messages": "messages are not a non-empty list of {role, content} without a final assistant turn",
    "empty_prompt": "the question is empty",
    "no_traces": "the traces list is empty",
    "empty_trace": "a trace text is empty or whitespace only",
    "duplicate_trace": "two traces have exactly the same text",
    "too_many_traces": "more traces than M",
    "template_error": "the chat template cannot render the prompt safely",
    "prompt_over_budget": "the rendered prompt is longer than max_prompt_len",
    "trace_over_budget": "a trace (incl. end-of-turn token) is longer than max_trace_len (overlong='reject')",
}
ON_BAD_RECORD = ("error", "skip")
OVERLONG = ("truncate", "reject")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class DataError(ValueError):
    """A bad record (``on_bad_record='error'``). Attributes name the first one; the message lists up to 20."""

    def __init__(self, message: str, *, where: str = "", record_id: Any = None, reason: str = "", count: int = 1):
        super().__init__(message)
        self.where, self.record_id, self.reason, self.count = where, record_id, reason, count


# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RawRecord:
    """One input record (or the reason it could not even be parsed) and where it came from."""

    where: str
    record: Any = None
    reason: str | None = None  # set when reading failed (broken_json, invalid_utf8)
    detail: str = ""


_ENCODED_SURROGATE_RE = re.compile(b"\xed[\xa0-\xbf][\x80-\xbf]")  # U+D800..U+DFFF written as (invalid) UTF-8


def read_jsonl(path: str | os.PathLike) -> list[RawRecord]:
    """One ``RawRecord`` per non-blank line (``where = path:line``, 1-based); undecodable lines carry a reason.

    Bytes are classified the same way as the equivalent JSON escapes: a raw NUL byte is ``nul_byte`` (like
    ``\\u0000``), a surrogate code point written as UTF-8 bytes is ``lone_surrogate`` (like ``\\ud800``), any
    other invalid UTF-8 is ``invalid_utf8``. A UTF-8 byte-order mark at the start of the file is ignored.
    """
    path = pathlib.Path(path)
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            if b"\x00" in raw:
                out.append(RawRecord(where, reason="nul_byte", detail=f"a NUL byte at byte {raw.index(0)} of the line"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                m = _ENCODED_SURROGATE_RE.search(raw)
                if m:
                    cp = 0xD000 | ((raw[m.start() + 1] & 0x3F) << 6) | (raw[m.start() + 2] & 0x3F)
                    detail = f"surrogate U+{cp:04X} encoded as bytes at byte {m.start()} of the line"
                    out.append(RawRecord(where, reason="lone_surrogate", detail=detail))
                else:
                    out.append(RawRecord(where, reason="invalid_utf8", detail=str(e)))
                continue
            try:
                out.append(RawRecord(where, json.loads(text)))
            except json.JSONDecodeError as e:
                out.append(RawRecord(where, reason="broken_json", detail=str(e)))
    return out


def read_parquet(path: str | os.PathLike) -> list[RawRecord]:
    """One ``RawRecord`` per row (``where = path:row``, 0-based row index). Needs ``pyarrow``."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    path = pathlib.Path(path)
    rows = pq.read_table(path).to_pylist()
    return [RawRecord(f"{path}:row {i}", r) for i, r in enumerate(rows)]


def read_records(sources: Any, *, name: str = "records") -> list[RawRecord]:
    """Records from a path (``.jsonl``/``.json`` lines or ``.parquet``), a list of dicts, or a list of those.

    In-memory records are named ``name[index]``; a list of several in-memory lists gets ``name[k][index]``.
    """
    if isinstance(sources, (str, os.PathLike)):
        p = pathlib.Path(sources)
        if p.suffix == ".parquet":
            return read_parquet(p)
        if p.suffix in (".jsonl", ".json", ".ndjson"):
            return read_jsonl(p)
        raise ValueError(f"{p}: unknown record file type (expected .jsonl, .json (lines), .ndjson or .parquet)")
    if isinstance(sources, Mapping):
        raise TypeError("read_records takes a path or a list of records, not a single record")
    sources = list(sources)
    if not sources or any(isinstance(s, Mapping) for s in sources) or not all(
            isinstance(s, (str, os.PathLike, list, tuple)) for s in sources):
        return [RawRecord(f"{name}[{i}]", r) for i, r in enumerate(sources)]
    out: list[RawRecord] = []
    for k, s in enumerate(sources):
        if isinstance(s, (str, os.PathLike)):
            out.extend(read_records(s))
        elif isinstance(s, (list, tuple)):
            out.extend(RawRecord(f"{name}[{k}][{i}]", r) for i, r in enumerate(s))
        else:
            raise TypeError(f"source {k}: expected a path or a list of records, got {type(s).__name__}")
    return out


# --------------------------------------------------------------------------------------------
# Validation and tokenization
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedQuestion:
    """One question ready for layout: the Grain source element."""

    index: int  # position in the tokenized list (the batch's question_index)
    id: str
    where: str
    prompt_ids: np.ndarray  # [p] int32, the rendered prompt (generation prompt, no tag)
    trace_ids: tuple[np.ndarray, ...]  # 1..M arrays [len] int32: trace text + end-of-turn token, at most T
    truncated: tuple[bool, ...]  # per trace: cut to T (end-of-turn token lost)
    answer: Any = None


@dataclasses.dataclass
class ValidationReport:
    """What ``tokenize_records`` did: counts of skipped records per reason, truncations, a few examples each."""

    num_records: int = 0
    num_kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated_traces: int = 0
    truncated_questions: int = 0
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

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
        lines = ["; ".join(parts)]
        for reason, ex in sorted(self.examples.items()):
            lines.extend(f"  {reason}: {e}" for e in ex)
        return "\n".join(lines)


_MAX_EXAMPLES = 3


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _check_text(value: Any, what: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad("invalid_utf8", f"{what}: {e}") from None
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise _Bad("nul_byte", f"{what} contains a NUL character at offset {value.index(chr(0))}")
    m = _SURROGATE_RE.search(value)
    if m:
        raise _Bad("lone_surrogate", f"{what} contains a lone surrogate U+{ord(m.group()):04X} at offset {m.start()}")
    return value


def _check_record(rec: Any, num_traces: int) -> tuple[str, Any, list[str], Any]:
    """Structural checks. Returns (id, prompt (str or messages), trace texts, answer); raises _Bad."""
    if not isinstance(rec, Mapping):
        raise _Bad("wrong_type", f"a record must be an object, got {type(rec).__name__}")
    if "id" not in rec or rec["id"] is None:
        raise _Bad("missing_field", "no 'id'")
    rid = rec["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int, np.integer)):
        raise _Bad("wrong_type", f"'id' must be a string or an int, got {type(rid).__name__}")
    rid = _check_text(str(rid), "'id'")
    has_q, has_m = rec.get("question") is not None, rec.get("messages") is not None
    if has_q and has_m:
        raise _Bad("wrong_type", "has both 'question' and 'messages'; give one")
    if not has_q and not has_m:
        raise _Bad("missing_field", "no 'question' or 'messages'")
    if has_q:
        prompt: Any = _check_text(rec["question"], "'question'")
        if not prompt.strip():
            raise _Bad("empty_prompt", "'question' is empty")
    else:
        msgs = rec["messages"]
        if not isinstance(msgs, (list, tuple)) or not msgs:
            raise _Bad("bad_messages", "'messages' must be a non-empty list")
        prompt = []
        for k, m in enumerate(msgs):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise _Bad("bad_messages", f"messages[{k}] must be an object with 'role' and 'content'")
            role = _check_text(m["role"], f"messages[{k}].role")
            prompt.append({"role": role, "content": _check_text(m["content"], f"messages[{k}].content")})
        if prompt[-1]["role"] == "assistant":
            raise _Bad("bad_messages", "'messages' ends with an assistant turn (the traces are the assistant turn)")
    if "traces" not in rec or rec["traces"] is None:
        raise _Bad("missing_field", "no 'traces'")
    traces = rec["traces"]
    if not isinstance(traces, (list, tuple)):
        raise _Bad("wrong_type", f"'traces' must be a list, got {type(traces).__name__}")
    if not traces:
        raise _Bad("no_traces", "'traces' is empty")
    texts: list[str] = []
    for k, t in enumerate(traces):
        if not isinstance(t, Mapping):
            raise _Bad("wrong_type", f"traces[{k}] must be an object with 'text', got {type(t).__name__}")
        if "text" not in t or t["text"] is None:
            raise _Bad("missing_field", f"traces[{k}] has no 'text'")
        text = _check_text(t["text"], f"traces[{k}].text")
        if t.get("source") is not None:
            _check_text(t["source"], f"traces[{k}].source")
        if not text.strip():
            raise _Bad("empty_trace", f"traces[{k}] is empty")
        if text in texts:
            raise _Bad("duplicate_trace", f"traces[{k}] repeats traces[{texts.index(text)}] exactly")
        texts.append(text)
    if len(texts) > num_traces:
        raise _Bad("too_many_traces", f"{len(texts)} traces > M={num_traces}")
    return rid, prompt, texts, rec.get("answer")


def _encode_many(tokenizer, texts: list[str], chunk: int = 1024) -> list[list[int]]:
    """``encode_text`` on each text, in batched tokenizer calls (same ids, much faster)."""
    out: list[list[int]] = []
    for s in range(0, len(texts), chunk):
        enc = tokenizer(texts[s:s + chunk], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out.extend(list(e) for e in enc)
    return out


def tokenize_records(
    records: Any,
    tokenizer,
    tags: tokenization.ForkingTags,
    layout: LayoutConfig,
    *,
    on_bad_record: str = "error",
    overlong: str = "truncate",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[TokenizedQuestion], ValidationReport]:
    """Validate and tokenize all records (anything ``read_records`` takes, or a list of ``RawRecord``).

    Each prompt is rendered once (``render_example`` with the first trace: the generation prompt and the template's
    end-of-turn token are the same for every trace); trace texts are encoded as plain text in batched calls and get
    the end-of-turn token appended. Raises ``DataError`` (on_bad_record='error') or skips and counts.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {on_bad_record!r}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if tags.n != layout.num_tags:
        raise ValueError(f"tags.n={tags.n} != LayoutConfig.num_tags={layout.num_tags}")
    raws = records if (isinstance(records, list) and records and all(isinstance(r, RawRecord) for r in records)) \
        else read_records(records)
    report = ValidationReport(num_records=len(raws))
    bad: list[tuple[int, str, str, str, str]] = []  # position, where, id, reason, detail

    def fail(where, rid, reason, detail):
        bad.append((pos, where, rid, reason, detail))

    # Pass 1: structure.
    checked = []
    seen_ids: dict[str, str] = {}
    for pos, raw in enumerate(raws):
        rid = "?"
        if isinstance(raw.record, Mapping) and raw.record.get("id") is not None:
            rid = str(raw.record.get("id"))
        if raw.reason is not None:
            fail(raw.where, rid, raw.reason, raw.detail)
            continue
        try:
            rid, prompt, texts, answer = _check_record(raw.record, layout.num_traces)
        except _Bad as e:
            fail(raw.where, rid, e.reason, e.detail)
            continue
        if rid in seen_ids:
            fail(raw.where, rid, "duplicate_id", f"id {rid!r} already used at {seen_ids[rid]}")
            continue
        seen_ids[rid] = raw.where
        checked.append((pos, raw.where, rid, prompt, texts, answer))
    if bad and on_bad_record == "error":
        # Strict mode names the first bad record in input order: the records before the first structural failure
        # still get the (tokenizer) checks of pass 2, the rest is not tokenized at all.
        checked = [c for c in checked if c[0] < bad[0][0]]

    # Pass 2: render prompts, encode traces, apply budgets.
    all_texts = [t for c in checked for t in c[4]]
    all_ids = iter(_encode_many(tokenizer, all_texts))
    questions: list[TokenizedQuestion] = []
    P, T = layout.max_prompt_len, layout.max_trace_len
    for pos, where, rid, prompt, texts, answer in checked:
        trace_ids = [next(all_ids) for _ in texts]
        try:
            ex = tokenization.render_example(tokenizer, prompt, texts[0], tags, None, add_eos=True, example_id=rid,
                                             chat_template_kwargs=chat_template_kwargs)
        except (tokenization.TemplateError, tokenization.PromptPrefixError) as e:
            fail(where, rid, "template_error", str(e))
            continue
        eos = ex.completion_ids[-1]
        if len(ex.prompt_ids) > P:
            fail(where, rid, "prompt_over_budget", f"prompt has {len(ex.prompt_ids)} tokens > max_prompt_len={P}")
            continue
        full = [ids + [eos] for ids in trace_ids]
        over = [k for k, ids in enumerate(full) if len(ids) > T]
        if over and overlong == "reject":
            k = over[0]
            fail(where, rid, "trace_over_budget",
                 f"traces[{k}] has {len(full[k])} tokens (incl. end-of-turn) > max_trace_len={T}")
            continue
        if over:
            report.truncated_traces += len(over)
            report.truncated_questions += 1
            ex_list = report.examples.setdefault("truncated", [])
            if len(ex_list) < _MAX_EXAMPLES:
                ex_list.append(f"{where}: record {rid!r}: traces {over} cut to {T} tokens")
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
    """``tokenize_records(read_records(sources), ...)``: files and/or in-memory lists -> (questions, report)."""
    return tokenize_records(read_records(sources), tokenizer, tags, layout, **kw)

