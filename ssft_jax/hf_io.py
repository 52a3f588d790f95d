"""HF checkpoint folders <-> our params, with strict key accounting.

A small key table maps each HF tensor name to (our parameter, layer index or None, transform). Loading stacks the
per-layer HF tensors along our leading 'layers' axis and places every parameter straight into its sharding on the
mesh (`jax.make_array_from_callback`, so on several hosts each host only touches the slices its devices hold).
Every HF tensor must be consumed exactly once and every parameter filled exactly once, with the expected shape;
anything else is an error that names the tensor.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any, Callable, Iterable

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ssft_jax import mesh as mesh_lib, tokenization
from ssft_jax.model import ModelConfig, Params, abstract_params

CONFIG_NAME = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# HF name (with {i} for the layer) -> (our name inside params['layers'] or top level, HF->ours, ours->HF).
# Our projections keep heads as an axis: [D, H, Dh] instead of HF's [H*Dh, D].
_Fn = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _in_proj(heads_attr: str) -> tuple[_Fn, _Fn]:
    def to_ours(w, c):  # [H*Dh, D] -> [D, H, Dh]
        return w.T.reshape(c.hidden_size, getattr(c, heads_attr), c.head_dim)

    def to_hf(w, c):
        return w.reshape(c.hidden_size, -1).T
    return to_ours, to_hf


def _bias(heads_attr: str) -> tuple[_Fn, _Fn]:
    return (lambda b, c: b.reshape(getattr(c, heads_attr), c.head_dim)), (lambda b, c: b.reshape(-1))


_T = ((lambda w, c: w.T), (lambda w, c: w.T))
_ID = ((lambda w, c: w), (lambda w, c: w))
_O = ((lambda w, c: w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size)),
      (lambda w, c: w.reshape(-1, c.hidden_size).T))

LAYER_KEYS: dict[str, tuple[str, tuple[_Fn, _Fn]]] = {
    "model.layers.{i}.input_layernorm.weight": ("attn_norm", _ID),
    "model.layers.{i}.self_attn.q_proj.weight": ("q_proj", _in_proj("num_attention_heads")),
    "model.layers.{i}.self_attn.k_proj.weight": ("k_proj", _in_proj("num_key_value_heads")),
    "model.layers.{i}.self_attn.v_proj.weight": ("v_proj", _in_proj("num_key_value_heads")),
    "model.layers.{i}.self_attn.o_proj.weight": ("o_proj", _O),
    "model.layers.{i}.self_attn.q_proj.bias": ("q_bias", _bias("num_attention_heads")),
    "model.layers.{i}.self_attn.k_proj.bias": ("k_bias", _bias("num_key_value_heads")),
    "model.layers.{i}.self_attn.v_proj.bias": ("v_bias", _bias("num_key_value_heads")),
    "model.layers.{i}.self_attn.q_norm.weight": ("q_norm", _ID),
    "model.layers.{i}.self_attn.k_norm.weight": ("k_norm", _ID),
    "model.layers.{i}.post_attention_layernorm.weight": ("mlp_norm", _ID),
    "model.layers.{i}.mlp.gate_proj.weight": ("gate_proj", _T),
    "model.layers.{i}.mlp.up_proj.weight": ("up_proj", _T),
    "model.layers.{i}.mlp.down_proj.weight": ("down_proj", _T),
}
TOP_KEYS: dict[str, tuple[str, tuple[_Fn, _Fn]]] = {
    "model.embed_tokens.weight": ("embedding", _ID),
    "model.norm.weight": ("final_norm", _ID),
    "lm_head.weight": ("lm_head", _T),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class CheckpointKeyError(ValueError):
    """An HF checkpoint does not match the model: a missing, unexpected or mis-shaped tensor."""


def load_hf_config(folder: str | os.PathLike, **overrides) -> ModelConfig:
    path = pathlib.Path(folder) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json in the HF folder")
    return ModelConfig.from_hf(json.loads(path.read_text()), **overrides)


def _readable_like_the_rest(path: pathlib.Path) -> None:
    """safetensors writes through a private temporary file (mode 0600); give the weights the mode every other file
    of the folder gets (0666 less the umask), so whoever may read the export may read its weights."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / SAFE_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(f"{folder}: shard(s) named in {SAFE_INDEX} are missing: {missing}")
        return [folder / f for f in files]
    if (folder / SAFE_SINGLE).exists():
        return [folder / SAFE_SINGLE]
    raise FileNotFoundError(f"{folder}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found")


def _route(name: str, cfg: ModelConfig) -> tuple[str, int | None, _Fn]:
    """Which parameter (and layer) an HF tensor fills; CheckpointKeyError if it fills none."""
    if name in TOP_KEYS:
        ours, (to_ours, _) = TOP_KEYS[name]
        if ours == "lm_head" and cfg.tie_word_embeddings:
            raise CheckpointKeyError(f"unexpected tensor {name!r}: config.json says tie_word_embeddings=true")
        return ours, None, to_ours
    m = _LAYER_RE.match(name)
    if m:
        key = f"model.layers.{{i}}.{m.group(2)}"
        layer = int(m.group(1))
        if key in LAYER_KEYS and layer < cfg.num_hidden_layers:
            ours, (to_ours, _) = LAYER_KEYS[key]
            return ours, layer, to_ours
    raise CheckpointKeyError(
        f"unexpected tensor {name!r} in checkpoint (no parameter of this {cfg.model_type} model takes it)"
    )


def load_hf_params(
    folder: str | os.PathLike,
    cfg: ModelConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    place_layer_param=None,
) -> tuple[ModelConfig, Params]:
    """Read an HF folder into params, each placed with its sharding on `mesh` (default: a 1-device mesh).

    Parameters are cast to cfg.param_dtype. Loading goes one parameter at a time, so host memory peaks at about
    one stacked parameter (plus what the devices hold), not the whole checkpoint. place_layer_param(name, stacked
    host value, sharding) places each per-layer parameter instead (QLoRA: `quant.host_quantizer` quantizes the
    projections on the host, so no dense copy of them ever reaches the devices).
    """
    folder = pathlib.Path(folder)
    cfg = cfg or load_hf_config(folder)
    mesh = mesh or mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shapes, axes = abstract_params(cfg)
    shardings = mesh_lib.tree_shardings(axes, shapes, mesh)

    # First pass: where is every tensor (file, name), routed to which parameter and layer.
    where: dict[str, list[tuple[int | None, pathlib.Path, str]]] = {}
    for path in _safetensors_files(folder):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                ours, layer, _ = _route(name, cfg)
                where.setdefault(ours, []).append((layer, path, name))

    params: Params = {"layers": {}}
    for group, targets in (("layers", shapes["layers"]), (None, {k: v for k, v in shapes.items() if k != "layers"})):
        for ours, spec in targets.items():
            found = where.pop(ours, [])
            hf_key = next((k for k, (o, _) in (LAYER_KEYS | TOP_KEYS).items() if o == ours), ours)
            value = _assemble(ours, group, spec, found, cfg, hf_key)
            sharding = shardings["layers"][ours] if group else shardings[ours]
            if group and place_layer_param is not None:
                array = place_layer_param(ours, value, sharding)
            else:
                array = jax.make_array_from_callback(spec.shape, sharding, lambda idx, v=value: v[idx])
            del value  # host memory: one stacked parameter at a time
            (params["layers"] if group else params)[ours] = array
    if where:  # tensors routed to a parameter this config does not have (e.g. biases on a bias-free model)
        extra = sorted(n for found in where.values() for _, _, n in found)
        raise CheckpointKeyError(f"unexpected tensor(s) in checkpoint: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return cfg, params


def _assemble(ours, group, spec, found, cfg, hf_key) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if group is None:
        if not found:
            raise CheckpointKeyError(f"missing tensor {hf_key!r} (parameter {ours!r})")
        if len(found) > 1:
            raise CheckpointKeyError(f"tensor for {ours!r} appears {len(found)} times: {[n for _, _, n in found]}")
        _, path, name = found[0]
        return _read(path, name, spec.shape, ours, cfg, dtype)
    by_layer = {layer: (path, name) for layer, path, name in found}
    if len(by_layer) != len(found):
        raise CheckpointKeyError(f"duplicate per-layer tensors for {ours!r}")
    missing = [hf_key.format(i=i) for i in range(cfg.num_hidden_layers) if i not in by_layer]
    if missing:
        raise CheckpointKeyError(
            f"missing tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} (parameter {ours!r})"
        )
    out = np.empty(spec.shape, dtype)
    for i in range(cfg.num_hidden_layers):
        out[i] = _read(*by_layer[i], spec.shape[1:], ours, cfg, dtype)
    return out


def _read(path, name, expected_shape, ours, cfg, dtype) -> np.ndarray:
    with safe_open(path, framework="numpy") as f:
        raw = f.get_tensor(name)
    _, _, to_ours = _route(name, cfg)
    try:
        value = to_ours(raw, cfg)
    except ValueError as e:
        raise CheckpointKeyError(
            f"tensor {name!r} in {path.name} has shape {raw.shape}, incompatible with {ours!r}: {e}"
        )
    if tuple(value.shape) != tuple(expected_shape):
        raise CheckpointKeyError(
            f"tensor {name!r} in {path.name} has shape {raw.shape}; parameter {ours!r} expects {tuple(expected_shape)} "
            f"after layout change (got {tuple(value.shape)})"
        )
    return np.asarray(value, dtype=dtype)


def to_hf_tensors(cfg: ModelConfig, params: Params, dtype: str | None = None) -> Iterable[tuple[str, np.ndarray]]:
    """(HF name, host array) for every parameter, in HF layout. Gathers sharded arrays one at a time."""
    def host(x):
        a = np.asarray(jax.device_get(x))
        return a.astype(np.dtype(dtype)) if dtype else a

    for hf_name, (ours, (_, to_hf)) in TOP_KEYS.items():
        if ours in params:
            yield hf_name, np.ascontiguousarray(to_hf(host(params[ours]), cfg))
    for ours, stacked in params["layers"].items():
        hf_name = next(k for k, (o, _) in LAYER_KEYS.items() if o == ours)
        to_hf = LAYER_KEYS[hf_name][1][1]
        value = host(stacked)
        for i in range(cfg.num_hidden_layers):
            yield hf_name.format(i=i), np.ascontiguousarray(to_hf(value[i], cfg))


def save_hf_folder(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    params: Params,
    *,
    tokenizer: Any = None,
    eos_token_ids: list[int] | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    generation_config: dict | None = None,
    tags: tokenization.ForkingTags | None = None,
    verify_tokenizer: bool = True,
) -> pathlib.Path:
    """Write an HF folder: safetensors (sharded with an index past `max_shard_bytes`), config.json,
    generation_config.json and, when given, the tokenizer files.

    The folder loads alike in transformers 5.x and 4.x (`ModelConfig.to_hf` writes both config layouts,
    `tokenization.save_tokenizer` the tokenizer). `tags` (default: special-mode tags if the tokenizer has `<think1>`,
    else text tags in its format) make the chat template take `forking_tag=k` (README, "Serving the export");
    `verify_tokenizer` loads the written folder back with `AutoTokenizer` and checks its ids against `tokenizer`.
    `eos_token_ids` should hold every id that ends an assistant turn (e.g. `<|im_end|>` and the tokenizer's eos), so
    an HF-compatible server stops there. Only process 0 writes; every process must call it (gathers are collective).
    """
    folder = pathlib.Path(folder)
    write = jax.process_index() == 0
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in to_hf_tensors(cfg, params, dtype):
        if size + value.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if not write:
        return folder
    metadata = {"format": "pt"}  # transformers refuses safetensors without it
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFE_SINGLE), metadata=metadata)
        _readable_like_the_rest(folder / SAFE_SINGLE)
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata=metadata)
            _readable_like_the_rest(folder / fname)
            weight_map.update({n: fname for n in shard})
            total += sum(v.nbytes for v in shard.values())
        (folder / SAFE_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    hf_cfg = cfg.to_hf()
    if dtype:
        hf_cfg["dtype"] = hf_cfg["torch_dtype"] = dtype
    eos = list(eos_token_ids or [])
    if not eos and cfg.eos_token_id is not None:
        eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, (list, tuple)) else [cfg.eos_token_id]
    if eos:
        hf_cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    (folder / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
           "pad_token_id": cfg.pad_token_id, **(generation_config or {})}
    (folder / "generation_config.json").write_text(
        json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2)
    )
    if tokenizer is not None:  # after config.json: its model_type decides the class transformers 5 loads
        tokenization.save_tokenizer(tokenizer, folder, tags=tags or infer_tags(tokenizer), verify=verify_tokenizer)
    logging.info("exported %s model to %s (%d shard(s))", cfg.model_type, folder, len(shards))
    return folder


def infer_tags(tokenizer, num_tags: int | None = None, tag_mode: str | None = None) -> tokenization.ForkingTags:
    """The forking tags an HF folder's tokenizer implies: special mode when it carries `<think1>`.. tokens (N = how
    many, unless `num_tags` says otherwise), else text tags with N = num_tags (default 6). Used for an export's chat
    template when the caller names no tags, and when a folder is loaded for generation."""
    if tag_mode in (None, "special"):
        n = 0
        while tokenization.token_id(tokenizer, tokenization.THINK_TOKEN_FORMAT.format(i=n + 1)) is not None:
            n += 1
        if n and tag_mode is None:
            tag_mode = "special"
        if tag_mode == "special":
            if not n and not num_tags:
                raise ValueError("tag_mode='special' but the tokenizer has no <think1> token")
            return tokenization.ForkingTags.for_tokenizer(tokenizer, num_tags or n, "special")
    return tokenization.ForkingTags.for_tokenizer(tokenizer, num_tags or 6, tag_mode or "text")


# ---------------------------------------------------------------------------------------------------------------
# A model named by its hub id, read from the local Hugging Face cache
# ---------------------------------------------------------------------------------------------------------------

_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class PretrainedNotFoundError(FileNotFoundError):
    """`model.hf_dir` names neither a local folder nor a model in the local Hugging Face cache."""


def resolve_pretrained(name_or_path: str, *, cache_dir: str | os.PathLike | None = None,
                       revision: str | None = None) -> pathlib.Path:
    """A local HF folder for `name_or_path`: an existing folder is returned as it is; a hub repo id ("org/name")
    is looked up in the local Hugging Face cache (`huggingface_hub.snapshot_download(local_files_only=True)`, which
    honours HF_HUB_CACHE / HF_HOME; `cache_dir` overrides them) and its snapshot folder returned. Never downloads:
    the runs here are offline, and a multi-host job must not fetch a checkpoint once per host.

    A path that cannot be a repo id (absolute, `./`, `~`, more than one `/`) comes back unchanged even when missing:
    the loader then names it, and the memory planner falls back to `model.preset` for a checkpoint staged elsewhere.
    A repo id found neither as a folder nor in the cache raises PretrainedNotFoundError (a FileNotFoundError) naming
    the id and the cache searched, with the command that fills it. ("smollm2" is resolved before this, by
    `assembly.resolve_hf_dir`.)
    """
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not _REPO_ID_RE.match(name) or name.count("/") > 1:
        return path
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else pathlib.Path(constants.HF_HUB_CACHE)
    try:
        found = huggingface_hub.snapshot_download(name, revision=revision, cache_dir=str(cache), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        raise PretrainedNotFoundError(
            f"{name!r} is not a local folder and not in the Hugging Face cache {cache} "
            f"(looked for {cache / ('models--' + name.replace('/', '--'))}, revision {revision or 'main'}): "
            f"download it first, e.g. `hf download {name}` (cache_dir={cache}), or point model.hf_dir at a folder "
            f"({type(e).__name__})") from None
    return pathlib.Path(found)
