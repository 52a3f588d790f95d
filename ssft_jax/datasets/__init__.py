"""Datasets in the project's common record format.

Every builder returns plain dicts ``{"id": str, "question": str, "traces": [{"text": str, "source": str}],
"answer": str}`` (1..M traces per record):

* ``synthetic``: generated multi-operand additions, each with one trace per machine-recognisable strategy and a
  verifier that names the strategy of any generated text (ground truth for mode collapse vs preservation).
* ``gsm8k``: GSM8K read in place from ``../shared/data/gsm8k`` (reference + socratic + correct model solutions
  per test question; single reference trace for train).
"""

from . import gsm8k, synthetic
from .gsm8k import (answer_is_correct, extract_gsm8k_answer, load_gsm8k_multitrace, load_gsm8k_single,
                    summary)
from .synthetic import (CHARSET, STRATEGIES, SyntheticDifficulty, VerifyResult, build_records, build_splits,
                        render_trace, verify)

__all__ = [
    "gsm8k", "synthetic",
    "answer_is_correct", "extract_gsm8k_answer", "load_gsm8k_multitrace", "load_gsm8k_single", "summary",
    "CHARSET", "STRATEGIES", "SyntheticDifficulty", "VerifyResult", "build_records", "build_splits",
    "render_trace", "verify",
]
