"""What the train step does to a batch's rows, in-graph (pure jnp, jit-able): the matched tags written into the
train rows (`fill_tags`, `fill_packed_tags`, `fill_train_rows`), their next-token targets (`next_real_targets`) and
the cost view's per-token NLL read back into C[B, N, M] (`cost_matrix_from_token_nll`).

The host side (numpy records, the static layouts these rows come in, packing arithmetic, the Grain pipeline) is
`ssft_jax.data`, which imports no jax; the row layouts themselves are documented there (`ssft_jax/data/__init__.py`).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp


def cost_matrix_from_token_nll(nll, cost_view: Mapping[str, Any], num_tags: int, num_traces: int):
    """``C[B, N, M]``: the mean of ``nll[B, R]`` (per-token NLL of ``targets`` in the cost view) over each pair's
    loss positions: C[b, i, j] = mean NLL of trace j's first L' tokens after (prompt, tag i).

    NaN-free: ``nll`` is read only at loss positions (NaN/inf elsewhere are ignored); cells with no loss position
    (invalid traces, invalid tags) are ``+inf`` -- pass ``tag_valid``/``trace_valid`` to the matcher, which ignores
    them. Sums use ``segment_sum`` (exact float32 adds, no matmul precision loss).
    """

    nll = jnp.asarray(nll, jnp.float32)
    B, R = nll.shape
    K = num_tags * num_traces
    mask = jnp.asarray(cost_view["loss_mask"]) > 0
    pair = jnp.asarray(cost_view["pair_ids"])
    seg = jnp.where(mask & (pair >= 0), pair + K * jnp.arange(B, dtype=pair.dtype)[:, None], B * K)
    x = jnp.where(mask, nll, 0.0)
    sums = jax.ops.segment_sum(x.reshape(-1), seg.reshape(-1), num_segments=B * K + 1)[:B * K]
    counts = jax.ops.segment_sum(mask.reshape(-1).astype(jnp.float32), seg.reshape(-1), num_segments=B * K + 1)[:B * K]
    c = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), jnp.inf).reshape(B, num_tags, num_traces)
    valid = jnp.ones((B, num_tags, num_traces), bool)
    if "tag_valid" in cost_view:
        valid = valid & jnp.asarray(cost_view["tag_valid"])[:, :, None]
    if "trace_valid" in cost_view:
        valid = valid & jnp.asarray(cost_view["trace_valid"])[:, None, :]
    return jnp.where(valid, c, jnp.inf)


def next_real_targets(tokens, real, seq=None):
    """targets[..., t]: the next real token after slot t of the row, found by a reverse running minimum of the real
    slots' indices; 0 where slot t is not real or nothing real follows, and, given per-slot sequence ids ``seq``
    (packed rows), where the next real token belongs to another sequence. The train views' one targets rule."""

    S = tokens.shape[-1]
    idx = jnp.where(real, jnp.arange(S, dtype=jnp.int32), S)
    nxt = jax.lax.cummin(idx, axis=idx.ndim - 1, reverse=True)
    nxt = jnp.concatenate([nxt[..., 1:], jnp.full(nxt.shape[:-1] + (1,), S, nxt.dtype)], axis=-1)
    nxt_c = jnp.clip(nxt, 0, S - 1)
    ok = real & (nxt < S)
    if seq is not None:
        ok = ok & (jnp.take_along_axis(seq, nxt_c, axis=-1) == seq)
    return jnp.where(ok, jnp.take_along_axis(tokens, nxt_c, axis=-1), 0)


def fill_tags(train_view: Mapping[str, Any], tag_of_trace, tag_table, tag_lengths) -> dict[str, Any]:
    """Write each row's assigned tag into its (left-padded) tag slot; ready-for-the-model row arrays.

    train_view: the batch's ``"train"`` dict (arrays ``[..., S]`` with leading dims ``[B, M]``, or already
      flattened ``[B*M, S]`` with ``[B*M]`` side fields). tag_of_trace: ``[B, M]`` int32 tag index per trace, -1 for
      none (the row becomes all padding with zero loss; invalid traces are padding whatever the tag).
    tag_table, tag_lengths: from ``tag_table()`` (``[N, Lt]`` left-padded, ``[N]``).
    Returns tokens, segment_ids, positions, targets, loss_mask (int32, same shape as ``train_view["tokens"]``);
    reshape to ``[B*M, S]`` for ``model.forward``. The packed train view has its own,
    ``packing.fill_packed_tags`` (``packing.fill_train_rows`` picks the right one).
    """

    tokens = jnp.asarray(train_view["tokens"], jnp.int32)
    S = tokens.shape[-1]
    table = jnp.asarray(tag_table, jnp.int32)
    lengths = jnp.asarray(tag_lengths, jnp.int32)
    N, Lt = table.shape
    tag = jnp.asarray(tag_of_trace, jnp.int32).reshape(tokens.shape[:-1])
    on = (tag >= 0) & jnp.asarray(train_view["trace_valid"], bool).reshape(tag.shape)
    tag = jnp.clip(tag, 0, N - 1)
    start = jnp.asarray(train_view["tag_slot_start"], jnp.int32).reshape(tag.shape)[..., None]
    ar = jnp.arange(S, dtype=jnp.int32)
    off = ar - start  # offset inside the tag slot
    in_slot = (off >= 0) & (off < Lt)
    row_tag = table[tag]  # [..., Lt]
    slot_tok = jnp.take_along_axis(row_tag, jnp.clip(off, 0, Lt - 1), axis=-1)
    slot_real = in_slot & (off >= Lt - lengths[tag][..., None])
    real = ((jnp.asarray(train_view["segment_ids"]) != 0) & ~in_slot) | slot_real
    real = real & on[..., None]
    tokens = jnp.where(slot_real, slot_tok, tokens)
    tokens = jnp.where(real, tokens, 0)
    realtoi = real.astype(jnp.int32)
    positions = jnp.where(real, jnp.cumsum(realtoi, axis=-1) - 1, 0)
    targets = next_real_targets(tokens, real)
    loss_mask = jnp.asarray(train_view["loss_mask"], jnp.int32) * on[..., None].astype(jnp.int32)
    return {"tokens": tokens, "segment_ids": realtoi, "positions": positions.astype(jnp.int32),
            "targets": targets, "loss_mask": loss_mask}




def fill_packed_tags(train_view: Mapping[str, Any], tag_of_trace, tag_table, tag_lengths) -> dict[str, Any]:
    """``fill_tags`` for the packed view of one micro-batch: rows ``[R, S']``, side fields ``[B, M]``.

    Writes each sequence's assigned tag into its slot (left-padded to Lt), drops sequences whose trace is invalid
    or has no tag (-1: all padding, zero loss) and returns tokens, segment_ids (one id per sequence), positions
    (restarting at 0 per sequence, contiguous across the tag's left padding), targets (the next real token of the
    same sequence) and loss_mask, ``[R, S']`` int32: what ``losses.set_loss_sums`` reads.
    """

    tokens = jnp.asarray(train_view["tokens"], jnp.int32)
    R, S = tokens.shape
    table = jnp.asarray(tag_table, jnp.int32)
    lengths = jnp.asarray(tag_lengths, jnp.int32)
    N, Lt = table.shape
    tag = jnp.asarray(tag_of_trace, jnp.int32).reshape(-1)  # [B*M]
    valid = jnp.asarray(train_view["trace_valid"], bool).reshape(-1)
    on = (tag >= 0) & valid
    tag = jnp.clip(tag, 0, N - 1)
    seq = jnp.asarray(train_view["seq_index"], jnp.int32)
    slot_on = (seq >= 0) & on[jnp.maximum(seq, 0)]
    real = (jnp.asarray(train_view["segment_ids"]) != 0) & slot_on
    # The tag slots: Lt (row, column) pairs per sequence; an invalid trace's writes go out of range and are dropped.
    k = jnp.arange(Lt, dtype=jnp.int32)
    rows = jnp.where(valid, jnp.asarray(train_view["tag_row"], jnp.int32).reshape(-1), R)[:, None] + 0 * k
    cols = jnp.asarray(train_view["tag_slot_start"], jnp.int32).reshape(-1)[:, None] + k
    slot_real = on[:, None] & (k >= Lt - lengths[tag][:, None])
    tokens = tokens.at[rows, cols].set(jnp.where(slot_real, table[tag], 0), mode="drop")
    real = real.at[rows, cols].set(slot_real, mode="drop")
    tokens = jnp.where(real, tokens, 0)
    realtoi = real.astype(jnp.int32)
    # Positions: real tokens of the same sequence before this slot. A sequence's span starts where seq_index
    # changes; subtract the real tokens before that start from the row's running count.
    ar = jnp.arange(S, dtype=jnp.int32)[None, :]
    count = jnp.cumsum(realtoi, axis=-1)
    start = seq != jnp.concatenate([jnp.full((R, 1), -2, jnp.int32), seq[:, :-1]], axis=-1)
    start_idx = jax.lax.cummax(jnp.where(start, ar, 0), axis=1)
    before = jnp.take_along_axis(count - realtoi, start_idx, axis=-1)
    positions = jnp.where(real, count - 1 - before, 0)
    targets = next_real_targets(tokens, real, seq)
    loss_mask = jnp.asarray(train_view["loss_mask"], jnp.int32) * slot_on.astype(jnp.int32)
    return {"tokens": tokens, "segment_ids": jnp.where(real, seq + 1, 0).astype(jnp.int32),
            "positions": positions.astype(jnp.int32), "targets": targets, "loss_mask": loss_mask}


def fill_train_rows(train_view: Mapping[str, Any], tag_of_trace, tag_table, tag_lengths) -> dict[str, Any]:
    """The train step's one call: ``fill_tags`` or, for a packed view (``seq_index`` present), ``fill_packed_tags``;
    rows flattened to ``[rows, S]`` for ``model.forward`` either way."""
    fill = fill_packed_tags if "seq_index" in train_view else fill_tags
    rows = fill(train_view, tag_of_trace, tag_table, tag_lengths)
    return {k: v.reshape(-1, v.shape[-1]) for k, v in rows.items()}
