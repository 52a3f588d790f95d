"""The Grain pipeline: tokenized questions -> shuffled, repeated, sharded, laid-out, batched iterator."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ssft_jax.data.layout import LayoutConfig, QuestionLayout
from ssft_jax.data.records import TokenizedQuestion


def make_dataset(
    questions: Sequence[TokenizedQuestion],
    layout: LayoutConfig,
    tag_table: np.ndarray,
    tag_lengths: np.ndarray,
    *,
    seed: int = 0,
    epochs: int | None = None,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """The batched ``grain.MapDataset``: source -> shuffle(seed) -> repeat(epochs) -> shard -> map -> batch.

    Each epoch is shuffled differently (grain reseeds per epoch); batches run across epoch boundaries, and with a
    finite ``epochs`` only the very last incomplete batch is dropped. Sharding is by element after repeat: process
    k gets global elements k, k+count, ... (every process uses the same seed, so the shards are disjoint).
    """
    import grain

    if not questions:
        raise ValueError("no questions")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 or None (forever), got {epochs}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    ds = grain.MapDataset.source(list(questions))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(epochs)
    if process_count > 1:
        ds = ds[process_index::process_count]
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
    process_index: int | None = None,
    process_count: int | None = None,
    read_options=None,
):
    """A ``grain.DatasetIterator`` over batches (see the module docstring for the batch dict).

    ``get_state()`` is a small JSON-able dict; a fresh iterator from the same arguments after ``set_state(state)``
    yields exactly the batches the original would have. ``read_options`` defaults to
    ``grain.ReadOptions(num_threads=0)``: the data is in memory and the per-batch work is numpy layout that runs
    while the accelerator executes the previous (asynchronously dispatched) step. Pass threads to prefetch; for
    worker processes call ``.mp_prefetch`` on ``make_dataset(...).to_iter_dataset()`` yourself (grain needs parsed
    absl flags and an ``if __name__ == "__main__"`` guard for that).
    """
    import grain

    ds = make_dataset(questions, layout, tag_table, tag_lengths, seed=seed, epochs=epochs, shuffle=shuffle,
                      process_index=process_index, process_count=process_count)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(ds.to_iter_dataset(read_options))
