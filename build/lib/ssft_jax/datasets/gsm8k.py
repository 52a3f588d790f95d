"""GSM8K as multi-trace records (OpenAI grade-school-math, MIT license), read in place from the shared folder.

Data folder, first that applies: the ``data_dir`` argument, the ``SSFT_JAX_GSM8K_DIR`` environment variable,
``<repo root>/../shared/data/gsm8k`` (resolved from this file's location). Nothing is copied into the repository.

Files used: ``{split}.jsonl`` ({question, answer}; answer ends with ``#### n`` and carries ``<<a*b=c>>``
calculator annotations), ``{split}_socratic.jsonl`` (same questions, every step prefixed by a sub-question
``How many ...? ** ...``) and, for the test split, ``example_model_solutions.jsonl`` (per question
``ground_truth`` and four model entries ``{is_correct, solution}``, solutions ending ``A: n``). Optional files
that are absent are reported in the stats, not fatal.

Multi-trace record for one question (common project format)::

    {"id": "gsm8k-test-0000", "question": ..., "answer": "18",
     "traces": [{"text": "...\\nThe answer is 18.", "source": "reference"},
                {"text": "How many eggs does Janet sell? ** ...\\nThe answer is 18.", "source": "socratic"},
                {"text": "...\\nThe answer is 18.", "source": "175b_verification"}]}

Trace order = preference order: ``reference``, ``socratic``, then the model solutions labelled correct in the
order of ``MODEL_PREFERENCE`` (larger model and verifier-selected first), then any other model key sorted.
Every trace's last line is replaced by the uniform ``The answer is {answer}.``; ``answer`` is the ``#### n`` of the
split file with thousands commas removed. Traces are de-duplicated on whitespace-normalised text (which also
catches exact duplicates), keeping the earlier (preferred) one. ``max_traces`` keeps the first that many.
Questions of the auxiliary files are matched to the split file by question text (exact, then whitespace
normalised); every mismatch is counted in ``LoadStats``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Sequence

from ssft_jax.data import formats

logger = logging.getLogger(__name__)

ENV_VAR = "SSFT_JAX_GSM8K_DIR"
MODEL_PREFERENCE: tuple[str, ...] = ("175b_verification", "175b_finetuning", "6b_verification", "6b_finetuning")
FINAL_LINE = "The answer is {answer}."

_CALC_RE = re.compile(r"<<[^<>]*>>")
_NUM = r"[-+]?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_HASH_RE = re.compile(r"####\s*(" + _NUM + ")")
_ANSWER_IS_RE = re.compile(r"[Tt]he (?:final )?answer is[:\s]*(" + _NUM + ")")
_A_COLON_RE = re.compile(r"(?:^|\n)\s*A:\s*(" + _NUM + ")")


def default_data_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    if data_dir is not None:
        return pathlib.Path(data_dir)
    env = os.environ.get(ENV_VAR)
    return pathlib.Path(env) if env else default_data_dir()


# ----------------------------------------------------------------------------------------------- answers

def normalize_number(s: str) -> str | None:
    """``"$1,000."`` -> ``"1000"``, ``"3.50"`` -> ``"3.50"``; None if not a number."""
    t = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if t.startswith("+"):
        t = t[1:]
    try:
        Decimal(t)
    except InvalidOperation:
        return None
    return t if t else None


def extract_gsm8k_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style text, commas and ``$`` removed, or None.

    Looks for, in this order of precedence, the last ``#### n``, the last ``The answer is n``, the last line
    starting ``A: n``. No fallback to "the last number in the text" (a truncated solution has no answer).
    """
    for rx in (_HASH_RE, _ANSWER_IS_RE, _A_COLON_RE):
        found = rx.findall(text)
        if found:
            return normalize_number(found[-1])
    return None


def to_decimal(s: str | None) -> Decimal | None:
    """A normalised answer (``normalize_number``, ``extract_gsm8k_answer``) as a Decimal, so that ``18.0`` equals
    ``18``; None for None or a non-number."""
    if s is None:
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def answer_is_correct(gold: str, text: str) -> bool:
    """Numeric comparison of ``text``'s extracted answer with ``gold`` (a number such as ``"1,000"``, or a text
    containing one of the answer markers, e.g. the reference ``... #### 1000``). ``18.0`` equals ``18``."""
    g = extract_gsm8k_answer(gold)
    if g is None:
        g = normalize_number(gold)
    g_val, p_val = to_decimal(g), to_decimal(extract_gsm8k_answer(text))
    return g_val is not None and p_val is not None and g_val == p_val


# ----------------------------------------------------------------------------------------------- traces

def _ws(text: str) -> str:
    return " ".join(text.split())


def strip_calculator(text: str) -> str:
    """Remove ``<<16-3-4=9>>`` calculator annotations."""
    return _CALC_RE.sub("", text)


def _body(text: str) -> str:
    """The solution without its final-answer line (``#### n`` or ``A: n``)."""
    lines = text.rstrip().split("\n")
    last = lines[-1].strip()
    if last.startswith("####") or last.startswith("A:"):
        lines = lines[:-1]
    return "\n".join(line.rstrip() for line in lines).strip()


def make_trace_text(solution: str, answer: str, *, clean_calculator: bool = True) -> str:
    body = _body(solution)
    if clean_calculator:
        body = strip_calculator(body)
    return body + "\n" + FINAL_LINE.format(answer=answer)


# ----------------------------------------------------------------------------------------------- loading

@dataclasses.dataclass
class LoadStats:
    split: str
    data_dir: str
    n_questions: int = 0
    socratic_file: bool = False
    model_file: bool = False
    matched_socratic: int = 0
    missing_socratic: int = 0             # split questions with no socratic entry
    extra_socratic: int = 0               # socratic entries whose question is not in the split file
    socratic_answer_mismatch: int = 0     # socratic entries whose #### differs (excluded)
    matched_model: int = 0
    missing_model: int = 0
    extra_model: int = 0
    model_ground_truth_mismatch: int = 0  # model-file entries whose ground truth answer differs (excluded)
    matched_by_normalized_text: int = 0   # matches found only after whitespace normalisation
    same_line_index: int = 0              # questions at the same line in every present file
    model_correct: int = 0
    model_incorrect_excluded: int = 0
    model_correct_but_wrong_answer: int = 0  # labelled correct but extracted answer differs (excluded)
    duplicates_removed: int = 0
    dropped_by_max_traces: int = 0
    leftover_calculator_markers: int = 0
    source_counts: dict = dataclasses.field(default_factory=dict)


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _gold(answer_text: str) -> str:
    m = _HASH_RE.findall(answer_text)
    if not m:
        raise ValueError(f"no '#### n' in GSM8K answer: {answer_text[-80:]!r}")
    g = normalize_number(m[-1])
    if g is None:
        raise ValueError(f"unparseable GSM8K answer {m[-1]!r}")
    return g


class _Index:
    """Question text -> first row (exact, then whitespace-normalised); tracks which rows were used."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.exact: dict[str, int] = {}
        self.norm: dict[str, int] = {}
        for i, r in enumerate(rows):
            self.exact.setdefault(r["question"], i)
            self.norm.setdefault(_ws(r["question"]), i)
        self.used: set[int] = set()

    def find(self, question: str) -> tuple[int | None, bool]:
        i = self.exact.get(question)
        if i is not None:
            self.used.add(i)
            return i, False
        i = self.norm.get(_ws(question))
        if i is not None:
            self.used.add(i)
            return i, True
        return None, False

    def n_unused(self) -> int:
        return len(self.rows) - len(self.used)


def _model_keys(row: dict) -> list[str]:
    keys = [k for k in row if isinstance(row[k], dict) and "solution" in row[k]]
    return [k for k in MODEL_PREFERENCE if k in keys] + sorted(k for k in keys if k not in MODEL_PREFERENCE)


def load_gsm8k_multitrace(split: str = "test", data_dir: str | os.PathLike | None = None,
                          max_traces: int | None = None, clean_calculator: bool = True,
                          return_stats: bool = False) -> list[dict] | tuple[list[dict], LoadStats]:
    """Multi-trace records for every question of ``{split}.jsonl`` (see the module docstring for the rules).

    Returns the records, or ``(records, LoadStats)`` with ``return_stats=True``; the stats are also logged.
    """
    if max_traces is not None and max_traces < 1:
        raise ValueError(f"max_traces must be >= 1, got {max_traces}")
    root = resolve_data_dir(data_dir)
    main_path = root / f"{split}.jsonl"
    if not main_path.is_file():
        raise FileNotFoundError(f"GSM8K file {main_path} not found (set {ENV_VAR} or pass data_dir)")
    rows = _read_jsonl(main_path)
    soc_path = root / f"{split}_socratic.jsonl"
    model_path = root / "example_model_solutions.jsonl"
    stats = LoadStats(split=split, data_dir=str(root), n_questions=len(rows),
                      socratic_file=soc_path.is_file(), model_file=split == "test" and model_path.is_file())
    soc = _Index(_read_jsonl(soc_path)) if stats.socratic_file else None
    mod = _Index(_read_jsonl(model_path)) if stats.model_file else None
    sources: collections.Counter = collections.Counter()

    records = []
    for qi, row in enumerate(rows):
        q, gold = row["question"], _gold(row["answer"])
        cands: list[tuple[str, str]] = [("reference", row["answer"])]
        same_line = True
        if soc is not None:
            i, by_norm = soc.find(q)
            stats.matched_by_normalized_text += by_norm
            same_line &= i == qi
            if i is None:
                stats.missing_socratic += 1
            else:
                stats.matched_socratic += 1
                s_ans = soc.rows[i]["answer"]
                if to_decimal(_gold(s_ans)) != to_decimal(gold):
                    stats.socratic_answer_mismatch += 1
                else:
                    cands.append(("socratic", s_ans))
        if mod is not None:
            i, by_norm = mod.find(q)
            stats.matched_by_normalized_text += by_norm
            same_line &= i == qi
            if i is None:
                stats.missing_model += 1
            else:
                stats.matched_model += 1
                m_row = mod.rows[i]
                gt = extract_gsm8k_answer(m_row.get("ground_truth", ""))
                if to_decimal(gt) != to_decimal(gold):
                    stats.model_ground_truth_mismatch += 1
                else:
                    for key in _model_keys(m_row):
                        entry = m_row[key]
                        if not entry.get("is_correct"):
                            stats.model_incorrect_excluded += 1
                        elif not answer_is_correct(gold, entry["solution"]):
                            stats.model_correct_but_wrong_answer += 1
                        else:
                            stats.model_correct += 1
                            cands.append((key, entry["solution"]))
        stats.same_line_index += same_line

        traces, seen = [], set()
        for source, sol in cands:
            text = make_trace_text(sol, gold, clean_calculator=clean_calculator)
            key = _ws(text)
            if key in seen:
                stats.duplicates_removed += 1
                continue
            seen.add(key)
            traces.append({"text": text, "source": source})
        if max_traces is not None and len(traces) > max_traces:
            stats.dropped_by_max_traces += len(traces) - max_traces
            traces = traces[:max_traces]
        for t in traces:
            sources[t["source"]] += 1
            if clean_calculator:
                stats.leftover_calculator_markers += t["text"].count("<<") + t["text"].count(">>")
        records.append({"id": f"gsm8k-{split}-{qi:04d}", "question": q, "traces": traces, "answer": gold})

    if soc is not None:
        stats.extra_socratic = soc.n_unused()
    if mod is not None:
        stats.extra_model = mod.n_unused()
    stats.source_counts = dict(sources)
    logger.info("GSM8K %s multitrace: %s", split, stats)
    return (records, stats) if return_stats else records


def load_gsm8k_single(split: str = "train", data_dir: str | os.PathLike | None = None,
                      clean_calculator: bool = True, limit: int | None = None) -> list[dict]:
    """Records with the single reference trace (``source='reference'``) of each question of ``{split}.jsonl``."""
    root = resolve_data_dir(data_dir)
    path = root / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file {path} not found (set {ENV_VAR} or pass data_dir)")
    rows = _read_jsonl(path)
    if limit is not None:
        rows = rows[:limit]
    out = []
    for qi, row in enumerate(rows):
        gold = _gold(row["answer"])
        text = make_trace_text(row["answer"], gold, clean_calculator=clean_calculator)
        out.append({"id": f"gsm8k-{split}-{qi:04d}", "question": row["question"],
                    "traces": [{"text": text, "source": "reference"}], "answer": gold})
    return out


GSM8K_HELDOUT = 200  # data.heldout="auto": the last 200 test questions, as it always was


def splits_from_config(config) -> tuple[list[dict], list[dict]]:
    """(train, held-out) for a run config (the ``gsm8k`` dataset of ``ssft_jax.datasets``): multi-trace data exists
    for GSM8K's test questions only, so the last ``data.heldout`` of them are held out ("auto": GSM8K_HELDOUT; a
    fraction: that share, rounded; 0: none); ``data.path`` (empty: the default folder) names the data folder,
    ``ssft.max_traces`` caps the traces per question."""
    records = load_gsm8k_multitrace("test", data_dir=config.data.path or None, max_traces=config.ssft.max_traces)
    held = config.data.heldout
    if held == "auto":
        held = GSM8K_HELDOUT
    elif type(held) is float:
        held = formats.heldout_count(held, len(records))
    return (records[:-held], records[-held:]) if held else (records, [])


# ------------------------------------------------------------------------------------- teachers (Figure 5)

# The four model solutions of example_model_solutions.jsonl, each a "teacher"; a gsm8k_teachers record's trace j is
# always TEACHERS[j], so a run's per-trace-position tag counts (summary['trace_tag_counts']) are per teacher.
TEACHERS: tuple[str, ...] = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
TEACHERS_HELDOUT = 48  # data.heldout="auto" for gsm8k_teachers: the last 48 of its 151 questions


def load_gsm8k_teachers(data_dir: str | os.PathLike | None = None, clean_calculator: bool = True) -> list[dict]:
    """The questions of ``example_model_solutions.jsonl`` on which all four model solutions are labelled correct,
    end in the gold answer and differ from each other (151 of 1319), traces in ``TEACHERS`` order with ``source``
    the teacher. The rest are counted and logged by reason, never dropped silently."""
    root = resolve_data_dir(data_dir)
    path = root / "example_model_solutions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file {path} not found (set {ENV_VAR} or pass data_dir)")
    out, skipped = [], collections.Counter()
    for line, row in enumerate(_read_jsonl(path), start=1):
        gold = extract_gsm8k_answer(row.get("ground_truth", ""))
        entries = [row.get(t) for t in TEACHERS]
        if gold is None or not all(isinstance(e, dict) and "solution" in e for e in entries):
            skipped["no gold answer or a teacher missing"] += 1
            continue
        if not all(e.get("is_correct") and answer_is_correct(gold, e["solution"]) for e in entries):
            skipped["a teacher's solution is wrong"] += 1
            continue
        texts = [make_trace_text(e["solution"], gold, clean_calculator=clean_calculator) for e in entries]
        if len({_ws(t) for t in texts}) < len(texts):
            skipped["two teachers wrote the same text"] += 1
            continue
        out.append({"id": f"gsm8k-teachers-{line:04d}", "question": row["question"], "answer": gold,
                    "traces": [{"text": t, "source": s} for t, s in zip(texts, TEACHERS)]})
    logger.info("GSM8K teachers: %d questions with all %d teachers correct and distinct; skipped %s", len(out),
                len(TEACHERS), dict(skipped))
    return out


def teacher_splits_from_config(config) -> tuple[list[dict], list[dict]]:
    """(train, held-out) of the ``gsm8k_teachers`` dataset: the last ``data.heldout`` questions ("auto":
    TEACHERS_HELDOUT; a fraction: that share) are held out; ``data.path`` (empty: the default folder)."""
    records = load_gsm8k_teachers(data_dir=config.data.path or None)
    held = config.data.heldout
    held = TEACHERS_HELDOUT if held == "auto" else formats.heldout_count(held, len(records))
    return (records[:-held], records[-held:]) if held else (records, [])


# ----------------------------------------------------------------------------------------------- summary

def summary(records: Sequence[dict]) -> dict[str, Any]:
    """Number of questions, traces-per-question histogram, trace counts per source, mean trace length."""
    lengths = [len(t["text"]) for r in records for t in r["traces"]]
    hist = collections.Counter(len(r["traces"]) for r in records)
    src = collections.Counter(t["source"] for r in records for t in r["traces"])
    return {
        "questions": len(records),
        "traces": len(lengths),
        "traces_per_question": dict(sorted(hist.items())),
        "mean_traces_per_question": len(lengths) / len(records) if records else 0.0,
        "mean_trace_chars": sum(lengths) / len(lengths) if lengths else 0.0,
        "max_trace_chars": max(lengths, default=0),
        "sources": dict(src.most_common()),
    }


def format_summary(name: str, s: dict[str, Any]) -> str:
    lines = [f"{name}: {s['questions']} questions, {s['traces']} traces "
             f"({s['mean_traces_per_question']:.2f}/question), mean {s['mean_trace_chars']:.0f} chars "
             f"(max {s['max_trace_chars']})",
             "  traces per question: " + ", ".join(f"{k}: {v}" for k, v in s["traces_per_question"].items()),
             "  sources: " + ", ".join(f"{k}: {v}" for k, v in s["sources"].items())]
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="GSM8K multi-trace statistics")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-traces", type=int, default=None)
    args = p.parse_args(None if argv is None else list(argv))
    recs, st = load_gsm8k_multitrace("test", data_dir=args.data_dir, max_traces=args.max_traces,
                                     return_stats=True)
    print(format_summary("test multi-trace", summary(recs)))
    print("  alignment:", {k: v for k, v in dataclasses.asdict(st).items()
                           if k not in ("source_counts", "data_dir", "split")})
    print(format_summary("train single-trace", summary(load_gsm8k_single("train", data_dir=args.data_dir))))
    r = recs[0]
    print(f"\nexample {r['id']}: {r['question']}  (answer {r['answer']})")
    for t in r["traces"]:
        print(f"--- {t['source']}\n{t['text']}")


if __name__ == "__main__":
    main()
