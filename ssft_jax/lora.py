"""LoRA: low-rank adapters on the decoder's projections, the base weights frozen (issue 21).

Why by hand and not qwix: qwix (Google's JAX LoRA/QLoRA library, used by tunix) works by intercepting
`dot_general`/`einsum` calls made inside flax (linen or NNX) modules and looking the weight up as an attribute of the
current module (qwix 0.1.8, `providers/lora.py: _get_or_create_lora_params`). Our model is a pure function,
`model.forward(cfg, params, ...)`, over a plain dict, running the stacked layers in a `lax.scan` with q/k/v (and
gate/up) concatenated into one matmul: there is no module to intercept and no per-projection call to match. The
adapter math is small, so it is written here and applied inside the layer scan (`model._lora`).

The split (design): the train state's `params` are the trainable pytree only,

    trainable = {"lora": {name: {"a": [L, in..., r], "b": [L, r, out...]}},  # name in LoraSpec.targets
                 "tag_embedding": [n, D], "tag_lm_head": [D, n]}              # special-mode tag rows (see below)

so the optimizer state, the gradients and the checkpoints hold nothing else; the frozen base (in
`LoraSpec.base_dtype`, e.g. bf16) is a separate argument of the jitted step, never differentiated.
`adapted_params(frozen, trainable)` builds the dict `forward` reads: the base weights, `layers['lora']` (B already
scaled by alpha/r) and the tag rows written over the base rows. A, B and the tag rows are sharded by the same
logical-axis rules as the weights (`mesh.LOGICAL_AXIS_RULES`: 'lora_rank' and 'tag_rows' are replicated).

Forking tags in special mode are new tokens (`model.resize_vocab` starts them at the mean embedding): with a frozen
embedding every tag would stay the same vector and SSFT could never tell them apart. Their embedding rows (and
lm_head columns when untied) are trained, and only theirs, as PEFT's `trainable_token_indices` does. Text-mode tags
are ordinary tokens shared with the rest of the text: their rows stay frozen (training them would change every
use of those tokens); the adapters see different token sequences per tag and separate them on their own.

Initialisation as PEFT's default: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform with a = sqrt(5)), B = 0,
so the adapted model's logits equal the base model's exactly at step 0 (a zero delta added in the same dtype).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssft_jax import mesh as mesh_lib, model as model_lib, quant
from ssft_jax.model import ModelConfig, Params

# Our projection name -> its module inside an HF decoder layer (PEFT's target_modules are the last part).
TARGET_MODULES: dict[str, str] = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
# How many leading (after 'layers') dimensions of each weight are its input: o_proj reads [heads, head_dim].
_INPUT_DIMS = {"o_proj": 2}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What is adapted and how: `config.lora` plus the ids of the tag tokens whose rows are trained."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGET_MODULES)
    tag_token_ids: tuple[int, ...] = ()
    base_dtype: str = "bfloat16"
    seed: int = 0
    base_quant: str = ""  # QLoRA: "int8" | "nf4" projection weights in the frozen base (`quant`)

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ValueError(
                f"lora.targets={list(self.targets)}: expected a non-empty subset of {list(TARGET_MODULES)}"
            )
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout}: must be in [0, 1)")
        quant.check_mode(self.base_quant)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_from_config(config, tokenizer=None, tags=None, *, model_param_dtype: str = "float32") -> LoraSpec | None:
    """The run's LoraSpec (None when `lora.enabled` is off). Tag rows are trained for special-mode tags only."""
    lc = config.get("lora")
    if lc is None or not lc.enabled:
        return None
    ids: tuple[int, ...] = ()
    if lc.train_tag_rows and tags is not None and tags.mode == "special" and tokenizer is not None:
        ids = tuple(int(t[0]) for t in tags.all_tag_ids(tokenizer))
    return LoraSpec(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout), targets=tuple(lc.targets),
                    tag_token_ids=ids, base_dtype=lc.base_dtype or model_param_dtype, seed=int(config.seed),
                    base_quant=lc.get("base_quant", ""))


def spec_for_plan(config, cfg: ModelConfig) -> LoraSpec | None:
    """The run's LoraSpec (None without `lora.enabled`). The planner has no tokenizer for a preset: the N tag
    rows are counted as N ids (their values do not change the memory). For `memory_plan` and `plan_check`."""
    lc = config.get("lora")
    if lc is None or not lc.enabled:
        return None
    s = config.ssft
    ids = tuple(range(cfg.vocab_size - s.num_tags, cfg.vocab_size)) if (
        lc.train_tag_rows and s.tag_mode == "special") else ()
    return LoraSpec(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout),
                    targets=tuple(lc.targets), tag_token_ids=ids,
                    base_dtype=lc.base_dtype or cfg.param_dtype, base_quant=lc.get("base_quant", ""))



# ---------------------------------------------------------------------------------------------------------------
# The trainable pytree: shapes, logical axes, initial values
# ---------------------------------------------------------------------------------------------------------------

def trainable_shapes(cfg: ModelConfig, spec: LoraSpec) -> tuple[dict, dict]:
    """(ShapeDtypeStructs, logical axes) of the trainable pytree, fp32 (the adapters' master weights)."""
    shapes, axes = model_lib.abstract_params(cfg)
    f32 = jnp.float32
    s_out: dict[str, Any] = {"lora": {}}
    a_out: dict[str, Any] = {"lora": {}}
    r = spec.rank
    for name in spec.targets:
        w, ax = shapes["layers"][name].shape, axes["layers"][name]
        n_in = 1 + _INPUT_DIMS.get(name, 1)
        s_out["lora"][name] = {"a": jax.ShapeDtypeStruct((*w[:n_in], r), f32),
                               "b": jax.ShapeDtypeStruct((w[0], r, *w[n_in:]), f32)}
        a_out["lora"][name] = {"a": (*ax[:n_in], "lora_rank"), "b": (ax[0], "lora_rank", *ax[n_in:])}
    n = len(spec.tag_token_ids)
    if n:
        D = cfg.hidden_size
        s_out["tag_embedding"], a_out["tag_embedding"] = jax.ShapeDtypeStruct((n, D), f32), ("tag_rows", "embed")
        if not cfg.tie_word_embeddings:
            s_out["tag_lm_head"], a_out["tag_lm_head"] = jax.ShapeDtypeStruct((D, n), f32), ("embed", "tag_rows")
    return s_out, a_out


def trainable_count(cfg: ModelConfig, spec: LoraSpec) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(trainable_shapes(cfg, spec)[0]))


def init_trainable(cfg: ModelConfig, spec: LoraSpec, base: Params) -> dict:
    """A ~ PEFT's kaiming-uniform bound 1/sqrt(fan_in), B = 0, tag rows = the base rows (in fp32)."""
    shapes, _ = trainable_shapes(cfg, spec)
    key = jax.random.key(spec.seed)
    out: dict[str, Any] = {"lora": {}}
    for i, name in enumerate(spec.targets):
        a, b = shapes["lora"][name]["a"], shapes["lora"][name]["b"]
        bound = 1.0 / math.sqrt(math.prod(a.shape[1:-1]))
        out["lora"][name] = {"a": jax.random.uniform(jax.random.fold_in(key, i), a.shape, jnp.float32, -bound, bound),
                             "b": jnp.zeros(b.shape, jnp.float32)}
    ids = jnp.asarray(spec.tag_token_ids, jnp.int32)
    if "tag_embedding" in shapes:
        out["tag_embedding"] = base["embedding"][ids].astype(jnp.float32)
    if "tag_lm_head" in shapes:
        out["tag_lm_head"] = base["lm_head"][:, ids].astype(jnp.float32)
    return out


def place_trainable(cfg: ModelConfig, spec: LoraSpec, base: Params, mesh) -> dict:
    """`init_trainable` computed on device, straight into the adapters' shardings on `mesh`."""
    shapes, axes = trainable_shapes(cfg, spec)
    shardings = mesh_lib.tree_shardings(axes, shapes, mesh)
    return jax.jit(lambda b: init_trainable(cfg, spec, b), out_shardings=shardings)(base)


def abstract_trainable(cfg: ModelConfig, spec: LoraSpec, mesh) -> dict:
    """The trainable pytree as sharded ShapeDtypeStructs (a restore target; the memory planner's compile)."""
    shapes, axes = trainable_shapes(cfg, spec)
    shardings = mesh_lib.tree_shardings(axes, shapes, mesh)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


def freeze(spec: LoraSpec, base: Params) -> Params:
    """The frozen base in `spec.base_dtype` (bf16 halves its memory; compute casts per layer as always), its
    projections quantized with `spec.base_quant` (QLoRA; a base loaded quantized stays as it is)."""
    dt = jnp.dtype(spec.base_dtype)
    base = quant.quantize_params(base, spec.base_quant) if spec.base_quant else base
    return jax.tree.map(lambda x: x if quant.is_quantized(x) or x.dtype == dt else x.astype(dt), base,
                        is_leaf=quant.is_quantized)


# ---------------------------------------------------------------------------------------------------------------
# The adapted model
# ---------------------------------------------------------------------------------------------------------------

def _with_tag_rows(spec: LoraSpec, cfg: ModelConfig, frozen: Params, trainable: dict) -> Params:
    params = dict(frozen)
    ids = jnp.asarray(spec.tag_token_ids, jnp.int32)
    # A copy of the [V, D] table (and head) per call: the price of keeping `forward` and the log-prob code
    # unchanged; memory_plan counts it. The fp32 rows are cast to the base dtype: the master copy stays fp32.
    if "tag_embedding" in trainable:
        emb = frozen["embedding"]
        params["embedding"] = emb.at[ids].set(trainable["tag_embedding"].astype(emb.dtype))
    if "tag_lm_head" in trainable:
        head = frozen["lm_head"]
        params["lm_head"] = head.at[:, ids].set(trainable["tag_lm_head"].astype(head.dtype))
    return params


def adapted_params(cfg: ModelConfig, spec: LoraSpec, frozen: Params, trainable: dict,
                   dropout_rng: jax.Array | None = None) -> Params:
    """The params `model.forward` reads for the adapted model: base + `layers['lora']` (B scaled by alpha/r) + tag
    rows. `dropout_rng` (training only): LoRA dropout on each adapter's input, one key per layer (`model._lora`)."""
    params = _with_tag_rows(spec, cfg, frozen, trainable)
    layers = dict(frozen["layers"])
    layers["lora"] = {n: {"a": ab["a"], "b": ab["b"] * spec.scale} for n, ab in trainable["lora"].items()}
    if dropout_rng is not None and spec.dropout > 0:
        L = cfg.num_hidden_layers
        layers["lora_dropout"] = {"key": jax.random.key_data(jax.random.split(dropout_rng, L)),
                                  "keep": jnp.full((L,), 1.0 - spec.dropout, jnp.float32)}
    params["layers"] = layers
    return params


def merge(cfg: ModelConfig, spec: LoraSpec, frozen: Params, trainable: dict, dtype: str = "float32") -> Params:
    """Plain params (no adapters) with W + (alpha/r) A B folded in, in `dtype`: the HF export and fast sampling."""
    params = _with_tag_rows(spec, cfg, quant.dequantize_tree(frozen, dtype), trainable)
    layers = dict(params["layers"])
    for name, ab in trainable["lora"].items():
        w = layers[name]
        a = ab["a"].reshape(w.shape[0], -1, spec.rank)
        b = ab["b"].reshape(w.shape[0], spec.rank, -1)
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST) * spec.scale
        layers[name] = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(dtype)
    params["layers"] = layers
    return params


# ---------------------------------------------------------------------------------------------------------------
# PEFT layout: adapter_config.json + adapter_model.safetensors (transformers + peft, vLLM)
# ---------------------------------------------------------------------------------------------------------------

def peft_tensors(cfg: ModelConfig, spec: LoraSpec, trainable: dict) -> dict[str, np.ndarray]:
    """PEFT's tensor names and layouts: lora_A.weight [r, in], lora_B.weight [out, r] (torch Linear: [out, in]),
    B unscaled (PEFT multiplies by lora_alpha / r itself); tag rows as `trainable_tokens_delta` [n, D] (the rows'
    values, despite the name: peft `TrainableTokensLayer` writes them over the base rows)."""
    out: dict[str, np.ndarray] = {}
    host = jax.device_get(trainable)
    for name, ab in host["lora"].items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        L, r = a.shape[0], spec.rank
        for i in range(L):
            base = f"base_model.model.model.layers.{i}.{TARGET_MODULES[name]}"
            out[f"{base}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{base}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    if "tag_embedding" in host:
        out["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = np.asarray(
            host["tag_embedding"], np.float32)
    if "tag_lm_head" in host:
        out["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] = np.ascontiguousarray(
            np.asarray(host["tag_lm_head"], np.float32).T)
    return out


def peft_config(cfg: ModelConfig, spec: LoraSpec, base_model: str = "") -> dict[str, Any]:
    ids = list(spec.tag_token_ids)
    tokens: Any = None
    if ids:  # tied: peft ties the lm_head adapter to the embedding's; untied: one entry per module
        tokens = {"embed_tokens": ids} if cfg.tie_word_embeddings else {"embed_tokens": ids, "lm_head": ids}
    arch = cfg.to_hf()["architectures"][0]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
        "target_modules": sorted(spec.targets), "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "trainable_token_indices": tokens, "auto_mapping": {"base_model_class": arch},
    }


def save_peft_adapter(folder: str | pathlib.Path, cfg: ModelConfig, spec: LoraSpec, trainable: dict, *,
                      base_model: str = "") -> pathlib.Path:
    """Write the adapters alone in PEFT's layout; `base_model` names the base folder or hub id in the config."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    tensors = peft_tensors(cfg, spec, trainable)
    if jax.process_index() != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg, spec, base_model), indent=2))
    return folder


def load_peft_adapter(folder: str | pathlib.Path, cfg: ModelConfig) -> tuple[LoraSpec, dict]:
    """Read a PEFT LoRA folder (ours or peft's own `save_pretrained`) back into (LoraSpec, trainable)."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(folder)
    pc = json.loads((folder / ADAPTER_CONFIG).read_text())
    if pc.get("peft_type") != "LORA" or pc.get("use_dora") or pc.get("use_rslora") or pc.get("fan_in_fan_out"):
        raise ValueError(f"{folder}: only plain LoRA adapters are read (peft_type LORA, no DoRA / rsLoRA)")
    t = load_file(str(folder / ADAPTER_WEIGHTS))
    targets = tuple(
        n for n in TARGET_MODULES if f"base_model.model.model.layers.0.{TARGET_MODULES[n]}.lora_A.weight" in t
    )
    tok = pc.get("trainable_token_indices") or {}
    ids = tuple(tok.get("embed_tokens", ()) if isinstance(tok, dict) else tok)
    spec = LoraSpec(rank=int(pc["r"]), alpha=float(pc["lora_alpha"]), dropout=float(pc.get("lora_dropout", 0.0)),
                    targets=targets, tag_token_ids=ids)
    shapes, _ = trainable_shapes(cfg, spec)
    trainable: dict[str, Any] = {"lora": {}}
    for name in targets:
        sa, sb = shapes["lora"][name]["a"].shape, shapes["lora"][name]["b"].shape
        pre = [f"base_model.model.model.layers.{i}.{TARGET_MODULES[name]}" for i in range(cfg.num_hidden_layers)]
        a = np.stack([t.pop(f"{p}.lora_A.weight").T for p in pre]).reshape(sa)
        b = np.stack([t.pop(f"{p}.lora_B.weight").T for p in pre]).reshape(sb)
        trainable["lora"][name] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    emb = t.pop("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", None)
    head = t.pop("base_model.model.lm_head.token_adapter.trainable_tokens_delta", None)
    if emb is not None:
        trainable["tag_embedding"] = jnp.asarray(emb)
    if head is not None:
        trainable["tag_lm_head"] = jnp.asarray(head.T)
    if t:
        raise ValueError(f"{folder}: tensors not understood: {sorted(t)[:4]}")
    return spec, trainable
