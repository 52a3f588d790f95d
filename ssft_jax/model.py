"""One decoder family for Qwen2 / Qwen2.5, Llama 3.x and Qwen3.

The three differ only in switches of `ModelConfig`: q/k/v bias (Qwen2), q/k RMSNorm over the head dimension
(Qwen3), llama3 RoPE frequency scaling (Llama 3.1+), tied or untied output head. Everything else is shared:
GQA attention with segment ids (packed rows), rotate-half RoPE computed in fp32, SwiGLU MLP, RMSNorm, a KV cache.

Two faces over the same math:
- `Decoder`, an NNX module whose `nnx.Param`s carry logical axis names (metadata `logical_axes`), used to
  initialise weights and to read the parameter layout;
- `forward(cfg, params, tokens, segment_ids, positions, cache=None)`, a pure function over the plain nested dict
  of arrays (`nnx.to_pure_dict(nnx.state(decoder))`), which is what train/eval steps `jax.jit`.
Layers are stacked along a leading 'layers' axis and run with `lax.scan`, so compile time does not grow with depth.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ssft_jax import quant
from ssft_jax.mesh import constrain_rows

Params = dict[str, Any]
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, named as in HF `config.json` where a name exists."""

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE scaling as in HF `rope_parameters`: rope_type 'default' | 'linear' | 'llama3', with its fields.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    tie_word_embeddings: bool = False
    # Numerics: parameters stay in param_dtype (fp32 master weights); matmuls run in dtype.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    # Query block size for memory-efficient attention on long rows (0 = dense); rows are padded to a multiple of it.
    attention_chunk: int = 0
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):  # keep the config hashable: it is a static jit argument
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.model_type == "qwen2" and not self.attention_bias:
            # transformers' Qwen2 always has q/k/v biases: a bias-free "qwen2" could not be exported faithfully.
            raise ValueError(
                "model_type 'qwen2' has q/k/v biases (attention_bias=True); use 'llama' for a bias-free model"
            )
        if self.model_type == "qwen3" and not self.qk_norm:
            raise ValueError("model_type 'qwen3' has q/k RMSNorm (qk_norm=True)")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        rope_type = dict(self.rope_scaling).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise NotImplementedError(f"rope_type {rope_type!r} is not implemented (default, linear, llama3 are)")

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Build from an HF `config.json` dict (transformers 4 or 5 layout), rejecting features we do not model."""
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json model_type {model_type!r} is not supported ({SUPPORTED_MODEL_TYPES})")
        if hf.get("use_sliding_window"):
            raise NotImplementedError("config.json: use_sliding_window=true is not supported")
        if hf.get("mlp_bias"):
            raise NotImplementedError("config.json: mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"config.json: hidden_act={hf['hidden_act']!r} (only silu)")
        # transformers 5 keeps rope_theta and scaling under `rope_parameters`; 4.x used rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", "default")
        # A file carrying both layouts (our exports do) must not say two things: transformers 4 reads the top-level
        # keys, 5 reads rope_parameters, so a disagreement would load two different models.
        if hf.get("rope_parameters") and hf.get("rope_theta") is not None and float(hf["rope_theta"]) != float(theta):
            raise ValueError(
                f"config.json: rope_theta={hf['rope_theta']} disagrees with rope_parameters.rope_theta={theta}"
            )
        heads = hf["num_attention_heads"]
        default_bias = model_type == "qwen2"
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            attention_bias=bool(hf.get("attention_bias", default_bias)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` dict that transformers 5.x and 4.x both load into the same architecture.

        transformers 5 reads `rope_parameters` (theta and scaling together) and `dtype`; 4.x reads the top-level
        `rope_theta`, `rope_scaling` and `torch_dtype` and ignores `rope_parameters`, falling back to theta=10000 in
        silence. Both layouts are written, with the same values.
        """
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        rope = {"rope_theta": self.rope_theta, **self.rope_params}
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        out = dict(
            architectures=[arch[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            rope_theta=self.rope_theta,
            # 4.x: None means plain RoPE; a dict holds the scaling without theta (its own top-level key there).
            rope_scaling=scaling if scaling.get("rope_type", "default") != "default" else None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=self.param_dtype,
            torch_dtype=self.param_dtype,
        )
        out["attention_bias"] = self.attention_bias
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        return out


# ----------------------------------------------------------------------------------------------------------
# Parameters: the NNX module. Shapes keep heads as their own axis so 'heads' can be sharded over 'tensor'.
# ----------------------------------------------------------------------------------------------------------

def _param(rngs: nnx.Rngs | None, shape, axes, dtype, *, scale: float | None = None, value: float | None = None):
    if value is not None:
        init = jnp.full(shape, value, dtype)
    else:
        init = (scale * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(init, logical_axes=axes)


class DecoderLayers(nnx.Module):
    """All decoder layers, stacked on a leading 'layers' axis (consumed by `lax.scan` in `forward`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, H, K, Dh, F = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                             cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size)
        pd = jnp.dtype(cfg.param_dtype)
        std = 0.02  # HF's initializer_range default; also what the from-scratch demo model uses
        self.attn_norm = _param(rngs, (L, D), ("layers", "norm"), pd, value=1.0)
        self.q_proj = _param(rngs, (L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), pd, scale=std)
        self.k_proj = _param(rngs, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), pd, scale=std)
        self.v_proj = _param(rngs, (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), pd, scale=std)
        self.o_proj = _param(rngs, (L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), pd, scale=std)
        if cfg.attention_bias:
            self.q_bias = _param(rngs, (L, H, Dh), ("layers", "heads", "head_dim"), pd, value=0.0)
            self.k_bias = _param(rngs, (L, K, Dh), ("layers", "kv_heads", "head_dim"), pd, value=0.0)
            self.v_bias = _param(rngs, (L, K, Dh), ("layers", "kv_heads", "head_dim"), pd, value=0.0)
        if cfg.qk_norm:
            self.q_norm = _param(rngs, (L, Dh), ("layers", "norm"), pd, value=1.0)
            self.k_norm = _param(rngs, (L, Dh), ("layers", "norm"), pd, value=1.0)
        self.mlp_norm = _param(rngs, (L, D), ("layers", "norm"), pd, value=1.0)
        self.gate_proj = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd, scale=std)
        self.up_proj = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd, scale=std)
        self.down_proj = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), pd, scale=std)


class Decoder(nnx.Module):
    """The NNX face of the model. `decoder(tokens, ...)` calls the pure `forward` on this module's parameters."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, scale=0.02)
        self.layers = DecoderLayers(cfg, rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), pd, value=1.0)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, scale=0.02)

    def __call__(self, tokens, segment_ids=None, positions=None, cache=None, **kw):
        return forward(self.cfg, params_of(self), tokens, segment_ids, positions, cache, **kw)


def params_of(module: nnx.Module) -> Params:
    """The plain nested dict of arrays that `forward` takes (split once; jit the pure function over it)."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def logical_axes_of(module: nnx.Module) -> dict:
    """Same structure as `params_of`, with each leaf the tuple of logical axis names of that parameter."""
    state = nnx.state(module, nnx.Param)
    axes = jax.tree.map(
        lambda v: v.get_metadata()["logical_axes"], state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes


def abstract_params(cfg: ModelConfig) -> tuple[Params, dict]:
    """Shapes/dtypes (`jax.ShapeDtypeStruct`) and logical axes of every parameter, without allocating any."""
    module = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return params_of(module), logical_axes_of(module)


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
    """Random initial parameters (for models trained from scratch and for tests)."""
    return params_of(Decoder(cfg, rngs=nnx.Rngs(seed)))


# ----------------------------------------------------------------------------------------------------------
# The math.
# ----------------------------------------------------------------------------------------------------------

def rms_norm(x, scale, eps):
    # Normalise in fp32 whatever the compute dtype: bf16 variance loses too much precision.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * scale.astype(jnp.float32)).astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> jnp.ndarray:
    """Per-pair inverse frequencies, with llama3 / linear scaling applied as HF does."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    rp = cfg.rope_params
    kind = rp.get("rope_type", "default")
    if kind == "linear":
        inv = inv / rp["factor"]
    elif kind == "llama3":
        factor, low, high = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old_ctx = rp["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def rope_tables(cfg: ModelConfig, positions) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, 1, Dh/2] in fp32 for the rows' positions: computed once per forward, before the layer scan
    (every layer rotates by the same angles)."""
    angles = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(cfg)  # [B, T, Dh/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rotate(x, cos, sin):
    """Rotate-half RoPE of x [B, T, heads, Dh] by precomputed tables (`rope_tables`), in fp32."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_segment_ids, kv_segment_ids, q_slots, kv_slots, q_prefix_ids=None):
    """[B, 1, 1, Tq, Tk] bool: same non-zero segment and key slot <= query slot (causal within the row).

    Segment 0 marks padding: it attends to nothing and nothing attends to it. Slots are indices in the row (or
    in the KV cache), so packed sequences stay causal without needing positions to be monotone across segments.
    `q_prefix_ids` (optional) names, per query token, one more segment it may read: a shared prefix. SSFT's cost
    pass uses it to put a question's prompt once in a row, followed by its N*M (tag, trace) continuations, each
    attending to the prompt and to itself only, instead of repeating the prompt N*M times.
    """
    q = q_segment_ids[:, :, None]
    visible = (q == kv_segment_ids[:, None, :]) & (q != 0)
    if q_prefix_ids is not None:
        p = q_prefix_ids[:, :, None]
        visible = visible | ((p == kv_segment_ids[:, None, :]) & (p != 0) & (q != 0))
    causal = kv_slots[:, None, :] <= q_slots[:, :, None]
    return (visible & causal)[:, None, None, :, :]


def mask_bias(q_segment_ids, kv_segment_ids, q_slots, kv_slots, q_prefix_ids=None) -> jax.Array:
    """`attention_mask` as an additive fp32 bias [B, 1, 1, Tq, Tk] (0 visible, float32 min hidden): built once per
    forward before the layer scan and added to every layer's scores, instead of a select per layer and head."""
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_slots, kv_slots, q_prefix_ids)
    return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def _fused_projections() -> bool:
    """Concatenate q/k/v (and gate/up) weights into one matmul each, unless heads / the MLP are split over a
    'tensor' mesh axis: there the concatenation would mix differently sharded weights and cost collectives."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or "tensor" not in mesh.axis_names or mesh.shape["tensor"] == 1


_LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora(lp: Params, name: str, x, y, dtype):
    """y + dropout(x) @ A @ B when `lp['lora']` adapts projection `name` (built by `lora.adapted_params`, B already
    scaled by alpha/r), else y untouched: the base model's graph is unchanged without adapters. Beside the base
    matmul, inside the layer scan, so no merged copy of a weight is ever formed. x: the projection's input
    [B, T, in...], y: its output [B, T, out...]."""
    ad = lp.get("lora", {}).get(name)
    if ad is None:
        return y
    a, b = ad["a"].astype(dtype), ad["b"].astype(dtype)
    drop = lp.get("lora_dropout")
    if drop is not None:  # training only: one key per layer (scanned), one stream per projection
        key = jax.random.fold_in(jax.random.wrap_key_data(drop["key"]), _LORA_NAMES.index(name))
        keep = drop["keep"]
        x = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep.astype(x.dtype), 0).astype(x.dtype)
    ins, outs = "ijk"[: a.ndim - 1], "opq"[: b.ndim - 1]
    xa = jnp.einsum(f"bt{ins},{ins}r->btr", x, a)
    return y + jnp.einsum(f"btr,r{outs}->bt{outs}", xa, b).astype(y.dtype)


def _qkv(cfg: ModelConfig, lp: Params, h, dtype):
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if not _fused_projections():
        q, k, v = (jnp.einsum("btd,dhk->bthk", h, lp[n].astype(dtype)) for n in ("q_proj", "k_proj", "v_proj"))
    else:
        D = h.shape[-1]
        w = jnp.concatenate([lp["q_proj"].reshape(D, H * Dh), lp["k_proj"].reshape(D, K * Dh),
                             lp["v_proj"].reshape(D, K * Dh)], axis=1).astype(dtype)
        qkv = jnp.einsum("btd,de->bte", h, w)
        q, k, v = jnp.split(qkv, [H * Dh, (H + K) * Dh], axis=-1)
        B, T = h.shape[:2]
        q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
    return _lora(lp, "q_proj", h, q, dtype), _lora(lp, "k_proj", h, k, dtype), _lora(lp, "v_proj", h, v, dtype)


def _attention(cfg: ModelConfig, lp: Params, h, rope, q_seg, kv_seg_full, q_slots, kv_slots, cache_kv, dtype,
               q_prefix=None, bias=None):
    B, T, _ = h.shape
    q, k, v = _qkv(cfg, lp, h, dtype)
    if cfg.attention_bias:
        q, k, v = q + lp["q_bias"].astype(dtype), k + lp["k_bias"].astype(dtype), v + lp["v_bias"].astype(dtype)
    if cfg.qk_norm:
        q, k = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q, k = rotate(q, *rope), rotate(k, *rope)

    new_cache_kv = None
    if cache_kv is not None:
        # Write this chunk's keys/values at each row's own offset, then attend over the whole cache.
        ck, cv, index = cache_kv
        write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), i, axis=0))
        ck, cv = write(ck, k, index), write(cv, v, index)
        new_cache_kv = (ck, cv)
        k, v = ck.astype(dtype), cv.astype(dtype)

    chunk = cfg.attention_chunk
    if chunk and T > chunk:
        # Query blocks one at a time (rematerialised in the backward pass): scores are [chunk, S] per head instead of
        # [T, S], which is what makes 32k-token rows fit. Exact: every block still sees all keys. A row that is not a
        # multiple of the block (the trainer's P + Lt + T rarely is) gets padding queries of segment 0, which attend
        # to nothing (output exactly 0) and are cut off again. Each block builds its own [chunk, S] mask bias (a
        # whole-row bias would be the [T, S] array the blocks exist to avoid).
        pad = -T % chunk
        Tp = T + pad
        padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        blocks = lambda x: jnp.moveaxis(padded(x).reshape(B, Tp // chunk, chunk, *x.shape[2:]), 1, 0)
        qs = (blocks(q), blocks(q_seg), blocks(q_slots), blocks(q_prefix) if q_prefix is not None else None)

        def block_fn(xs):
            q_b, seg_b, slots_b, prefix_b = xs
            return _attend(cfg, q_b, seg_b, k, v, mask_bias(seg_b, kv_seg_full, slots_b, kv_slots, prefix_b), dtype)

        out = jnp.moveaxis(jax.lax.map(jax.checkpoint(block_fn), qs), 0, 1)
        out = out.reshape(B, Tp, cfg.num_attention_heads, cfg.head_dim)[:, :T]
    else:
        if bias is None:
            bias = mask_bias(q_seg, kv_seg_full, q_slots, kv_slots, q_prefix)
        out = _attend(cfg, q, q_seg, k, v, bias, dtype)
    return _lora(lp, "o_proj", out, jnp.einsum("bthk,hkd->btd", out, lp["o_proj"].astype(dtype)), dtype), new_cache_kv


def _attend(cfg, q, q_seg, k, v, bias, dtype):
    """Softmax attention of q [B, T, H, Dh] over k, v [B, S, K, Dh] with an additive mask bias [B, 1, 1, T, S].

    Grouped-query attention with the G = H/K query heads of each KV head folded into the query axis: scores are
    [B, K, G*T, S] from one batched matmul per KV head, and k/v are never repeated G times."""
    B, T, H, Dh = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    qf = q.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, Dh]
    scores = jnp.einsum("bkqd,bksd->bkqs", qf, kt, preferred_element_type=jnp.float32) / math.sqrt(Dh)
    scores = scores.reshape(B, K, G, T, S) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(B, K, G * T, S)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vt).reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4)
    # A query with no visible key (padding, segment 0) gets uniform weights over hidden keys: zero its output, so
    # padding outputs are exactly 0 (one select on [B, T, H, Dh], not on the scores).
    return jnp.where((q_seg != 0)[:, :, None, None], out.reshape(B, T, H, Dh), 0).astype(dtype)


def _mlp(lp: Params, h, dtype):
    if _fused_projections():
        w = jnp.concatenate([lp["gate_proj"], lp["up_proj"]], axis=-1).astype(dtype)
        gate, up = jnp.split(jnp.einsum("btd,df->btf", h, w), 2, axis=-1)
    else:
        gate = jnp.einsum("btd,df->btf", h, lp["gate_proj"].astype(dtype))
        up = jnp.einsum("btd,df->btf", h, lp["up_proj"].astype(dtype))
    gate, up = _lora(lp, "gate_proj", h, gate, dtype), _lora(lp, "up_proj", h, up, dtype)
    act = jax.nn.silu(gate) * up
    return _lora(lp, "down_proj", act, jnp.einsum("btf,fd->btd", act, lp["down_proj"].astype(dtype)), dtype)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> dict[str, jax.Array]:
    """An empty KV cache: per layer keys/values [L, B, S, K, Dh], per-slot segment ids, per-row fill index."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((batch,), jnp.int32),
    }


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: dict[str, jax.Array] | None = None,
    *,
    prefix_segment_ids: jax.Array | None = None,
    return_hidden: bool = False,
):
    """Logits [B, T, V] (fp32) or final hidden states [B, T, D]; with a cache, also the updated cache.

    tokens, segment_ids, positions: [B, T] int. segment_ids defaults to all ones (one sequence per row; 0 would
    mean padding); positions default to 0..T-1 (plus the cache fill index when decoding). Packed rows pass each
    sequence's own positions restarting at 0 and a distinct segment id per sequence.

    prefix_segment_ids: [B, T], optional: per token, a second segment it may attend to (a shared prompt placed
    earlier in the row; 0 = none). See `attention_mask`.

    With `cache`, the T new tokens of row b are written at slots index[b]..index[b]+T-1 and attend to everything
    before them in the cache with the same segment id; the returned cache has index advanced by T.
    """
    B, T = tokens.shape
    dtype = jnp.dtype(cfg.dtype)
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    start = cache["index"] if cache is not None else jnp.zeros((B,), jnp.int32)
    q_slots = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    if positions is None:
        positions = q_slots
    if cache is not None:
        write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))
        kv_seg = write(cache["segment_ids"], segment_ids.astype(jnp.int32), start)
        S = cache["k"].shape[2]
    else:
        kv_seg, S = segment_ids, T
    kv_slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))

    h = jnp.take(params["embedding"], tokens, axis=0).astype(dtype)
    layers = params["layers"]
    # Shared by every layer, so built once outside the scan: the RoPE tables and (dense attention) the mask bias.
    rope = rope_tables(cfg, positions)
    dense = not (cfg.attention_chunk and T > cfg.attention_chunk)
    bias = mask_bias(segment_ids, kv_seg, q_slots, kv_slots, prefix_segment_ids) if dense else None

    def layer(h, xs):
        lp, ck, cv = xs
        lp = quant.dequantize_layer(lp, dtype)  # a QLoRA base: this layer's weights only, right before its matmuls
        h = constrain_rows(h)  # rows stay split over data*fsdp under FSDP (see mesh.constrain_rows)
        cache_kv = (ck, cv, start) if ck is not None else None
        a, new_kv = _attention(cfg, lp, rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps), rope,
                               segment_ids, kv_seg, q_slots, kv_slots, cache_kv, dtype, prefix_segment_ids, bias)
        h = h + a
        h = h + _mlp(lp, rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps), dtype)
        return h, new_kv

    layer = _remat(layer, cfg.remat)
    xs = (layers, cache["k"], cache["v"]) if cache is not None else (layers, None, None)
    h, new_kv = jax.lax.scan(layer, h, xs)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)

    out = h if return_hidden else logits_from_hidden(cfg, params, h)
    if cache is None:
        return out
    new_cache = {"k": new_kv[0], "v": new_kv[1], "segment_ids": kv_seg, "index": start + T}
    return out, new_cache


def output_embedding(cfg: ModelConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the transposed input embedding when tied)."""
    return params["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    w = output_embedding(cfg, params).astype(h.dtype)
    return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)


def resize_vocab(cfg: ModelConfig, params: Params, new_vocab_size: int) -> tuple[ModelConfig, Params]:
    """Grow the vocabulary (e.g. for forking tags added as special tokens): new rows start at the mean embedding.

    The mean of the existing rows keeps the new tokens' initial logits/inputs in-distribution, the usual choice
    when adding tokens before fine-tuning.
    """
    old = cfg.vocab_size
    if new_vocab_size < old:
        raise ValueError(f"resize_vocab: cannot shrink the vocabulary from {old} to {new_vocab_size}")
    if new_vocab_size == old:
        return cfg, params
    extra = new_vocab_size - old
    params = dict(params)
    emb = params["embedding"]
    params["embedding"] = jnp.concatenate([emb, jnp.broadcast_to(emb.mean(0, keepdims=True), (extra, emb.shape[1]))])
    if not cfg.tie_word_embeddings:
        head = params["lm_head"]
        params["lm_head"] = jnp.concatenate(
            [head, jnp.broadcast_to(head.mean(1, keepdims=True), (head.shape[0], extra))], 1
        )
    return cfg.replace(vocab_size=new_vocab_size), params
