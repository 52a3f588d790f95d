"""The Grain pipeline: tokenized questions -> shuffled, repeated, sharded, laid-out, batched iterator."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ssft_jax.data import packing
from ssft_jax.data.layout import LayoutConfig, QuestionLayout
from ssft_jax.data.question import TokenizedQuestion


class TraceSample:
    """A question with more than M traces (``extra_traces='sample'``) -> M of them, afresh each epoch, in their
    record order. The choice is a pure function of (seed, epoch, question), so the iterator's position alone restores
    it: ``get_state``/``set_state`` resume the same subsets bit-exactly."""

    def __init__(self, num_questions: int, num_traces: int, seed: int):
        self.num_questions, self.num_traces, self.seed = num_questions, num_traces, seed

    def __call__(self, index: int, q: TokenizedQuestion) -> TokenizedQuestion:
        n = len(q.trace_ids)
        if n <= self.num_traces:
            return q
        epoch = index // self.num_questions  # `index` counts over the repeated epochs
        keep = np.sort(np.random.default_rng([self.seed, epoch, q.index]).choice(n, self.num_traces, replace=False))
        return dataclasses.replace(q, trace_ids=tuple(q.trace_ids[k] for k in keep),
                                   truncated=tuple(q.truncated[k] for k in keep))


def make_dataset(
    questions: Sequence[TokenizedQuestion],
    layout: LayoutConfig,
    tag_table: np.ndarray,
    tag_lengths: np.ndarray,
    *,
    seed: int = 0,
    epochs: int | None = None,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
):
    """The batched ``grain.MapDataset``: source -> shuffle(seed) -> repeat(epochs) -> [TraceSample] -> shard -> map
    -> batch.

    Each epoch is shuffled differently (grain reseeds per epoch); batches run across epoch boundaries, and with a
    finite ``epochs`` only the very last incomplete batch is dropped. Sharding is by element after repeat: process
    k gets global elements k, k+count, ... (every process uses the same seed, so the shards are disjoint).
    Questions with more than M traces (tokenized with ``extra_traces='sample'``) get a fresh M each epoch
    (``TraceSample``, seeded by `seed`).
    A packed layout (``layout.pack_rows > 0``) returns the per-question elements unbatched: ``make_iterator``
    batches and packs them (``packing.PackedIterator``).
    """
    import grain

    if not questions:
        raise ValueError("no questions")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None (forever), got {epochs}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(list(questions))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(epochs)
    if any(len(q.trace_ids) > layout.num_traces for q in questions):
        ds = ds.map_with_index(TraceSample(len(questions), layout.num_traces, seed))
    if process_count > 1:
        ds = ds[process_index::process_count]
    if layout.packed:  # batched by `packing.PackedIterator`, which packs the train rows and may defer a question
        return ds.map(packing.question_element(QuestionLayout(layout, tag_table, tag_lengths)))
    ds = ds.map(QuestionLayout(layout, tag_table, tag_lengths))
    return ds.batch(layout.batch_size, drop_remainder=True)


def make_iterator(
    questions: Sequence[TokenizedQuestion],
    layout: LayoutConfig,
    tag_table: np.ndarray,
    tag_lengths: np.ndarray,
    *,
    seed: int = 0,
    epochs: int | None = None,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    read_options=None,
):
    """A ``grain.DatasetIterator`` over batches (see the module docstring for the batch dict).

    ``get_state()`` is a small JSON-able dict; a fresh iterator from the same arguments after ``set_state(state)``
    yields exactly the batches the original would have. ``read_options`` defaults to
    ``grain.ReadOptions(num_threads=0)``: the data is in memory and the per-batch work is numpy layout that runs
    while the accelerator executes the previous (asynchronously dispatched) step. Pass threads to prefetch; for
    worker processes call ``.mp_prefetch`` on ``make_dataset(...).to_iter_dataset()`` yourself (grain needs parsed
    absl flags and an ``if __name__ == "__main__"`` guard for that). A packed layout gives a
    ``packing.PackedIterator`` (same ``get_state``/``set_state``; ``read_options`` unused: it reads in-line).
    Multi-host: pass ``process_index=jax.process_index(), process_count=jax.process_count()`` (the trainer does;
    this host-side package does not import jax), so each process reads its own share.
    """
    import grain

    ds = make_dataset(questions, layout, tag_table, tag_lengths, seed=seed, epochs=epochs, shuffle=shuffle,
                      process_index=process_index, process_count=process_count)
    if layout.packed:  # random access into the elements: its state is a position and the deferred indices
        return packing.PackedIterator(ds, packing.PackedTrainLayout(layout, process_index=process_index,
                                                                    process_count=process_count))
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(ds.to_iter_dataset(read_options))
