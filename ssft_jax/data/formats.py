"""Reading record sources and normalising the multi-trace shapes researchers already have into the native record.

Sources: JSON-lines files (``.jsonl``/``.json``/``.ndjson``), parquet files, ``datasets`` folders (``save_to_disk``),
hub dataset ids (``owner/name``, read through ``datasets`` from its local cache when offline) and in-memory lists of
dicts. A folder or hub id may name its split: ``SOURCE:split`` (default ``train``, or the only split there is).

Shapes (``FORMATS``; ``auto`` detects the shape of each source from the keys its rows have, ``None`` values not
counting, so parquet and ``datasets`` columns that a row leaves empty do not vote):

- ``native``, detected by ``traces``: ``{id?, question | messages, traces: [str | {text, source?}], answer?}``;
- ``s1k``, by ``thinking_trajectories``: ``{question, thinking_trajectories: [str], attempt?, solution?}`` (s1K);
- ``s1k_teachers``, by a ``<t>_thinking_trajectory`` column: ``{question, <t>_thinking_trajectory, <t>_attempt?,
  ..., solution?}`` (s1K-1.1: ``gemini_*``, ``deepseek_*``);
- ``messages``, by ``messages`` ending with an assistant turn (and no ``traces``): TRL conversational, one row per
  trace, ``{messages: [prompt turns..., {role: assistant, content: trace}]}``;
- ``prompt_completion``, by ``completion``: TRL prompt/completion, one row per trace, ``{prompt: str | messages,
  completion: str | [{role: assistant, content: trace}]}``.

``s1k`` rows become one question with a trace per trajectory, ``s1k_teachers`` rows one with a trace per teacher
(``source`` = the teacher, column order; a teacher whose trajectory is empty (``None``) has no trace); a trace is
the trajectory, then ``THINKING_ANSWER_SEPARATOR`` and the attempt when there is one; ``solution`` is the answer.
Rows of the per-trace shapes (``messages``, ``prompt_completion``; optional ``answer`` (or ``solution``), ``id`` and
``source`` columns) are grouped into questions by their prompt, across all sources of one ``read_records`` call:
the prompt's messages compared exactly (roles and contents, system turns included; a string prompt is the one user
turn it renders as), traces in row order, the question placed where its first row was. A source whose rows fit
more than one shape is a ``FormatError`` naming it, the candidate shapes and a row of each (force one with
``format=``); a source whose rows fit none is read as ``native``, whose validation names what is missing.

Records without an id get one derived from their prompt (``prompt_id``: a hash of the canonical prompt JSON), the
same in every run, whatever the order of rows or files. ``split_heldout`` holds questions out by a hash of their id.

A row that cannot be normalised becomes a ``RawRecord`` with its reason (``ssft_jax.data.REASONS``) and
``file:line`` (``file:row N`` for parquet and ``datasets``); a grouped question is then validated like a native
record, and an error in one of its traces names that trace's row (``RawRecord.trace_where``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FORMATS = ("auto", "native", "s1k", "s1k_teachers", "messages", "prompt_completion")
TEACHER_SUFFIX = "_thinking_trajectory"
THINKING_ANSWER_SEPARATOR = "\n\n"
JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_ENCODED_SURROGATE_RE = re.compile(b"\xed[\xa0-\xbf][\x80-\xbf]")  # U+D800..U+DFFF written as (invalid) UTF-8
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SPLIT_RE = re.compile(r"[\w.-]+")


class BadRecord(Exception):
    """A record (or row) is bad for `reason` (a ``REASONS`` key); ``trace``: the index of the trace it is about."""

    def __init__(self, reason: str, detail: str, trace: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.trace = reason, detail, trace


class DataError(ValueError):
    """Data that cannot be used: bad records (``on_bad_record='error'``; the attributes name the first one, the
    message lists up to 20), or a held-out split that leaves nothing to train on."""

    def __init__(self, message: str, *, where: str = "", record_id: Any = None, reason: str = "", count: int = 1):
        super().__init__(message)
        self.where, self.record_id, self.reason, self.count = where, record_id, reason, count


class FormatError(DataError):
    """A source that cannot be read as asked: its rows fit several shapes, or a folder or split that is not there."""


@dataclasses.dataclass
class RawRecord:
    """One input record (or the reason it could not be read or normalised) and where it came from."""

    where: str
    record: Any = None
    reason: str | None = None  # set when reading or normalising failed
    detail: str = ""
    trace_where: tuple[str, ...] = ()  # a grouped question: where each trace's row was (empty: all at `where`)


# --------------------------------------------------------------------------------------------
# Values: text, prompts, ids
# --------------------------------------------------------------------------------------------


def check_text(value: Any, what: str, trace: int | None = None) -> str:
    """`value` as a string, or BadRecord: wrong type, undecodable bytes, a NUL character, a lone surrogate."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("invalid_utf8", f"{what}: {e}", trace) from None
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"{what} must be a string, got {type(value).__name__}", trace)
    if "\x00" in value:
        raise BadRecord("nul_byte", f"{what} contains a NUL character at offset {value.index(chr(0))}", trace)
    m = _SURROGATE_RE.search(value)
    if m:
        raise BadRecord("lone_surrogate", f"{what} contains a lone surrogate U+{ord(m.group()):04X} at offset "
                        f"{m.start()}", trace)
    return value


def check_question(value: Any, what: str = "'question'") -> str:
    text = check_text(value, what)
    if not text.strip():
        raise BadRecord("empty_prompt", f"{what} is empty")
    return text


def check_messages(value: Any, what: str = "'messages'") -> list[dict[str, str]]:
    """A non-empty list of {role, content} (other keys dropped: they are not rendered) that does not end with an
    assistant turn (the traces are the assistant turn)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRecord("bad_messages", f"{what} must be a non-empty list")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise BadRecord("bad_messages", f"{what}[{k}] must be an object with 'role' and 'content'")
        out.append({"role": check_text(m["role"], f"{what}[{k}].role"),
                    "content": check_text(m["content"], f"{what}[{k}].content")})
    if out[-1]["role"] == "assistant":
        raise BadRecord("bad_messages", f"{what} ends with an assistant turn (the traces are the assistant turn)")
    return out


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A checked prompt as the messages it renders as (a string is one user turn, as `tokenization` renders it)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def prompt_id(prompt: str | list[dict[str, str]]) -> str:
    """The id of a question without one: a hash of its canonical prompt JSON (so the same in every run and for every
    order of rows and files, and the same for a string question and the one user message it renders as)."""
    canonical = json.dumps(as_messages(prompt), ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    return "q-" + hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


def native_prompt(rec: Mapping[str, Any]) -> str | list[dict[str, str]]:
    """The checked prompt of a native record: its 'question' or its 'messages'."""
    has_q, has_m = rec.get("question") is not None, rec.get("messages") is not None
    if has_q and has_m:
        raise BadRecord("wrong_type", "has both 'question' and 'messages'; give one")
    if not has_q and not has_m:
        raise BadRecord("missing_field", "no 'question' or 'messages'")
    return check_question(rec["question"]) if has_q else check_messages(rec["messages"])


def record_id(rec: Any) -> str | None:
    """A native record's id: its own ('id', as a string) or the one derived from its prompt; None when it has neither
    (the prompt is not valid: validation says why)."""
    if isinstance(rec, Mapping) and rec.get("id") is not None:
        return str(rec["id"])
    try:
        return prompt_id(native_prompt(rec)) if isinstance(rec, Mapping) else None
    except BadRecord:
        return None


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first NaN/Infinity number in a record (Python's json reads those literals; JSON has none)."""
    if isinstance(value, (float, np.floating)):
        return None if math.isfinite(value) else path
    if isinstance(value, Mapping):
        items: Iterable = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for p, v in items:
        hit = _non_finite(v, p)
        if hit is not None:
            return hit
    return None


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------


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
    """One ``RawRecord`` per row (``where = path:row N``, 0-based row index). Needs ``pyarrow``."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    path = pathlib.Path(path)
    rows = pq.read_table(path).to_pylist()
    return [RawRecord(f"{path}:row {i}", r) for i, r in enumerate(rows)]


def _pick_split(ds, split: str | None, source: str):
    """The split of a ``datasets`` DatasetDict: the one named, else ``train``, else the only one."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        if split is not None:
            raise FormatError(f"{source}: a single dataset (no splits) was given the split {split!r}")
        return ds, None
    names = list(ds)
    if split is None:
        split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
        if split is None:
            raise FormatError(f"{source}: splits {names} and no 'train': name one, e.g. {source}:{names[0]}")
    if split not in names:
        raise FormatError(f"{source}: no split {split!r}; it has {names}")
    return ds[split], split


def _dataset_rows(ds, label: str) -> list[RawRecord]:
    return [RawRecord(f"{label}:row {i}", r) for i, r in enumerate(ds.to_list())]


def read_datasets_folder(path: str | os.PathLike, split: str | None = None) -> list[RawRecord]:
    """The rows of a ``datasets`` ``save_to_disk`` folder (a Dataset, or a DatasetDict's `split`)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise FormatError(f"{path}: a folder must be a `datasets` save_to_disk folder ({e})") from None
    ds, split = _pick_split(ds, split, str(path))
    return _dataset_rows(ds, f"{path}[{split}]" if split else str(path))


def read_hub_dataset(repo_id: str, split: str | None = None) -> list[RawRecord]:
    """The rows of a hub dataset through ``datasets.load_dataset`` (offline, ``HF_HUB_OFFLINE=1``: from its local
    cache, ``datasets.config.HF_DATASETS_CACHE``). Not there: a FileNotFoundError naming the id and the cache."""
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        offline = " (HF_HUB_OFFLINE is set: the hub is not asked)" if datasets.config.HF_HUB_OFFLINE else ""
        raise FileNotFoundError(
            f"{repo_id!r} is no file or folder here, and the hub dataset {repo_id!r} is not in the local datasets "
            f"cache {datasets.config.HF_DATASETS_CACHE}{offline}: download it once with network access "
            f"(datasets.load_dataset({repo_id!r})), or save_to_disk it and pass the folder "
            f"({type(e).__name__}: {e})") from None
    ds, split = _pick_split(ds, split, repo_id) if split is None else (ds, split)
    return _dataset_rows(ds, f"{repo_id}[{split}]")


def read_source(source: str | os.PathLike) -> list[RawRecord]:
    """The rows of one source (see the module docstring): a file by its suffix, a folder, ``SOURCE:split``, a hub id.
    A source with no rows at all (an empty file) is a FormatError naming it: a path given by mistake, not data."""
    rows = _read_source(source)
    if not rows:
        raise FormatError(f"{source}: holds no records (an empty file, folder or split)")
    return rows


def _read_source(source: str | os.PathLike) -> list[RawRecord]:
    p = pathlib.Path(source)
    if p.is_file():
        if p.suffix == ".parquet":
            return read_parquet(p)
        if p.suffix in JSON_LINES_SUFFIXES:
            return read_jsonl(p)
        raise FormatError(f"{p}: unknown record file type (expected .jsonl, .json (lines), .ndjson, .parquet, a "
                          "`datasets` folder or a hub dataset id)")
    if p.is_dir():
        return read_datasets_folder(p)
    s = str(source)
    base, sep, split = s.rpartition(":")
    if sep and _SPLIT_RE.fullmatch(split) and (pathlib.Path(base).is_dir() or _HUB_ID_RE.fullmatch(base)):
        return read_datasets_folder(base, split) if pathlib.Path(base).is_dir() else read_hub_dataset(base, split)
    if p.suffix in JSON_LINES_SUFFIXES + (".parquet",) or not _HUB_ID_RE.fullmatch(s):
        raise FileNotFoundError(f"{s}: no such file or folder")
    return read_hub_dataset(s)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _ends_with_assistant(messages: Any) -> bool:
    return isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[-1], Mapping) and messages[
        -1].get("role") == "assistant"


def row_shapes(rec: Any) -> set[str]:
    """The shapes whose identifying keys a row has (None values do not count)."""
    if not isinstance(rec, Mapping):
        return set()
    keys = {k for k, v in rec.items() if v is not None}
    out = set()
    if "traces" in keys:
        out.add("native")
    elif "messages" in keys and _ends_with_assistant(rec["messages"]):
        out.add("messages")  # (messages without traces or a final assistant turn: a prompt-only native record)
    if "thinking_trajectories" in keys:
        out.add("s1k")
    if any(isinstance(k, str) and k.endswith(TEACHER_SUFFIX) for k in keys):
        out.add("s1k_teachers")
    if "completion" in keys:
        out.add("prompt_completion")
    return out


def detect_shape(label: str, rows: list[RawRecord]) -> str:
    """The one shape the rows of a source fit (``native`` when they fit none); FormatError when they fit several."""
    seen: dict[str, str] = {}
    for row in rows:
        if row.reason is None:
            for shape in sorted(row_shapes(row.record)):
                seen.setdefault(shape, row.where)
    if len(seen) > 1:
        raise FormatError(f"{label}: its rows fit several shapes: "
                          + ", ".join(f"{s} (e.g. {w})" for s, w in sorted(seen.items()))
                          + f"; set data.format (format=) to one of {FORMATS[1:]}", where=label)
    return next(iter(seen), "native")


def _optional_text(rec: Mapping[str, Any], key: str) -> str | None:
    v = rec.get(key)
    if v is not None and not isinstance(v, str):
        raise BadRecord("wrong_type", f"'{key}' must be a string, got {type(v).__name__}")
    return v


def _trace_text(thinking: str, attempt: str | None) -> str:
    return thinking if attempt is None else thinking + THINKING_ANSWER_SEPARATOR + attempt


def _question_record(rec: Mapping[str, Any], traces: list[dict[str, Any]]) -> dict[str, Any]:
    """The native record of an s1K-style row (one row = one question)."""
    out: dict[str, Any] = {k: rec[k] for k in ("id", "question", "messages") if rec.get(k) is not None}
    out["traces"] = traces
    if rec.get("solution") is not None:
        out["answer"] = rec["solution"]
    return out


def _from_s1k(rec: Mapping[str, Any]) -> dict[str, Any]:
    trajectories = rec["thinking_trajectories"]
    if not isinstance(trajectories, (list, tuple)):
        raise BadRecord("wrong_type", f"'thinking_trajectories' must be a list, got {type(trajectories).__name__}")
    attempt = _optional_text(rec, "attempt")
    traces = []
    for k, t in enumerate(trajectories):
        if not isinstance(t, str):
            raise BadRecord("wrong_type", f"thinking_trajectories[{k}] must be a string, got {type(t).__name__}", k)
        traces.append({"text": _trace_text(t, attempt)})
    return _question_record(rec, traces)


def _from_s1k_teachers(rec: Mapping[str, Any]) -> dict[str, Any]:
    traces = []
    for key in rec:
        if isinstance(key, str) and key.endswith(TEACHER_SUFFIX) and rec[key] is not None:
            teacher = key[: -len(TEACHER_SUFFIX)]
            thinking = _optional_text(rec, key)
            traces.append({"text": _trace_text(thinking, _optional_text(rec, f"{teacher}_attempt")), "source": teacher})
    return _question_record(rec, traces)


def _per_trace_row(shape: str, rec: Mapping[str, Any]) -> tuple[str | list[dict[str, str]], Any]:
    """(the prompt, the trace text) of a per-trace row."""
    if shape == "messages":
        if rec.get("messages") is None:
            raise BadRecord("missing_field", "no 'messages'")
        msgs = rec["messages"]
        last = msgs[-1] if isinstance(msgs, (list, tuple)) and len(msgs) >= 2 else None
        if not isinstance(last, Mapping) or last.get("role") != "assistant" or "content" not in last:
            raise BadRecord("bad_messages", "a per-trace 'messages' row must be prompt turns, then the assistant turn "
                                            "(its trace)")
        return check_messages(msgs[:-1], "'messages'"), last["content"]
    for key in ("prompt", "completion"):
        if rec.get(key) is None:
            raise BadRecord("missing_field", f"no '{key}'")
    prompt = rec["prompt"]
    prompt = check_messages(prompt, "'prompt'") if isinstance(prompt, (list, tuple)) else check_question(prompt,
                                                                                                          "'prompt'")
    completion = rec["completion"]
    if isinstance(completion, (list, tuple)):
        if len(completion) != 1 or not isinstance(completion[0], Mapping) or completion[0].get(
                "role") != "assistant" or "content" not in completion[0]:
            raise BadRecord("bad_messages", "a 'completion' given as messages must be exactly one assistant turn")
        completion = completion[0]["content"]
    return prompt, completion


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, default=str)


@dataclasses.dataclass
class _Group:
    """The rows of one prompt (per-trace shapes), in input order."""

    messages: list[dict[str, str]]
    rows: list[tuple[str, Mapping[str, Any], Any]] = dataclasses.field(default_factory=list)  # (where, row, trace)

    def _agreed(self, what: str, keys: tuple[str, ...]) -> tuple[Any, RawRecord | None]:
        """(the value the rows give for `what`: a row's first non-None of `keys`, rows without one not voting, None),
        or (None, the rejection of the question, at the first row that disagrees with the first that gave one)."""
        first: tuple[Any, str] | None = None
        for where, row, _ in self.rows:
            value = next((row[k] for k in keys if row.get(k) is not None), None)
            if value is None:
                continue
            if first is None:
                first = (value, where)
            elif _json(value) != _json(first[0]):
                return None, RawRecord(where, reason="conflicting_rows", detail=(
                    f"{what} {value!r}, but {first[0]!r} at {first[1]} (rows are grouped into one question by their "
                    "prompt)"))
        return (None if first is None else first[0]), None

    def record(self) -> RawRecord:
        """The question as a native record; rejected (with the record still naming it) when its rows disagree."""
        answer, bad_answer = self._agreed("answer", ("answer", "solution"))
        rid, bad_id = self._agreed("id", ("id",))
        m = self.messages
        rec: dict[str, Any] = ({"question": m[0]["content"]} if len(m) == 1 and m[0]["role"] == "user"
                               else {"messages": m})
        if rid is not None:
            rec["id"] = rid
        rec["traces"] = [{"text": text, **({"source": row["source"]} if row.get("source") is not None else {})}
                         for _, row, text in self.rows]
        if answer is not None:
            rec["answer"] = answer
        bad = bad_answer or bad_id
        if bad is not None:
            bad.record = rec
            return bad
        return RawRecord(self.rows[0][0], rec, trace_where=tuple(w for w, _, _ in self.rows))


def normalise(sources: list[tuple[str, list[RawRecord]]], format: str = "auto") -> list[RawRecord]:
    """Native ``RawRecord``s from the rows of each (label, rows) source, each of its detected (or the given) shape;
    per-trace rows of all sources grouped by prompt (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: expected one of {FORMATS}")
    out: list[RawRecord | _Group] = []
    groups: dict[str, _Group] = {}
    for label, rows in sources:
        shape = detect_shape(label, rows) if format == "auto" else format
        for row in rows:
            if row.reason is not None:
                out.append(row)
                continue
            rec = row.record
            try:
                hit = _non_finite(rec, "")
                if hit is not None:
                    raise BadRecord("non_finite_number", f"{hit or 'the record'} is not a finite number (NaN and "
                                                         "Infinity are not JSON, though Python's json reads them)")
                if shape == "native":
                    out.append(row)
                    continue
                if not isinstance(rec, Mapping):
                    raise BadRecord("wrong_type", f"a {shape} row must be an object, got {type(rec).__name__}")
                if shape == "s1k":
                    if rec.get("thinking_trajectories") is None:
                        raise BadRecord("missing_field", "no 'thinking_trajectories'")
                    out.append(RawRecord(row.where, _from_s1k(rec)))
                elif shape == "s1k_teachers":
                    out.append(RawRecord(row.where, _from_s1k_teachers(rec)))
                else:
                    prompt, trace = _per_trace_row(shape, rec)
                    messages = as_messages(prompt)
                    key = _json(messages)
                    if key not in groups:
                        groups[key] = _Group(messages)
                        out.append(groups[key])
                    groups[key].rows.append((row.where, rec, trace))
            except BadRecord as e:  # the record is kept beside its reason: the report names it by its id
                out.append(RawRecord(row.where, rec if isinstance(rec, Mapping) else None, reason=e.reason,
                                     detail=e.detail))
    return [r.record() if isinstance(r, _Group) else r for r in out]


def read_records(sources: Any, *, name: str = "records", format: str = "auto") -> list[RawRecord]:
    """Native records from a source (a path, folder, hub id: see ``read_source``), a list of dicts, a list of those,
    or a list of ``RawRecord`` (already read: returned as they are), normalised from each source's shape.

    In-memory records are named ``name[index]``; a list of several in-memory lists gets ``name[k][index]``.
    """
    if isinstance(sources, (str, os.PathLike)):
        return normalise([(str(sources), read_source(sources))], format)
    if isinstance(sources, Mapping):
        raise TypeError("read_records takes a path or a list of records, not a single record")
    sources = list(sources)
    if sources and all(isinstance(s, RawRecord) for s in sources):
        return sources
    if not sources or any(isinstance(s, Mapping) for s in sources) or not all(
            isinstance(s, (str, os.PathLike, list, tuple)) for s in sources):
        return normalise([(name, [RawRecord(f"{name}[{i}]", r) for i, r in enumerate(sources)])], format)
    parts: list[tuple[str, list[RawRecord]]] = []
    for k, s in enumerate(sources):
        if isinstance(s, (str, os.PathLike)):
            parts.append((str(s), read_source(s)))
        else:
            parts.append((f"{name}[{k}]", [RawRecord(f"{name}[{k}][{i}]", r) for i, r in enumerate(s)]))
    return normalise(parts, format)


# --------------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------------


def heldout_count(heldout: int | float, num_questions: int) -> int:
    """How many of `num_questions` `heldout` holds out: a count as it is, a fraction in (0, 1) rounded (at least 1).
    ValueError when that leaves nothing to train on."""
    k = heldout if isinstance(heldout, int) else max(1, round(heldout * num_questions))
    if k and k >= num_questions:
        raise DataError(f"data.heldout={heldout!r} holds out {k} of {num_questions} questions: none left to train on")
    return k


def hash_order(keys: Sequence[object]) -> list[int]:
    """The positions of `keys` ordered by the sha256 of each key's text (ties: by position): an order that depends
    on neither input order nor seed. The held-out split (`split_heldout`) and evaluation's validation split
    (`eval_metrics.validation_split`) both take their lowest-hashing questions from it."""
    digest = [hashlib.sha256(str(k).encode("utf-8", "surrogatepass")).hexdigest() for k in keys]
    return sorted(range(len(keys)), key=lambda i: (digest[i], i))


def split_heldout(records: list[RawRecord], heldout: int | float) -> tuple[list[RawRecord], list[RawRecord]]:
    """(train, held out), each in input order: the questions whose ids hash lowest are held out (``heldout_count``
    of the distinct ids), so the split depends on neither file order nor seed, and records that share an id land on
    the same side. Records without an id (unreadable, or an invalid prompt) stay in train, whose validation reports
    them."""
    ids = [record_id(r.record) if r.reason is None else None for r in records]
    distinct = sorted({i for i in ids if i is not None})
    distinct = [distinct[k] for k in hash_order(distinct)]
    held = set(distinct[: heldout_count(heldout, len(distinct))])
    return ([r for r, i in zip(records, ids) if i not in held], [r for r, i in zip(records, ids) if i in held])
