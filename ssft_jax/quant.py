"""QLoRA's frozen base: the decoder's projection weights stored int8 or nf4, dequantized one layer at a time inside
the layer scan (`model.forward` calls `dequantize_layer` on each scanned layer), never as a whole dense copy.

    lora.base_quant = "int8"  per-output-channel absmax scales: w ~= q * s, q in [-127, 127], one s per output
                              unit of each layer (the reduction is over the projection's inputs)
    lora.base_quant = "nf4"   QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, appendix E): blocks of NF4_BLOCK
                              consecutive input weights share one absmax scale, each weight is the nearest of 16
                              levels of a normal distribution's quantiles in [-1, 1] (no double quantization: its
                              scales stay fp32, 4 bytes per 64 weights = 0.5 bit per weight more)

Only the seven projection weights are quantized (~93% of a Qwen2.5-7B's parameters); the embedding, the output head,
the norms and the biases stay in `lora.base_dtype`, as in QLoRA.

Why qwix: its `quantize` / `dequantize` (qwix 0.1.8, Google's JAX quantization library, the one tunix uses) are pure
functions over arrays returning a `QArray` pytree (int8 or uint4 values + scales), which is what a pure
`forward(cfg, params)` over a dict needs: the stacked QArray is scanned like any weight and dequantized per layer.
Its model-level API (interception of flax modules) is what does not fit here (see `lora`'s docstring).

Quantizing happens once, at load (`hf_io.load_hf_params(..., place_layer_param=host_quantizer(...))`): each
stacked weight is read from the safetensors on the host and quantized on the host's CPU backend one layer (and at
most CHUNK_ELEMENTS weights) at a time, then its values and scales are placed with the weight's sharding. Host
memory peaks at one stacked weight in `model.param_dtype` plus its quantized copy and one chunk's temporaries (nf4's
nearest-level search holds 16 fp32 distances per weight of the chunk: 16 x 4 x 8M = 0.5 GiB).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

QUANT_MODES = ("", "int8", "nf4")
NF4_BLOCK = 64
CHUNK_ELEMENTS = 8 * 1024 * 1024
# The projections (model parameter names under 'layers') and how many leading dims of each are inputs.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUT_DIMS = {"o_proj": 2}  # [heads, head_dim] -> D; every other projection has one input dim
_QTYPES = {"int8": jnp.int8, "nf4": "nf4"}


def _qwix():
    import qwix  # imported where used: only QLoRA runs need it
    return qwix


def is_quantized(x: Any) -> bool:
    return type(x).__name__ == "QArray" and hasattr(x, "qvalue")


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"lora.base_quant={mode!r}: expected one of {QUANT_MODES} ('' = not quantized)")
    return mode


def axes_for(name: str, ndim: int, shape: tuple[int, ...], mode: str) -> tuple[tuple[int, ...], dict[int, int]]:
    """(channelwise axes, tiled axes) of one layer's weight `name` [in..., out...] (no 'layers' axis).

    int8: a scale per output unit (channelwise over the outputs, shared over all inputs). nf4: blocks of NF4_BLOCK
    along the last input axis (the whole axis when NF4_BLOCK does not divide it), every other axis channelwise."""
    n_in = INPUT_DIMS.get(name, 1)
    outs = tuple(range(n_in, ndim))
    if mode == "int8":
        return outs, {}
    last = n_in - 1
    block = NF4_BLOCK if shape[last] % NF4_BLOCK == 0 else shape[last]
    return tuple(range(last)) + outs, {last: block}


def quantize(w: jax.Array, name: str, mode: str):
    """One layer's weight -> a qwix QArray (fp32 scales)."""
    channelwise, tiled = axes_for(name, w.ndim, w.shape, mode)
    return _qwix().quantize(w.astype(jnp.float32), _QTYPES[check_mode(mode)], channelwise_axes=channelwise,
                            tiled_axes=tiled, scale_dtype=jnp.float32)


def dequantize(x: Any, dtype=None) -> jax.Array:
    """A QArray's dense value, computed in `dtype` (default: its scales' fp32; bf16 in training, where the product
    of an int8 / nf4 level and a bf16 scale rounds by 2^-9, below the quantization's own error, and no fp32 copy
    of the layer is formed); anything else as it is (cast to `dtype`)."""
    if is_quantized(x):
        return _qwix().dequantize(x if dtype is None else x.astype(dtype))
    return x if dtype is None else x.astype(dtype)


def dequantize_layer(lp: Mapping[str, Any], dtype) -> Mapping[str, Any]:
    """One scanned layer's params with its quantized weights dequantized (in the compute dtype): called by the
    model inside the layer scan, right before the layer's matmuls. A layer without QArrays comes back unchanged."""
    if not any(is_quantized(v) for v in lp.values()):
        return lp
    return {k: dequantize(v, dtype) if is_quantized(v) else v for k, v in lp.items()}


def dequantize_tree(params: Any, dtype=None) -> Any:
    """Every QArray of a params tree dequantized (the export's merge; not for the training path)."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, params, is_leaf=is_quantized)


# ---------------------------------------------------------------------------------------------------------------
# Quantizing a stacked weight on the host, placing it on the mesh
# ---------------------------------------------------------------------------------------------------------------

def _chunks(shape: tuple[int, ...], axis: int) -> list[slice]:
    """Slices of `axis` (an output axis: scales never span it) holding at most CHUNK_ELEMENTS weights each."""
    per_unit = math.prod(shape) // shape[axis]
    step = max(1, CHUNK_ELEMENTS // max(per_unit, 1))
    return [slice(s, min(s + step, shape[axis])) for s in range(0, shape[axis], step)]


def quantize_stacked(value: np.ndarray, name: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """A stacked weight [L, in..., out...] (host) -> (quantized values [L, ...], scales [L, ...]) on the host,
    computed on the CPU backend one layer and one output-axis chunk at a time (bounded temporaries)."""
    cpu = jax.devices("cpu")[0]
    n_in = INPUT_DIMS.get(name, 1)
    q_out = s_out = None  # written in place: no second stacked copy on the host
    for i in range(value.shape[0]):
        for sl in _chunks(value.shape[1:], n_in):
            index = (slice(None),) * n_in + (sl,)
            with jax.default_device(cpu):
                qa = _quantize_jit(name, mode)(jnp.asarray(value[i][index]))
            q, s = np.asarray(qa.qvalue), np.asarray(qa.scale)
            if q_out is None:
                q_out = np.empty(value.shape, q.dtype)
                s_out = np.empty((value.shape[0], *scale_shape(name, value.shape, mode)[1:]), s.dtype)
            q_out[i][index] = q
            s_out[i][index] = s
    return q_out, s_out


_JITS: dict[tuple[str, str], Callable] = {}


def _quantize_jit(name: str, mode: str) -> Callable:
    key = (name, mode)
    if key not in _JITS:
        _JITS[key] = jax.jit(lambda w: quantize(w, name, mode))
    return _JITS[key]


def scale_sharding(weight_sharding: NamedSharding, weight_shape, scale_shape) -> NamedSharding:
    """The scales' sharding: the weight's, with every dim the scales reduce (size 1 or tiled) replicated."""
    spec = tuple(weight_sharding.spec) + (None,) * (len(weight_shape) - len(weight_sharding.spec))
    mesh = weight_sharding.mesh
    out = []
    for dim, (w, s, entry) in enumerate(zip(weight_shape, scale_shape, spec)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        split = math.prod(mesh.shape[a] for a in names)
        out.append(entry if (s == w and s % split == 0) else None)
    return NamedSharding(mesh, jax.sharding.PartitionSpec(*out))


def place_quantized(q: np.ndarray, s: np.ndarray, sharding: NamedSharding, mode: str):
    """Host (values, scales) -> a QArray whose values have the weight's sharding (and the scales theirs)."""
    qvalue = jax.make_array_from_callback(q.shape, sharding, lambda idx: q[idx])
    s_sh = scale_sharding(sharding, q.shape, s.shape)
    scale = jax.make_array_from_callback(s.shape, s_sh, lambda idx: s[idx])
    return _qwix().QArray(qvalue=qvalue, scale=scale, zero_point=None, qtype=_QTYPES[mode])


def host_quantizer(mode: str) -> Callable[[str, np.ndarray, NamedSharding], Any] | None:
    """The hook `hf_io.load_hf_params(place_layer_param=...)` calls with each stacked layer weight read from the
    safetensors: projections are quantized on the host and placed as QArrays, anything else placed as it is."""
    if not check_mode(mode):
        return None

    def place(name: str, value: np.ndarray, sharding: NamedSharding):
        if name not in PROJECTIONS:
            return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
        q, s = quantize_stacked(value, name, mode)
        return place_quantized(q, s, sharding, mode)
    return place


def quantize_params(params: Mapping[str, Any], mode: str) -> dict:
    """Params already on devices (a base initialised from a seed, or loaded whole) with their projections
    quantized (each fetched to the host, quantized there, placed back with its sharding; its dense copy dropped)."""
    from ssft_jax import mesh as mesh_lib

    if not check_mode(mode):
        return dict(params)
    layers = dict(params["layers"])
    for name in PROJECTIONS:
        w = layers.get(name)
        if w is None or is_quantized(w):
            continue
        q, s = quantize_stacked(mesh_lib.fetch(w), name, mode)
        layers[name] = place_quantized(q, s, w.sharding, mode)
    return {**params, "layers": layers}


def scale_shape(name: str, shape: tuple[int, ...], mode: str) -> tuple[int, ...]:
    """The scales' shape of a stacked weight [L, in..., out...] quantized with `mode`."""
    channelwise, tiled = axes_for(name, len(shape) - 1, shape[1:], mode)
    per_layer = tuple(d if a in channelwise else d // tiled[a] if a in tiled else 1 for a, d in enumerate(shape[1:]))
    return (shape[0], *per_layer)


def abstract_quantized(name: str, weight: jax.ShapeDtypeStruct, mode: str):
    """The QArray `host_quantizer` would place for a weight, as sharded ShapeDtypeStructs (the compile check)."""
    q = jax.ShapeDtypeStruct(weight.shape, jnp.int8 if mode == "int8" else jnp.uint4, sharding=weight.sharding)
    s_shape = scale_shape(name, weight.shape, mode)
    s = jax.ShapeDtypeStruct(s_shape, jnp.float32, sharding=scale_sharding(weight.sharding, weight.shape, s_shape))
    return _qwix().QArray(qvalue=q, scale=s, zero_point=None, qtype=_QTYPES[mode])


def layer_weight_bytes(name: str, shape: tuple[int, ...], mode: str) -> int:
    """Exact stored bytes of one stacked quantized weight [L, ...] (values + fp32 scales), nf4 packed."""
    channelwise, tiled = axes_for(name, len(shape) - 1, shape[1:], mode)
    per_scale = math.prod(shape[1:][a] for a in range(len(shape) - 1) if a not in channelwise and a not in tiled)
    per_scale *= math.prod(tiled.values()) if tiled else 1
    n = math.prod(shape)
    value_bytes = n if mode == "int8" else n // 2
    return value_bytes + (n // per_scale) * 4
