"""Answer checkers: (record, generated text) -> is the answer right, and which answer was given.

They sit below evaluation and below anything else that needs a reward for a generation (e.g. a reinforcement
stage), and depend on nothing but the datasets' own answer parsing.

Registry `CHECKERS` (checker name -> factory; a dataset names its checker in `ssft_jax.datasets`):
  synthetic  the synthetic task's verifier (`synthetic.verify`): the last `Answer: n` against the true sum;
  gsm8k      `#### n` / `The answer is n` / `A: n`, compared numerically (`18.0` = `18`);
  math       math-verify, the gold parsed first; a gold without math delimiters is wrapped in `$...$`; timeouts are
             disabled (they use signals, which work on the main thread only).
`register_checker(name, factory)` adds one; `get_checker(name)` builds it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

from ssft_jax.datasets import gsm8k as gsm8k_data, synthetic as synthetic_data


@dataclasses.dataclass(frozen=True)
class CheckResult:
    correct: bool
    answer: str | None  # the extracted answer, normalised: the key majority votes compare


@dataclasses.dataclass(frozen=True)
class Checker:
    """`check(record, text) -> CheckResult`, under a name."""

    name: str
    check: Callable[[Mapping[str, Any], str], CheckResult]

    def __call__(self, record: Mapping[str, Any], text: str) -> CheckResult:
        return self.check(record, text)


def check_synthetic(record: Mapping[str, Any], text: str) -> CheckResult:
    v = synthetic_data.verify(record, text)
    return CheckResult(v.correct, v.answer)


def check_gsm8k(record: Mapping[str, Any], text: str) -> CheckResult:
    ans = gsm8k_data.extract_gsm8k_answer(text)
    value = gsm8k_data.to_decimal(ans)
    if value is not None:
        ans = format(value.normalize(), "f")  # "18.0" and "18" vote together, 1000 stays 1000
    return CheckResult(gsm8k_data.answer_is_correct(str(record["answer"]), text), ans)


_MATH_DELIMS = ("$", "\\(", "\\[", "\\boxed")


def check_math(record: Mapping[str, Any], text: str) -> CheckResult:
    import math_verify  # only where math answers are checked: it is slow to import
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" is said once per call otherwise
    gold = str(record["answer"])
    if not any(d in gold for d in _MATH_DELIMS):
        gold = f"${gold}$"
    g = math_verify.parse(gold, parsing_timeout=None)
    p = math_verify.parse(text, parsing_timeout=None)
    ok = bool(g) and bool(p) and bool(math_verify.verify(g, p, timeout_seconds=None))  # gold first
    return CheckResult(ok, str(p[0]) if p else None)


# A factory rather than a Checker, so that a checker with set-up cost (a model, a big import) pays it only when used.
CHECKERS: dict[str, Callable[[], Checker]] = {}


def register_checker(name: str, factory: Callable[[], Checker]) -> None:
    """Add `factory` (no arguments -> a Checker) under `name`; a name already registered is refused."""
    if name in CHECKERS:
        raise ValueError(f"checker {name!r} is already registered")
    CHECKERS[name] = factory


def get_checker(name: str | Checker) -> Checker:
    """The checker registered as `name` (a Checker is returned as it is)."""
    if isinstance(name, Checker):
        return name
    if name not in CHECKERS:
        raise KeyError(f"no checker for {name!r}; known: {sorted(CHECKERS)}")
    return CHECKERS[name]()


register_checker("synthetic", lambda: Checker("synthetic", check_synthetic))
register_checker("gsm8k", lambda: Checker("gsm8k", check_gsm8k))
register_checker("math", lambda: Checker("math", check_math))
