"""Synthetic multi-strategy arithmetic: ground truth for measuring mode collapse vs mode preservation.

Every question is a multi-operand addition with pairwise distinct positive operands::

    What is 47 + 385 + 12 + 66?

and comes with one correct trace per solution strategy. The four strategies differ in their surface form
(what the first characters look like) AND in the intermediate values they compute, so ``verify`` can name the
strategy of any generated text from its structure alone:

=================  ==========================================================================================
``left_to_right``  ``47+385=432. 432+12=444. 444+66=510.``  running sum in the given order
``right_to_left``  ``66+12=78. 78+385=463. 463+47=510.``  running sum from the last operand backwards
``place_value``    ``ones: 7+5+2+6=20. tens: 40+80+10+60=190. hundreds: 300=300. 20+190+300=510.``
                   column sums (zero digits skipped; an all-zero column reads ``tens: 0=0``), then combined;
                   with a single column the combine step is left out
``round_tens``     ``47->50-3, 385->390-5, 12->10+2, 66->70-4. 50+390+10+70=520. -3-5+2-4=-10. 520-10=510.``
                   round each operand to the nearest ten (halves up), add the rounded numbers, add the
                   corrections, combine
=================  ==========================================================================================

Every trace ends with the line ``\\nAnswer: 510``. Traces are compact (no spaces around operators) so a tiny
character-level model trained from scratch can learn them in minutes; ``CHARSET`` lists every character that
questions and traces can contain.

Operands are pairwise distinct, so ``left_to_right`` and ``right_to_left`` never coincide (for two operands
they are ``a+b=..`` vs ``b+a=..``). Telling those two apart needs the question's operands (the direction is
the only difference), so ``verify`` takes the question or record.

Determinism: everything derives from ``random.Random(seed)``; the same arguments give the same records. Record
ids are content based (``add-47-385-12-66``), hence stable across seeds and unique within a build (a build never
repeats an operand multiset, so no held-out question is a permutation of a training question).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Mapping, Sequence

STRATEGIES: tuple[str, ...] = ("left_to_right", "right_to_left", "place_value", "round_tens")
# The 'styles' set (dataset ``synthetic_styles``, the demo's task): four strategies that differ in their structure,
# so the classifier (``classify_style``) names the style a text is written in without needing its operands to be
# copied right. ``left_to_right`` and ``right_to_left`` differ only in operand order: a model that has not yet learnt
# to copy operands in order (the demo's 200-step model writes running sums of wrong operands under most tags) writes
# neither recognisably, and the matching cannot tell the two apart either (their first L tokens are the same kind of
# text). ``running_sum`` renders as ``left_to_right``; ``pairs`` sums neighbouring operands first (a tree, not a
# chain), so its partial sums, and the questions it finds hard, differ from the running sum's.
STYLE_STRATEGIES: tuple[str, ...] = ("running_sum", "pairs", "place_value", "round_tens")
STRATEGY_SETS: dict[str, tuple[str, ...]] = {"order": STRATEGIES, "styles": STYLE_STRATEGIES}

COLUMN_NAMES: tuple[str, ...] = (
    "ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands",
)
MAX_DIGITS = len(COLUMN_NAMES)

QUESTION_PREFIX = "What is "
QUESTION_SUFFIX = "?"
ANSWER_PREFIX = "Answer: "
ANSWER_SEPARATOR = "\n"


def _charset() -> str:
    chars = set("0123456789+-=>.,:() \n")
    for word in (QUESTION_PREFIX, QUESTION_SUFFIX, ANSWER_PREFIX, ANSWER_SEPARATOR, *COLUMN_NAMES):
        chars.update(word)
    return "".join(sorted(chars))


# Every character a question or a trace can contain, sorted (for a tiny character-level tokenizer).
CHARSET: str = _charset()


@dataclasses.dataclass(frozen=True)
class SyntheticDifficulty:
    """Difficulty knobs: how many operands and how many digits each operand has (both inclusive ranges).

    Each operand draws its digit count uniformly from [min_digits, max_digits], then a value uniformly among
    the numbers with that many digits (1-digit operands are 1..9, never 0).
    """

    min_operands: int = 2
    max_operands: int = 4
    min_digits: int = 2
    max_digits: int = 3
    # Allow the same operand multiset in several orders within a split (one-digit operands have only a few hundred
    # multisets); held-out multisets still never occur in the training split, in any order.
    reorders: bool = False

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"need 2 <= min_operands <= max_operands, got {self}")
        if not 1 <= self.min_digits <= self.max_digits <= MAX_DIGITS:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= {MAX_DIGITS}, got {self}")


DIFFICULTIES: dict[str, SyntheticDifficulty] = {
    # One-digit operands: every sum a tiny model needs is in a small table it memorises within a few hundred steps,
    # so the demo's budget goes to the strategies, not to learning carrying arithmetic (see configs/demo.py).
    "digits": SyntheticDifficulty(2, 4, 1, 1, reorders=True),
    "tiny": SyntheticDifficulty(2, 2, 1, 2),
    "easy": SyntheticDifficulty(2, 3, 2, 2),
    "medium": SyntheticDifficulty(2, 4, 2, 3),
    "hard": SyntheticDifficulty(4, 6, 2, 4),
}


def _as_difficulty(difficulty: SyntheticDifficulty | str) -> SyntheticDifficulty:
    if isinstance(difficulty, str):
        try:
            return DIFFICULTIES[difficulty]
        except KeyError:
            raise ValueError(f"unknown difficulty {difficulty!r}; known: {sorted(DIFFICULTIES)}") from None
    return difficulty


def question_text(operands: Sequence[int]) -> str:
    return QUESTION_PREFIX + " + ".join(str(int(o)) for o in operands) + QUESTION_SUFFIX


_QUESTION_RE = re.compile(r"What is\s+(\d+(?:\s*\+\s*\d+)+)\s*\?")


def parse_question(text: str) -> tuple[int, ...]:
    """Operands of a question produced by ``question_text`` (raises ValueError otherwise)."""
    m = _QUESTION_RE.search(text)
    if m is None:
        raise ValueError(f"not a synthetic addition question: {text!r}")
    return tuple(int(t) for t in m.group(1).split("+"))


def make_question(rng: random.Random, difficulty: SyntheticDifficulty | str = SyntheticDifficulty()
                  ) -> tuple[str, tuple[int, ...]]:
    """One question with pairwise distinct operands: (question text, operands)."""
    d = _as_difficulty(difficulty)
    n = rng.randint(d.min_operands, d.max_operands)
    # The smallest digit range has 9 values; with more operands than that, distinctness could loop forever.
    if d.min_digits == d.max_digits and n > 9 * 10 ** (d.min_digits - 1):
        raise ValueError(f"cannot draw {n} distinct {d.min_digits}-digit operands")
    operands: list[int] = []
    while len(operands) < n:
        k = rng.randint(d.min_digits, d.max_digits)
        v = rng.randint(1 if k == 1 else 10 ** (k - 1), 10 ** k - 1)
        if v not in operands:
            operands.append(v)
    ops = tuple(operands)
    return question_text(ops), ops


# ----------------------------------------------------------------------------------------------- rendering

def _answer_line(total: int) -> str:
    return f"{ANSWER_SEPARATOR}{ANSWER_PREFIX}{total}"


def _running_sum(ops: Sequence[int]) -> str:
    steps, acc = [], ops[0]
    for o in ops[1:]:
        steps.append(f"{acc}+{o}={acc + o}.")
        acc += o
    return " ".join(steps)


def _place_value(ops: Sequence[int]) -> str:
    n_cols = max(len(str(o)) for o in ops)
    parts, col_sums = [], []
    for k in range(n_cols):
        terms = [(o // 10 ** k) % 10 * 10 ** k for o in ops if o >= 10 ** k]
        terms = [t for t in terms if t]
        s = sum(terms)
        col_sums.append(s)
        parts.append(f"{COLUMN_NAMES[k]}: {'+'.join(map(str, terms)) if terms else '0'}={s}.")
    if n_cols > 1:
        parts.append(f"{'+'.join(map(str, col_sums))}={sum(col_sums)}.")
    return " ".join(parts)


def _round10(x: int) -> int:
    return 10 * ((x + 5) // 10)


def _signed_terms(values: Sequence[int]) -> str:
    out = str(values[0])
    for v in values[1:]:
        out += f"+{v}" if v >= 0 else f"-{-v}"
    return out


def _round_tens(ops: Sequence[int]) -> str:
    rounded = [_round10(o) for o in ops]
    corr = [o - r for o, r in zip(ops, rounded)]
    markers = ", ".join(f"{o}->{r}{'+' if c >= 0 else '-'}{abs(c)}" for o, r, c in zip(ops, rounded, corr))
    r_sum, c_sum = sum(rounded), sum(corr)
    final = f"{r_sum}{'+' if c_sum >= 0 else '-'}{abs(c_sum)}={r_sum + c_sum}."
    return f"{markers}. {'+'.join(map(str, rounded))}={r_sum}. {_signed_terms(corr)}={c_sum}. {final}"


def _pairs(ops: Sequence[int]) -> str:
    """``(a+b)+(c+d)+e=s1+s2+e=t.``: neighbouring operands summed in brackets, then the pair sums together."""
    groups = [ops[i:i + 2] for i in range(0, len(ops), 2)]
    written = "+".join(f"({g[0]}+{g[1]})" if len(g) == 2 else str(g[0]) for g in groups)
    sums = [sum(g) for g in groups]
    if len(sums) == 1:
        return f"{written}={sums[0]}."
    return f"{written}={'+'.join(map(str, sums))}={sum(sums)}."


_RENDERERS = {
    "left_to_right": _running_sum,
    "running_sum": _running_sum,
    "pairs": _pairs,
    "right_to_left": lambda ops: _running_sum(list(ops)[::-1]),
    "place_value": _place_value,
    "round_tens": _round_tens,
}


def render_trace(operands: Sequence[int], strategy: str) -> str:
    """The reference trace of ``strategy`` for these operands, ending with ``\\nAnswer: <sum>``."""
    if strategy not in _RENDERERS:
        raise ValueError(f"unknown strategy {strategy!r}; known: {tuple(_RENDERERS)}")
    ops = [int(o) for o in operands]
    if len(ops) < 2 or any(o <= 0 for o in ops):
        raise ValueError(f"need at least two positive operands, got {operands}")
    return _RENDERERS[strategy](ops) + _answer_line(sum(ops))


# ----------------------------------------------------------------------------------------------- records

def record_id(operands: Sequence[int]) -> str:
    return "add-" + "-".join(str(int(o)) for o in operands)


def make_record(operands: Sequence[int], strategies: Sequence[str] = STRATEGIES) -> dict:
    ops = tuple(int(o) for o in operands)
    return {
        "id": record_id(ops),
        "question": question_text(ops),
        "traces": [{"text": render_trace(ops, s), "source": s} for s in strategies],
        "answer": str(sum(ops)),
    }


def _strategies(num_strategies: int, strategy_set: str = "order") -> tuple[str, ...]:
    if strategy_set not in STRATEGY_SETS:
        raise ValueError(f"unknown strategy set {strategy_set!r}; known: {sorted(STRATEGY_SETS)}")
    names = STRATEGY_SETS[strategy_set]
    if not 1 <= num_strategies <= len(names):
        raise ValueError(f"num_strategies must be in 1..{len(names)}, got {num_strategies}")
    return names[:num_strategies]


def _unique_operand_tuples(n: int, rng: random.Random, difficulty: SyntheticDifficulty,
                           exclude: set | None = None) -> list[tuple[int, ...]]:
    """n operand tuples whose operand multisets are pairwise different (and not in ``exclude``)."""
    excluded = frozenset(exclude or ())  # operand multisets (sorted tuples) no question may be a reordering of
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    misses, max_misses = 0, 1000 + 50 * n
    while len(out) < n:
        _, ops = make_question(rng, difficulty)
        key = ops if difficulty.reorders else tuple(sorted(ops))
        if key in seen or tuple(sorted(ops)) in excluded:
            misses += 1
            if misses > max_misses:
                raise ValueError(f"could only draw {len(out)} of {n} distinct questions at {difficulty}; "
                                 "ask for fewer or raise the difficulty")
            continue
        seen.add(key)
        out.append(ops)
    return out


def build_records(n_questions: int, *, seed: int, num_strategies: int = 4,
                  difficulty: SyntheticDifficulty | str = SyntheticDifficulty(), strategy_set: str = "order"
                  ) -> list[dict]:
    """``n_questions`` records, each with one trace per strategy (fixed order
    ``STRATEGY_SETS[strategy_set][:num_strategies]``, ``source`` = strategy name). Questions never repeat an operand
    multiset (an operand order, for a difficulty with ``reorders``). Deterministic in ``seed``."""
    strategies = _strategies(num_strategies, strategy_set)
    rng = random.Random(seed)
    return [make_record(ops, strategies)
            for ops in _unique_operand_tuples(n_questions, rng, _as_difficulty(difficulty))]


def build_splits(n_train: int, n_heldout: int, *, seed: int, num_strategies: int = 4,
                 difficulty: SyntheticDifficulty | str = SyntheticDifficulty(), strategy_set: str = "order"
                 ) -> tuple[list[dict], list[dict]]:
    """(train, heldout) with disjoint questions: no held-out operand multiset occurs in train (so a held-out
    question is not even a reordering of a training one). Deterministic in ``seed``."""
    d = _as_difficulty(difficulty)
    if not d.reorders:
        records = build_records(n_train + n_heldout, seed=seed, num_strategies=num_strategies, difficulty=d,
                                strategy_set=strategy_set)
        return records[:n_train], records[n_train:]
    # Held-out multisets first, then training questions that are no reordering of any of them.
    strategies, rng = _strategies(num_strategies, strategy_set), random.Random(seed)
    held = _unique_operand_tuples(n_heldout, rng, dataclasses.replace(d, reorders=False))
    train = _unique_operand_tuples(n_train, rng, d, exclude={tuple(sorted(o)) for o in held})
    return [make_record(o, strategies) for o in train], [make_record(o, strategies) for o in held]


def splits_from_config(config, strategy_set: str = "order") -> tuple[list[dict], list[dict]]:
    """``build_splits`` for a run config (the ``synthetic`` dataset of ``ssft_jax.datasets``; ``synthetic_styles``
    with ``strategy_set='styles'``): sizes and difficulty from ``data.synthetic``, one trace per strategy up to
    ``ssft.max_traces``, seeded by ``seed``."""
    s = config.data.synthetic
    splits = build_splits(s.num_questions, s.heldout, seed=config.seed, num_strategies=config.ssft.max_traces,
                          difficulty=s.difficulty, strategy_set=strategy_set)
    system = s.get("system_prompt")
    if system is None:  # the chat template's own (SmolLM2's default system turn is ~16 tokens of every row)
        return splits
    return tuple([with_system_prompt(r, system) for r in split] for split in splits)


def with_system_prompt(record: dict, system: str) -> dict:
    """The record asked as messages under an explicit system turn (`data.synthetic.system_prompt`; "" gives an
    empty one) instead of the chat template's default."""
    out = {k: v for k, v in record.items() if k != "question"}
    out["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": record["question"]}]
    return out


def style_splits_from_config(config) -> tuple[list[dict], list[dict]]:
    """The ``synthetic_styles`` dataset: the same questions as ``synthetic``, traces in the 'styles' set."""
    return splits_from_config(config, strategy_set="styles")


# ----------------------------------------------------------------------------------------------- verifier

@dataclasses.dataclass(frozen=True)
class VerifyResult:
    correct: bool                # the final "Answer:" value equals the true sum
    answer: str | None           # the last "Answer: n" value, None if there is none
    strategy: str | None         # the recognised strategy, None if unrecognisable or ambiguous
    expected: str = ""           # the true sum


_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")
# A marker is written as the traces write it: no spaces, no leading zero in the rounded value (random text such as
# "510 ->00 +4" is no marker).
_ROUND_RE = re.compile(r"(\d+)->(0|[1-9]\d*)([+-])(\d+)")
_COLUMN_RE = re.compile(
    r"\b(hundred-thousands|ten-thousands|thousands|hundreds|tens|ones):\s*(\d+(?:\s*\+\s*\d+)*)\s*=\s*(\d+)")
# A running-sum step "x+y=z" as the traces write it: at the start of the text or after whitespace (so never the
# tail of a longer sum such as "7+5+2=14", of a marker "a->b+c" or of a word), no spaces inside.
_BINARY_RE = re.compile(r"(?:^|(?<=\s))(\d+)\+(\d+)=(-?\d+)")


def _operands_of(question_or_record: Any) -> tuple[int, ...]:
    if isinstance(question_or_record, Mapping):
        if question_or_record.get("question") is None:  # a record with a system turn: the user turn asks
            return parse_question(next(m["content"] for m in question_or_record["messages"] if m["role"] == "user"))
        return parse_question(question_or_record["question"])
    if isinstance(question_or_record, str):
        return parse_question(question_or_record)
    ops = tuple(int(o) for o in question_or_record)
    if len(ops) < 2:
        raise ValueError(f"need at least two operands, got {question_or_record!r}")
    return ops


def _round_evidence(work: str) -> int:
    """Number of well-formed rounding markers ``x->r+c`` / ``x->r-c`` (r a multiple of ten, c <= 5)."""
    return sum(1 for m in _ROUND_RE.finditer(work) if int(m.group(2)) % 10 == 0 and int(m.group(4)) <= 5)


def _column_evidence(work: str) -> int:
    """Number of well-formed column sections ``tens: 40+80=120`` (terms multiples of the column's place value)."""
    n = 0
    for m in _COLUMN_RE.finditer(work):
        place = 10 ** COLUMN_NAMES.index(m.group(1))
        terms = [int(t) for t in m.group(2).split("+")]
        if all(t % place == 0 for t in terms):
            n += 1
    return n


def _direction_scores(work: str, ops: Sequence[int]) -> tuple[float, float]:
    """How well the running-sum chain's operand order matches the question forwards / backwards (0..1).

    The chain ``a+b=s. s+c=t. ...`` adds operands in the order [a, b, c, ...]; this order is compared position
    by position with the question's operands and with their reverse. Intermediate sums are ignored, so a wrong
    digit in a partial sum (and everything it propagates to) does not change the verdict.
    """
    eqs = [(m.group(1), m.group(2)) for m in _BINARY_RE.finditer(work)]
    if not eqs:
        return 0.0, 0.0
    order = [eqs[0][0]] + [y for _, y in eqs]  # compared as written: "047" is not 47
    names = [str(o) for o in ops]
    denom = max(len(order), len(ops))
    fwd = sum(a == b for a, b in zip(order, names)) / denom
    bwd = sum(a == b for a, b in zip(order, reversed(names))) / denom
    return fwd, bwd


def classify_strategy(question_or_record: Any, text: str) -> str | None:
    """The strategy of ``text`` from its structure, or None when unrecognisable or ambiguous.

    Rules, on the text before the last ``Answer:`` marker: well-formed rounding markers (at least half as many
    as operands, at least one) -> ``round_tens``; at least one well-formed column section -> ``place_value``;
    both -> None. Otherwise the running-sum chain's operand order must match the question forwards or backwards
    on at least half of the positions, and strictly better than the other direction.
    """
    ops = _operands_of(question_or_record)
    cut = text.rfind("Answer:")
    work = text if cut < 0 else text[:cut]
    has_round = _round_evidence(work) >= max(1, len(ops) // 2)
    has_cols = _column_evidence(work) >= 1
    if has_round and has_cols:
        return None
    if has_round:
        return "round_tens"
    if has_cols:
        return "place_value"
    fwd, bwd = _direction_scores(work, ops)
    if max(fwd, bwd) >= 0.5 and fwd != bwd:
        return "left_to_right" if fwd > bwd else "right_to_left"
    return None


_PAIR_RE = re.compile(r"\((\d+)\+(\d+)\)")


def classify_style(question_or_record: Any, text: str) -> str | None:
    """The 'styles' strategy (``STYLE_STRATEGIES``) of ``text`` from its structure alone, or None.

    On the text before the last ``Answer:`` marker: rounding markers (as in ``classify_strategy``) -> round_tens; a
    column section -> place_value; a bracketed pair ``(a+b)`` -> pairs; a running-sum step ``a+b=s`` at the start or
    after whitespace, in a text with none of the other styles' marks (``(``, ``->``, ``:``: the other styles write
    such steps too, e.g. ``ones: 6+9=15``) -> running_sum. Rounding markers, a column section or a pair together
    -> None (a mixture is no one strategy). Which numbers were written is not judged (the checker judges the
    answer): the style is what a tag is meant to steer.
    """
    ops = _operands_of(question_or_record)
    cut = text.rfind("Answer:")
    work = text if cut < 0 else text[:cut]
    found = [name for name, hit in (
        ("round_tens", _round_evidence(work) >= max(1, len(ops) // 2)),
        ("place_value", _column_evidence(work) >= 1),
        ("pairs", _PAIR_RE.search(work) is not None),
        ("running_sum", _BINARY_RE.search(work) is not None and "(" not in work and "->" not in work
         and ":" not in work)) if hit]
    return found[0] if len(found) == 1 else None


def extract_answer(text: str) -> str | None:
    """The value of the last ``Answer: n`` in ``text`` (normalised, e.g. ``007`` -> ``7``), or None."""
    matches = _ANSWER_RE.findall(text)
    return str(int(matches[-1])) if matches else None


def verify(question_or_record: Any, generated_text: str) -> VerifyResult:
    """Check the final answer of ``generated_text`` against the true sum and name its strategy.

    ``question_or_record``: a record dict, a question string, or the operands. Answer and strategy are judged
    independently: a trace can have the right strategy and a wrong answer, or vice versa.
    """
    ops = _operands_of(question_or_record)
    expected = str(sum(ops))
    answer = extract_answer(generated_text)
    return VerifyResult(correct=answer == expected, answer=answer,
                        strategy=classify_strategy(ops, generated_text), expected=expected)


def strategy_histogram(question_or_record: Any, texts: Sequence[str]) -> dict[str | None, int]:
    """Counts of recognised strategies (None = unrecognised) among several generations for one question."""
    out: dict[str | None, int] = {}
    for t in texts:
        s = classify_strategy(question_or_record, t)
        out[s] = out.get(s, 0) + 1
    return out


__all__ = [
    "STRATEGIES", "CHARSET", "COLUMN_NAMES", "DIFFICULTIES", "SyntheticDifficulty", "VerifyResult",
    "question_text", "parse_question", "make_question", "render_trace", "record_id", "make_record",
    "build_records", "build_splits", "splits_from_config", "style_splits_from_config", "classify_strategy",
    "classify_style", "STYLE_STRATEGIES", "STRATEGY_SETS", "extract_answer", "verify",
    "strategy_histogram",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Write synthetic multi-trace records as a native-format JSONL file: an example of the format a run reads
    (`--config.data.name=jsonl --config.data.path=FILE`), e.g. for the README's quick start."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--write", required=True, help="the JSONL file to write")
    p.add_argument("--num_questions", type=int, default=64, help="questions (one JSON line each)")
    p.add_argument("--difficulty", default="digits", help="one of the SyntheticDifficulty presets")
    p.add_argument("--strategies", default="styles", choices=sorted(STRATEGY_SETS), help="the strategy set")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    records = build_records(a.num_questions, seed=a.seed, difficulty=a.difficulty, strategy_set=a.strategies)
    with open(a.write, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(records)} questions x {len(records[0]['traces'])} traces to {a.write}")
    return 0
