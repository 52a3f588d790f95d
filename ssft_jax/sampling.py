"""Jitted generation: prefill over right-padded prompts, then a `lax.while_loop` decode over a KV cache.

Two entry points over one jitted core:

* `generate(cfg, params, prompts, ...)`: one continuation per prompt.
* `generate_rows(cfg, params, prompts, row_suffixes, ...)`: R continuations per prompt, each with its own suffix
  (GFPO's rollouts: the tags drawn for each question).
* `generate_forked(cfg, params, prompts, suffixes, num_samples=S, ...)`: for B prompts (questions), T suffixes
  (forking tags) and S samples, B*T*S continuations. Each prompt is prefilled ONCE, into a cache of batch B; its
  cache rows are then repeated to the B*T*S rows (the tags only differ after the prompt), each row's suffix is
  prefilled at its own offset (per-row cache `index`; suffixes of different lengths are right-padded with
  segment-0 tokens, which nothing attends to, and the row's index is then set to prompt + its own suffix length, so
  decoding overwrites the padding), and all rows decode together. Rows are ordered question-major, then tag, then
  sample: row = (b * T + t) * S + s.

Static shapes: prompt lengths are rounded up to a power-of-two bucket and suffix lengths to a multiple of 4, so a
run compiles once per (batch size, prompt bucket, suffix bucket, sampling settings), whatever its prompts.
Stop tokens end a row (the stop token is kept in the output); finished rows emit 0 and the loop ends as soon as
every row has stopped. Ids >= `vocab_limit` (the padded tail of an embedding larger than the tokenizer) are never
sampled.

Loading a model to sample from (a training run or an HF folder): `assembly.load_for_generation`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssft_jax import mesh as mesh_lib
from ssft_jax.model import ModelConfig, Params, forward, init_cache, logits_from_hidden

logger = logging.getLogger(__name__)


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum): at most log2(max_len) prompt shapes ever compile."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _suffix_bucket(n: int) -> int:
    return 0 if n == 0 else -(-n // 4) * 4


def _sortable_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 values (-inf < ... < -0 <= 0 < ... < inf)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def _smallest_key_where(keys: jax.Array, pred) -> jax.Array:
    """Per row, the smallest uint32 key u with pred(u) true, for pred monotone in u (false ... false true ... true).

    Radix select: 32 passes over [R, V], each a masked reduction; replaces sorting the vocabulary, which XLA's CPU
    sort does far more slowly (a [12, 49152] sort costs ~0.2 s on two cores, this ~10 ms).
    """
    R = keys.shape[0]

    def body(i, ans):
        cand = ans | jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        return jnp.where(pred(cand), ans, cand)  # ans tracks the largest key whose pred is still false

    zero = jnp.zeros((R,), jnp.uint32)
    largest_false = jax.lax.fori_loop(0, 32, body, zero)
    return jnp.where(pred(zero), zero, largest_false + 1)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """[R, V] bool: logits >= the row's k-th largest value (ties at the boundary are all kept, as with a sort)."""
    keys = _sortable_key(logits)
    thr = _smallest_key_where(keys, lambda c: jnp.sum(keys > c[:, None], axis=-1) < k)
    return keys >= thr[:, None]


def top_p_mask(probs: jax.Array, top_p: float) -> jax.Array:
    """[R, V] bool: the nucleus. A token stays when the mass of the tokens more probable than it is < top_p, i.e.
    the smallest set (in descending order, ties kept together) whose mass reaches top_p."""
    keys = _sortable_key(probs)
    thr = _smallest_key_where(keys, lambda c: jnp.sum(jnp.where(keys > c[:, None], probs, 0.0), axis=-1) < top_p)
    return keys >= thr[:, None]


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float,
                  vocab_limit: int | None = None) -> jax.Array:
    """Next token per row from fp32 logits [B, V]: greedy at temperature 0, else top-k / top-p filtered sampling.

    Ids >= vocab_limit (padding rows of a padded vocabulary) are never produced. Sampling draws one uniform per row
    and inverts the cumulative distribution (cheaper on CPU than Gumbel noise over the whole vocabulary).
    """
    logits = logits.astype(jnp.float32)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = jnp.where(top_k_mask(logits, top_k), logits, -jnp.inf)
    if top_p < 1.0:
        logits = jnp.where(top_p_mask(jax.nn.softmax(logits, axis=-1), top_p), logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    # u in (0, total]: the first index whose cdf reaches u; zero-probability ids never qualify (their cdf equals the
    # previous one, which is already < u).
    u = (1.0 - jax.random.uniform(rng, (logits.shape[0], 1))) * cdf[:, -1:]
    return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


def _repeat_cache(cache: dict, r: int) -> dict:
    """Each of the B cache rows repeated r times along the batch axis (row b -> rows b*r .. b*r+r-1)."""
    if r == 1:
        return cache
    return {"k": jnp.repeat(cache["k"], r, axis=1), "v": jnp.repeat(cache["v"], r, axis=1),
            "segment_ids": jnp.repeat(cache["segment_ids"], r, axis=0), "index": jnp.repeat(cache["index"], r, axis=0)}


@functools.partial(jax.jit, static_argnames=("cfg", "repeats", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "vocab_limit", "cache_dtype"))
def _generate_core(cfg: ModelConfig, params: Params, prompts, lengths, suffixes, suffix_lengths, eos_ids, key_data,
                   *, repeats: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   vocab_limit: int | None, cache_dtype: str | None = None):
    """prompts [B, P] (right-padded, `lengths` real tokens); suffixes [B*repeats, Ls] (right-padded,
    `suffix_lengths`); key_data: the raw key (`jax.random.key_data`, an array that can be placed on a mesh like any
    other). Returns (tokens [B*repeats, max_new_tokens], done [B*repeats], num_tokens [B*repeats])."""
    rng = jax.random.wrap_key_data(key_data)
    B, P = prompts.shape
    R = B * repeats
    Ls = suffixes.shape[1]
    cache = init_cache(cfg, B, P + Ls + max_new_tokens, cache_dtype)
    segment_ids = (jnp.arange(P)[None, :] < lengths[:, None]).astype(jnp.int32)
    # Prefill returns hidden states; only each row's last real position goes through the [D, V] output head.
    hidden, cache = forward(cfg, params, prompts, segment_ids, cache=cache, return_hidden=True)
    cache["index"] = lengths  # each row continues right after its last real prompt token
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    cache = _repeat_cache(cache, repeats)
    last = jnp.repeat(last, repeats, axis=0)
    if Ls > 0:
        seg = (jnp.arange(Ls)[None, :] < suffix_lengths[:, None]).astype(jnp.int32)
        tag_hidden, cache = forward(cfg, params, suffixes, seg, cache=cache, return_hidden=True)
        tag_last = jnp.take_along_axis(tag_hidden, jnp.maximum(suffix_lengths - 1, 0)[:, None, None], axis=1)
        last = jnp.where((suffix_lengths > 0)[:, None, None], tag_last, last)
        cache["index"] = jnp.repeat(lengths, repeats) + suffix_lengths
    last = logits_from_hidden(cfg, params, last)[:, 0]  # [R, V] fp32

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    rng, sub = jax.random.split(rng)
    first = sample_logits(last, sub, temperature, top_k, top_p, vocab_limit)
    out = jnp.zeros((R, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = is_eos(first)
    num = jnp.ones((R,), jnp.int32)

    def cond(state):
        t, _, _, done, _, _, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tok, cache, done, out, num, rng = state
        logits, cache = forward(cfg, params, tok[:, None], jnp.ones((R, 1), jnp.int32), cache=cache)
        rng, sub = jax.random.split(rng)
        nxt = sample_logits(logits[:, 0], sub, temperature, top_k, top_p, vocab_limit)
        nxt = jnp.where(done, 0, nxt)  # finished rows emit padding
        out = out.at[:, t].set(nxt)
        num = num + (~done).astype(jnp.int32)
        return t + 1, nxt, cache, done | is_eos(nxt), out, num, rng

    _, _, _, done, out, num, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, done, out, num, rng))
    return out, done, num


@dataclasses.dataclass(frozen=True)
class Generation:
    """One continuation: its token ids (cut after the first stop token, which is kept) and whether it stopped."""

    tokens: list[int]
    finished: bool


def _cut(row: list[int], stops: set[int]) -> Generation:
    cut = next((i + 1 for i, t in enumerate(row) if t in stops), None)
    return Generation(row[:cut], True) if cut is not None else Generation(row, False)


def _check_prompts(prompts) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")


def _pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def generate_forked(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    suffixes: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    vocab_limit: int | None = None,
    share_prefix: bool = True,
    cache_dtype: str | None = None,
) -> list[list[list[Generation]]]:
    """out[b][t][s]: sample s of prompt b continued by suffix t (e.g. forking tag t), B*T*S rows in one batch.

    share_prefix=True prefills each prompt once and repeats its cache rows (see the module docstring);
    share_prefix=False prefills prompt+suffix from scratch for every row (the reference; same tokens at greedy).
    Sampling randomness differs between the two modes for temperature > 0 (rows draw from one key per step either
    way), but both are deterministic in `seed`.
    """
    if not suffixes:
        raise ValueError("generate_forked: need at least one suffix (use [[]] for none)")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    T, S = len(suffixes), num_samples
    per_question = [[suffixes[t] for t in range(T) for _ in range(S)]] * len(prompts)
    flat = generate_rows(cfg, params, prompts, per_question, max_new_tokens=max_new_tokens,
                         eos_token_ids=eos_token_ids, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         vocab_limit=vocab_limit, share_prefix=share_prefix, cache_dtype=cache_dtype)
    return [[[flat[b][t * S + s] for s in range(S)] for t in range(T)] for b in range(len(prompts))]


def generate_rows(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    row_suffixes: Sequence[Sequence[Sequence[int]]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    vocab_limit: int | None = None,
    share_prefix: bool = True,
    cache_dtype: str | None = None,
    mesh=None,
) -> list[list[Generation]]:
    """out[b][r]: prompt b continued by its own suffix row_suffixes[b][r]; every prompt has the same number R of rows
    (e.g. the G tags drawn for question b). Same core, and the same prompt-cache sharing, as `generate_forked`.

    mesh: the params' mesh when it spans several processes (GFPO on a pod): every process passes the same prompts,
    the rows are split over the mesh's data axes (each device decodes its own), and every process gets all rows
    back. The random draws do not depend on the split (JAX's partitionable threefry), so neither do the samples."""
    _check_prompts(prompts)
    if len(row_suffixes) != len(prompts) or not row_suffixes[0]:
        raise ValueError(f"generate_rows: need one non-empty list of suffixes per prompt ({len(prompts)} prompts, "
                         f"{len(row_suffixes)} lists)")
    R = len(row_suffixes[0])
    if any(len(r) != R for r in row_suffixes):
        raise ValueError(
            f"generate_rows: every prompt needs the same number of rows, got {[len(r) for r in row_suffixes]}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    B = len(prompts)
    def place(x):
        return mesh_lib.rows_on_mesh(x, mesh)
    eos = mesh_lib.replicated_on_mesh(np.asarray(list(eos_token_ids), np.int32), mesh)
    key = mesh_lib.replicated_on_mesh(np.asarray(jax.random.key_data(jax.random.key(seed))), mesh)
    kw = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
              top_p=float(top_p), vocab_limit=vocab_limit, cache_dtype=cache_dtype)
    flat_suffixes = [list(s) for rows in row_suffixes for s in rows]
    if share_prefix:
        P = bucket_length(max(len(p) for p in prompts))
        Ls = _suffix_bucket(max(len(s) for s in flat_suffixes))
        out, done, _ = _generate_core(
            cfg, params, place(_pad(prompts, P)), place(np.asarray([len(p) for p in prompts], np.int32)),
            place(_pad(flat_suffixes, Ls)), place(np.asarray([len(s) for s in flat_suffixes], np.int32)), eos, key,
            repeats=R, **kw)
    else:
        rows = [list(prompts[b]) + flat_suffixes[b * R + r] for b in range(B) for r in range(R)]
        P = bucket_length(max(len(r) for r in rows))
        out, done, _ = _generate_core(
            cfg, params, place(_pad(rows, P)), place(np.asarray([len(r) for r in rows], np.int32)),
            place(np.zeros((len(rows), 0), np.int32)), place(np.zeros((len(rows),), np.int32)), eos, key,
            repeats=1, **kw)
    stops = set(int(e) for e in eos_token_ids)
    flat = [_cut(row, stops) for row in mesh_lib.fetch(out).tolist()]
    return [flat[b * R: (b + 1) * R] for b in range(B)]


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
    _check_prompts(prompts)
    outs = generate_forked(cfg, params, prompts, [[]], num_samples=1, max_new_tokens=max_new_tokens,
                           eos_token_ids=eos_token_ids, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           vocab_limit=vocab_limit)
    return [o[0][0].tokens for o in outs]
