"""The dataset registry: a run config's ``data.name`` -> how its records are built, which answer checker judges
its generations and, where the task has machine-recognisable strategies, the classifier that names them.

Training, evaluation (its CLI ``--dataset`` choices too) and the demo all read this one table. A new dataset is one
module with a ``splits_from_config(config) -> (train, held_out)`` function plus one ``register_dataset`` line (at the
bottom of this file for the built-in ones, or in the code that adds it); its checker, when it needs its own, is one
``ssft_jax.checkers.register_checker`` line.

This module sits below ``ssft_jax.config`` and ``ssft_jax.checkers`` (it names a checker, it does not import one),
so both may import it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from ssft_jax.data import formats
from ssft_jax.datasets import gsm8k, synthetic

Records = Sequence[Any]  # record dicts, or paths / lists of records as `ssft_jax.data.read_records` takes them


@dataclasses.dataclass(frozen=True)
class StrategyClassifier:
    """`classify(record, text)` -> the name (one of `names`) of the strategy a generated text follows, or None when
    it follows none recognisably. Evaluation turns it into the tag -> strategy matrix and its mutual information."""

    names: tuple[str, ...]
    classify: Callable[[Mapping[str, Any], str], str | None]

    def __call__(self, record: Mapping[str, Any], text: str) -> str | None:
        return self.classify(record, text)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset.

    build: run config -> (train records, held-out records), deterministic in the config (same records, same order).
    checker: the `ssft_jax.checkers` name that judges answers to its questions.
    classifier: names the strategy of a generation, for tasks that have strategies (None: no strategy metrics).
    has_heldout: False for a dataset that is only the files it is pointed at (`jsonl`): it holds out only what
        `data.heldout` asks for (nothing by default), so evaluation without the run's config takes every record of
        the files it is given.
    reads_path: True for a dataset whose records are the files `data.path` names (`jsonl`): an empty path is a
        config error, refused before any compute.
    takes_path: False for a dataset that reads no files (the synthetic tasks): a `data.path` given with it is a
        config error naming both keys (the user meant to train on that file), never silently ignored.
    """

    name: str
    build: Callable[[Any], tuple[Records, Records]]
    checker: str
    classifier: StrategyClassifier | None = None
    has_heldout: bool = True
    reads_path: bool = False
    takes_path: bool = True


DATASETS: dict[str, DatasetSpec] = {}


def load_classifier(spec: str) -> StrategyClassifier:
    """`module:attribute` -> a StrategyClassifier: the attribute is one, or a function `(record, text) -> name or
    None` carrying its strategy names as `fn.names` (a tuple), e.g. for `--classifier mytask:classify`."""
    import importlib

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--classifier {spec!r}: expected module:function (e.g. mytask.strategies:classify)")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--classifier {spec!r}: {e}") from None
    if isinstance(obj, StrategyClassifier):
        return obj
    names = getattr(obj, "names", None)
    if not callable(obj) or not names:
        raise ValueError(f"--classifier {spec!r}: expected a StrategyClassifier, or a function (record, text) -> "
                         "strategy name or None with its names in a `names` attribute (fn.names = ('a', 'b', ...))")
    return StrategyClassifier(tuple(str(n) for n in names), obj)


def register_dataset(spec: DatasetSpec) -> None:
    """Add `spec` under `spec.name` (a name already registered is refused: two specs for one name would make the
    records a run trains on depend on import order)."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise KeyError(f"no dataset {name!r}; registered: {dataset_names()}")
    return DATASETS[name]


def dataset_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(DATASETS)


def build_records(config) -> tuple[Records, Records]:
    """(train records, held-out records) of the run config's dataset (`config.data.name`)."""
    return get_dataset(config.data.name).build(config)


def check_source(config) -> None:
    """A dataset that is the files `data.path` names needs a path: a FormatError (one CLI message) naming both keys,
    raised by a stage before it loads any model. Not part of `config.validate`: the memory planner and the launch
    dry runs read configs (configs/qwen2p5_7b.py) whose data.path the user fills in later."""
    spec, path = get_dataset(config.data.name), str(config.data.path or "").strip(", ")
    if path and not spec.takes_path:
        # An error rather than inferring data.name=jsonl: the default name is a synthetic task, and a config that
        # names one on purpose while a path is set is ambiguous; one line tells the user which key to add.
        raise formats.FormatError(
            f"data.path={config.data.path!r} is set but data.name={config.data.name!r} reads no files (it generates "
            "its questions): to train on the file add --config.data.name=jsonl; for the synthetic task drop data.path")
    if spec.reads_path and not path:
        raise formats.FormatError(
            "data.path must name the JSONL/parquet file(s), `datasets` folder(s) or hub dataset id(s) for "
            f"data.name={config.data.name!r}, and it is empty: give --config.data.path=FILE.jsonl (several: "
            "comma-separated)")


def jsonl_sources(config) -> tuple[list, list]:
    """The comma-separated sources of `data.path` (files, `datasets` folders, hub ids; read and validated by
    `ssft_jax.data`). With `data.heldout` "auto" or 0 they all train, unread here; otherwise they are read (in their
    `data.format`) and the questions whose ids hash lowest are held out (`ssft_jax.data.split_heldout`): training
    gets `RawRecord`s, evaluation record dicts."""
    check_source(config)
    sources = [p for p in config.data.path.split(",") if p]
    if config.data.heldout in ("auto", 0):
        return sources, []
    train, held = formats.split_heldout(formats.read_records(sources, format=config.data.format), config.data.heldout)
    # Training validates the RawRecords (errors name file:line); evaluation, in training too, takes record dicts,
    # named by the id training gives them.
    return train, [r.record if r.record.get("id") is not None else {**r.record, "id": formats.record_id(r.record)}
                   for r in held]


register_dataset(DatasetSpec("synthetic", synthetic.splits_from_config, checker="synthetic",
                             classifier=StrategyClassifier(synthetic.STRATEGIES, synthetic.classify_strategy),
                             takes_path=False))
register_dataset(DatasetSpec("gsm8k", gsm8k.splits_from_config, checker="gsm8k"))
register_dataset(DatasetSpec("jsonl", jsonl_sources, checker="math", has_heldout=False, reads_path=True))
# The demo's task: the same questions, strategies that differ in structure (synthetic.STYLE_STRATEGIES says why).
register_dataset(DatasetSpec("synthetic_styles", synthetic.style_splits_from_config, checker="synthetic",
                             classifier=StrategyClassifier(synthetic.STYLE_STRATEGIES, synthetic.classify_style),
                             takes_path=False))
# GSM8K's four model solutions as four teachers, trace j = teacher j (`ssft_jax.teacher_agreement`).
register_dataset(DatasetSpec("gsm8k_teachers", gsm8k.teacher_splits_from_config, checker="gsm8k"))
