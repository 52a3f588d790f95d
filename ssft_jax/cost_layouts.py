"""How the no-grad cost pass runs: a registry of cost layouts, each one per-token NLL function and the FLOP and
memory rules the throughput figures, `memory_plan` and `ssft.cost_layout="auto"` read.

The cost view holds one row per question, `[prompt (P slots) | block (0,0) | ... | block (N-1,M-1)]`, each block
`W = Lt + Le` slots of (tag i, first L tokens of trace j). Every layout returns the same per-slot NLL of that row
(up to float rounding), so `losses.cost_matrix` reads C[B, N, M] back from any of them:
  packed        the whole row in one forward; each block attends to the prompt and itself (prefix attention).
                Linear layers see P + N*M*W tokens, attention is dense over the row: (P + N*M*W)^2 scores.
  prefix_cache  the prompt alone into a KV cache, repeated to N*M rows of W queries that read it: the same
                linear work and (N*M*W) * (P + W) scores (13x fewer at the paper's P=1024, L=1000), at the
                memory of the cache repeated N*M times.

A new layout is one NLL function and one `register` line (tests/test_extension_points.py shows one); its FLOP and
memory rules may be the built-ins' (`PACKED.flops`, ...) when it computes what one of them computes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from ssft_jax.logprobs import token_logprobs
from ssft_jax.model import ModelConfig, Params, forward, init_cache, output_embedding
from ssft_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class CostPassTerms:
    """One device's cost pass as `memory_plan` sizes it, for a layout's memory rule. Bytes; `*_per_token`: one
    layer's attention-phase / MLP-phase intermediates per token of a row; `scores(rows, row_len, fp32_copies)`:
    the attention scores of that many rows (query-chunked as the model runs them); `head(rows, row_len, copies)`:
    the log-softmax chunk of the output head; `q_len(n)`: the query block of a row of n tokens."""
    b: int  # questions per device per micro-batch
    N: int
    M: int
    P: int
    W: int  # Lt + Le: one (tag, trace prefix) block
    R: int  # P + N*M*W: the packed cost row
    layers: int
    hidden: int
    q_heads: float  # per device
    kv_heads: float  # per device
    head_dim: int
    act_bytes: int  # bytes of one activation element (model.dtype)
    attn_per_token: float
    mlp_per_token: float
    scores: Callable[[int, int, int], float]
    head: Callable[[int, int, int], float]
    q_len: Callable[[int], int]


# (cfg, params, cost_view, *, num_pairs, prompt_len, block_len, chunk_size) -> per-slot NLL [B, R] (0 off the
# loss positions)
TokenNllFn = Callable[..., jax.Array]
# (cfg, layout (data.LayoutConfig), batch_size, forward_flops) -> the pass's FLOPs; `flops.forward_flops` comes in
# as the last argument so a layout's rule needs no import of the FLOP model (which reads this registry)
FlopsFn = Callable[..., float]
MemoryFn = Callable[[CostPassTerms], dict]  # terms -> {label: bytes} of the pass's peak (memory_plan's (a))


@dataclasses.dataclass(frozen=True)
class CostLayout:
    token_nll: TokenNllFn
    flops: FlopsFn
    memory: MemoryFn


_REGISTRY: Registry[CostLayout] = Registry("cost layout")
register, unregister, names, get = _REGISTRY.register, _REGISTRY.unregister, _REGISTRY.names, _REGISTRY.get


# ---------------------------------------------------------------------------------------------------------------
# packed: the row in one forward
# ---------------------------------------------------------------------------------------------------------------

def packed_token_nll(cfg: ModelConfig, params: Params, cv: dict, *, num_pairs: int, prompt_len: int | None,
                     block_len: int | None, chunk_size: int) -> jax.Array:
    del num_pairs, prompt_len, block_len
    hidden = forward(cfg, params, cv["tokens"], cv["segment_ids"], cv["positions"],
                     prefix_segment_ids=cv["prefix_segment_ids"], return_hidden=True)
    nll = -token_logprobs(hidden, output_embedding(cfg, params), cv["targets"], chunk_size=chunk_size)
    return nll * cv["loss_mask"].astype(jnp.float32)


def packed_flops(cfg: ModelConfig, layout, batch_size: int, forward_flops) -> float:
    f = forward_flops(cfg, batch_size, layout.cost_row_len)
    return f["layers"] + f["head"]


def dense_rows_memory(t: CostPassTerms, rows: int, n: int) -> dict:
    """`rows` rows of `n` tokens through one layer at a time with dense (masked) attention, then the head."""
    attn = rows * n * t.attn_per_token + t.scores(rows, n, 2)
    mlp = rows * n * t.mlp_per_token
    return {"residual + normed input": rows * n * 2 * t.hidden * t.act_bytes,
            f"layer peak ({'attention' if attn >= mlp else 'MLP'} phase)": max(attn, mlp),
            "head (log-softmax chunk)": t.head(rows, n, 2)}


def packed_memory(t: CostPassTerms) -> dict:
    return dense_rows_memory(t, t.b, t.R)


# ---------------------------------------------------------------------------------------------------------------
# prefix_cache: the prompt once into a KV cache that every block row reads
# ---------------------------------------------------------------------------------------------------------------

def prefix_cache_token_nll(cfg: ModelConfig, params: Params, cv: dict, *, num_pairs: int, prompt_len: int | None,
                           block_len: int | None, chunk_size: int) -> jax.Array:
    """Per-slot NLL [B, R] of the cost row (0 on the prompt), computed with the prompt in a shared KV cache."""
    B, R = cv["tokens"].shape
    P, W = prompt_len, block_len
    if P is None or W is None or P + num_pairs * W != R:
        raise ValueError(f"cost layout 'prefix_cache' needs prompt_len + N*M*block_len = row length {R}, got "
                         f"prompt_len={P}, block_len={W}, N*M={num_pairs}")
    blocks = lambda x: x[:, P:].reshape(B * num_pairs, W)  # noqa: E731
    _, cache = forward(cfg, params, cv["tokens"][:, :P], cv["segment_ids"][:, :P], cv["positions"][:, :P],
                       cache=init_cache(cfg, B, P + W), return_hidden=True)
    # Every block row starts from its question's prompt cache; blocks and prompt share segment id 1, so each block
    # reads the prompt and itself (padding slots stay segment 0 and read nothing).
    cache = {k: jnp.repeat(v, num_pairs, axis=1 if k in ("k", "v") else 0) for k, v in cache.items()}
    seg = (blocks(cv["segment_ids"]) != 0).astype(jnp.int32)
    hidden, _ = forward(cfg, params, blocks(cv["tokens"]), seg, blocks(cv["positions"]), cache=cache,
                        return_hidden=True)
    logp = token_logprobs(hidden, output_embedding(cfg, params), blocks(cv["targets"]), chunk_size=chunk_size)
    nll = (-logp * blocks(cv["loss_mask"]).astype(jnp.float32)).reshape(B, num_pairs * W)
    return jnp.concatenate([jnp.zeros((B, P), jnp.float32), nll], 1)


def prefix_cache_flops(cfg: ModelConfig, layout, batch_size: int, forward_flops) -> float:
    prompt = forward_flops(cfg, batch_size, layout.max_prompt_len)
    blocks = forward_flops(cfg, batch_size * layout.num_pairs, layout.pair_block_len,
                           layout.max_prompt_len + layout.pair_block_len)
    return prompt["layers"] + blocks["layers"] + blocks["head"]  # the prompt's own logits are not computed


def prefix_cache_memory(t: CostPassTerms) -> dict:
    # The prompt's KV cache for every layer, repeated to the N*M block rows (b*K rows of W queries reading P + W
    # keys); the prompt's own pass is the smaller of the two.
    K, W, P = t.N * t.M, t.W, t.P
    q = t.q_len(W)
    rows = t.b * K
    attn = rows * W * t.attn_per_token + rows * t.q_heads * q * (P + W) * (8 + t.act_bytes) + rows * q * (P + W)
    mlp = rows * W * t.mlp_per_token
    return {"KV cache, repeated to N*M rows": 2 * t.layers * rows * (P + W) * t.kv_heads * t.head_dim * t.act_bytes,
            "residual + normed input": rows * W * 2 * t.hidden * t.act_bytes,
            f"layer peak ({'attention' if attn >= mlp else 'MLP'} phase)": max(attn, mlp),
            "head (log-softmax chunk)": t.head(rows, W, 2)}


PACKED = CostLayout(packed_token_nll, packed_flops, packed_memory)
PREFIX_CACHE = CostLayout(prefix_cache_token_nll, prefix_cache_flops, prefix_cache_memory)
register("packed", PACKED)
register("prefix_cache", PREFIX_CACHE)
