"""Helpers for bench/bench_train_step.py: alternative cost-pass layouts and row compaction (benchmark-only code).

The trainer's cost pass (`ssft_jax.losses.cost_matrix`) runs ONE packed row per question,
``[prompt (P) | block (0,0) | ... | block (N-1,M-1)]`` with blocks of ``W = Lt + Le`` slots, with dense attention over
all ``R = P + N*M*W`` slots (masked to prompt + own block). The two alternatives below compute the same C[B, N, M]
(up to float rounding) from the SAME batch arrays, by reshaping the packed row in-graph:

* ``repeated`` (here only, registered as a `cost_layouts` layout on import, so the trainer's step runs it by
  name): N*M rows of ``P + W`` (the prompt copied into every row): more tokens through the MLPs
  (``N*M*(P+W)`` vs ``P + N*M*W``) but attention ``N*M*(P+W)^2`` instead of ``R^2``.
* ``prefix_cache`` (in the library: ``ssft.cost_layout="prefix_cache"``, so the benchmark just sets the config): the
  prompt is run once into a KV cache, the cache is broadcast to the N*M blocks, and each block row (``W`` queries)
  attends to ``P + W`` keys: linear tokens ``P + N*M*W`` (as the packed row) AND attention ``N*M*W*(P+W)`` (the
  prompt-sharing ideal).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ssft_jax import cost_layouts, losses
from ssft_jax.logprobs import token_logprobs
from ssft_jax.model import forward, output_embedding


def _blocks(x, P, K, W):
    B = x.shape[0]
    return x[:, P:].reshape(B * K, W)


def repeated_token_nll(cfg, params, cv, *, num_pairs, prompt_len, block_len, chunk_size=1024):
    """The cost row's per-slot NLL [B, R] (0 on the prompt), from N*M rows ``[prompt | tag | trace prefix]`` (the
    prompt repeated into every row): a `cost_layouts` NLL function, registered below as "repeated"."""
    P, W, K = prompt_len, block_len, num_pairs
    B = cv["tokens"].shape[0]
    rep = lambda x: jnp.repeat(x[:, :P], K, axis=0)  # noqa: E731  [B*K, P]
    real_p = (cv["segment_ids"][:, :P] != 0).astype(jnp.int32)
    seg = jnp.concatenate([rep(real_p), (_blocks(cv["segment_ids"], P, K, W) != 0).astype(jnp.int32)], 1)
    tok = jnp.concatenate([rep(cv["tokens"]), _blocks(cv["tokens"], P, K, W)], 1)
    pos = jnp.concatenate([rep(cv["positions"]), _blocks(cv["positions"], P, K, W)], 1)
    tgt = _blocks(cv["targets"], P, K, W)
    mask = _blocks(cv["loss_mask"], P, K, W)
    hidden = forward(cfg, params, tok, seg, pos, return_hidden=True)[:, P:]
    logp = token_logprobs(hidden, output_embedding(cfg, params), tgt, chunk_size=chunk_size)
    nll = (-logp * mask.astype(jnp.float32)).reshape(B, K * W)
    return jnp.concatenate([jnp.zeros((B, P), jnp.float32), nll], 1)


def repeated_flops(cfg, layout, batch_size, forward_flops):
    """N*M rows of P + W per question; only the W block positions go through the head."""
    P, W = layout.max_prompt_len, layout.pair_block_len
    f = forward_flops(cfg, batch_size * layout.num_pairs, P + W)
    return f["layers"] + f["head"] * W / (P + W)


def repeated_memory(t):
    return cost_layouts.dense_rows_memory(t, t.b * t.N * t.M, t.P + t.W)


cost_layouts.register("repeated", cost_layouts.CostLayout(repeated_token_nll, repeated_flops, repeated_memory))


def cost_matrix_repeated(cfg, params, cv, N, M, *, P, W, chunk_size=1024):
    """Same C as `losses.cost_matrix`, through the "repeated" layout."""
    return losses.cost_matrix(cfg, params, cv, N, M, chunk_size, layout="repeated", prompt_len=P, block_len=W)


def compact_rows(rows: dict) -> dict[str, np.ndarray]:
    """Filled train rows (with padding gaps between prompt, tag and trace) -> contiguous right-padded rows:
    tokens, attention (1 real / 0 pad), loss (1 where the NEXT token is a loss target), positions, targets."""
    tok, seg, lm = (np.asarray(rows[k]) for k in ("tokens", "segment_ids", "loss_mask"))
    R, S = tok.shape
    out = {k: np.zeros((R, S), np.int32) for k in ("tokens", "attention", "loss", "targets")}
    for r in range(R):
        idx = np.nonzero(seg[r])[0]
        n = len(idx)
        out["tokens"][r, :n] = tok[r, idx]
        out["attention"][r, :n] = 1
        out["loss"][r, :n] = lm[r, idx]
        out["targets"][r, :n - 1] = tok[r, idx[1:]]
    out["positions"] = np.where(out["attention"] > 0, np.cumsum(out["attention"], 1) - 1, 0).astype(np.int32)
    assert np.all(out["loss"][:, -1] == 0)
    return out
