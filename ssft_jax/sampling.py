"""Jitted generation: one prefill over right-padded prompts, then a `lax.while_loop` decode over a KV cache.

Prompt lengths are rounded up to a bucket so a run compiles a bounded number of times, whatever its prompts.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssft_jax.model import ModelConfig, Params, forward, init_cache


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum): at most log2(max_len) prompt shapes ever compile."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float,
                  vocab_limit: int | None = None) -> jax.Array:
    """Next token per row from fp32 logits [B, V]: greedy at temperature 0, else top-k / top-p filtered sampling.

    Ids >= vocab_limit (padding rows of a padded vocabulary) are never produced.
    """
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p.
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "vocab_limit"))
def _generate(cfg: ModelConfig, params: Params, prompts, lengths, eos_ids, rng, *, max_new_tokens: int,
              temperature: float, top_k: int, top_p: float, vocab_limit: int | None):
    B, P = prompts.shape
    cache = init_cache(cfg, B, P + max_new_tokens)
    segment_ids = (jnp.arange(P)[None, :] < lengths[:, None]).astype(jnp.int32)
    logits, cache = forward(cfg, params, prompts, segment_ids, cache=cache)
    cache["index"] = lengths  # each row continues right after its last real prompt token
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    rng, sub = jax.random.split(rng)
    first = sample_logits(last, sub, temperature, top_k, top_p, vocab_limit)
    out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = is_eos(first)

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tok, cache, done, out, rng = state
        logits, cache = forward(cfg, params, tok[:, None], jnp.ones((B, 1), jnp.int32), cache=cache)
        rng, sub = jax.random.split(rng)
        nxt = sample_logits(logits[:, 0], sub, temperature, top_k, top_p, vocab_limit)
        nxt = jnp.where(done, 0, nxt)  # finished rows emit padding
        out = out.at[:, t].set(nxt)
        return t + 1, nxt, cache, done | is_eos(nxt), out, rng

    t, _, _, done, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, done, out, rng))
    return out, done


def generate(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Generate a continuation per prompt (token ids), each cut after its first stop token (kept in the output)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    P = bucket_length(max(len(p) for p in prompts))
    padded = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    out, _ = _generate(cfg, params, jnp.asarray(padded), jnp.asarray(lengths), jnp.asarray(list(eos_token_ids), jnp.int32),
                       jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=float(temperature),
                       top_k=int(top_k), top_p=float(top_p), vocab_limit=vocab_limit)
    results = []
    stops = set(eos_token_ids)
    for row in np.asarray(out).tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results
