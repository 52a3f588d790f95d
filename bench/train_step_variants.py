"""Helpers for bench/bench_train_step.py: alternative cost-pass layouts and row compaction (benchmark-only code).

The trainer's cost pass (`ssft_jax.losses.cost_matrix`) runs ONE packed row per question,
``[prompt (P) | block (0,0) | ... | block (N-1,M-1)]`` with blocks of ``W = Lt + Le`` slots, with dense attention over
all ``R = P + N*M*W`` slots (masked to prompt + own block). The two alternatives below compute the same C[B, N, M]
(up to float rounding) from the SAME batch arrays, by reshaping the packed row in-graph:

* ``repeated`` (here only): N*M rows of ``P + W`` (the prompt copied into every row): more tokens through the MLPs
  (``N*M*(P+W)`` vs ``P + N*M*W``) but attention ``N*M*(P+W)^2`` instead of ``R^2``.
* ``prefix_cache`` (in the library: ``ssft.cost_layout="prefix_cache"``, so the benchmark just sets the config): the
  prompt is run once into a KV cache, the cache is broadcast to the N*M blocks, and each block row (``W`` queries)
  attends to ``P + W`` keys: linear tokens ``P + N*M*W`` (as the packed row) AND attention ``N*M*W*(P+W)`` (the
  prompt-sharing ideal).
"""
from __future__ import annotations

import contextlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from ssft_jax import data as data_lib
from ssft_jax import losses
from ssft_jax.logprobs import token_logprobs
from ssft_jax.model import forward, output_embedding


def _blocks(x, P, K, W):
    B = x.shape[0]
    return x[:, P:].reshape(B * K, W)


def cost_matrix_repeated(cfg, params, cv, N, M, *, P, W, chunk_size=1024):
    """Same C as `losses.cost_matrix`, from N*M rows ``[prompt | tag | trace prefix]`` (prompt repeated)."""
    params = jax.lax.stop_gradient(params)
    K = N * M
    B = cv["tokens"].shape[0]
    rep = lambda x: jnp.repeat(x[:, :P], K, axis=0)  # [B*K, P]
    real_p = (cv["segment_ids"][:, :P] != 0).astype(jnp.int32)
    seg = jnp.concatenate([rep(real_p), (_blocks(cv["segment_ids"], P, K, W) != 0).astype(jnp.int32)], 1)
    tok = jnp.concatenate([rep(cv["tokens"]), _blocks(cv["tokens"], P, K, W)], 1)
    pos = jnp.concatenate([rep(cv["positions"]), _blocks(cv["positions"], P, K, W)], 1)
    tgt = _blocks(cv["targets"], P, K, W)
    mask = _blocks(cv["loss_mask"], P, K, W)
    hidden = forward(cfg, params, tok, seg, pos, return_hidden=True)[:, P:]
    logp = token_logprobs(hidden, output_embedding(cfg, params), tgt, chunk_size=chunk_size)
    nll = (-logp * mask.astype(jnp.float32)).reshape(B, K * W)
    nll = jnp.concatenate([jnp.zeros((B, P), jnp.float32), nll], 1)
    return jax.lax.stop_gradient(data_lib.cost_matrix_from_token_nll(nll, cv, N, M))


@contextlib.contextmanager
def repeated_prompt_cost(*, P: int, W: int):
    """Temporarily route `losses.cost_matrix` (looked up by train_step at trace time) to `cost_matrix_repeated`.
    Only for tracing a benchmark variant in this process; the library files are untouched. The stand-in takes
    exactly `losses.cost_matrix`'s parameters (checked here, so a change of the library's signature fails loudly
    instead of the variant raising TypeError inside the trace); the layout keywords are ignored, it IS the layout."""
    orig = losses.cost_matrix

    def repeated(cfg, params, cost_view, num_tags, num_traces, chunk_size=1024, *, layout="packed", prompt_len=None,
                 block_len=None):
        return cost_matrix_repeated(cfg, params, cost_view, num_tags, num_traces, P=P, W=W, chunk_size=chunk_size)

    want, got = inspect.signature(orig).parameters, inspect.signature(repeated).parameters
    if list(want) != list(got) or any(want[k].kind != got[k].kind for k in want):
        raise TypeError(f"losses.cost_matrix{inspect.signature(orig)} changed; update this stand-in "
                        f"{inspect.signature(repeated)}")
    losses.cost_matrix = repeated
    try:
        yield
    finally:
        losses.cost_matrix = orig


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
