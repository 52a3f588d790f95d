"""Datasets in the project's common record format, and the registry that names them.

Every builder returns plain dicts ``{"id": str, "question": str, "traces": [{"text": str, "source": str}],
"answer": str}`` (1..M traces per record):

* ``synthetic``: generated multi-operand additions, each with one trace per machine-recognisable strategy and a
  verifier that names the strategy of any generated text (ground truth for mode collapse vs preservation).
* ``synthetic_styles``: the same questions with four structurally different strategies (running sum, bracketed
  pairs, place value, rounding to tens) and a classifier that names a text's style from its structure: the demo's task.
* ``gsm8k``: GSM8K read in place from ``../shared/data/gsm8k`` (reference + socratic + correct model solutions
  per test question; single reference trace for train).
* ``jsonl``: the run's own JSONL/parquet files (``data.path``), read and validated by ``ssft_jax.data``.

``build_records(config)`` gives a run config's (train, held-out) records through the registry (``registry.py``:
``register_dataset``, ``get_dataset``, ``dataset_names``).
"""

from . import gsm8k, synthetic
from .gsm8k import (
                    answer_is_correct,
                    extract_gsm8k_answer,
                    load_gsm8k_multitrace,
                    load_gsm8k_single,
                    normalize_number,
                    summary,
                    to_decimal,
)
from .registry import (
                    DATASETS,
                    DatasetSpec,
                    StrategyClassifier,
                    build_records,
                    check_source,
                    dataset_names,
                    get_dataset,
                    load_classifier,
                    register_dataset,
)
from .synthetic import CHARSET, STRATEGIES, SyntheticDifficulty, VerifyResult, build_splits, render_trace, verify

__all__ = [
    "gsm8k", "synthetic",
    "DATASETS", "DatasetSpec", "StrategyClassifier", "build_records", "check_source", "dataset_names", "get_dataset",
    "load_classifier", "register_dataset",
    "answer_is_correct", "extract_gsm8k_answer", "load_gsm8k_multitrace", "load_gsm8k_single", "normalize_number",
    "summary", "to_decimal",
    "CHARSET", "STRATEGIES", "SyntheticDifficulty", "VerifyResult", "build_splits", "render_trace", "verify",
]
