"""Per-device memory plan of an SSFT training config (or a GFPO one: `gfpo_memory`): will it fit, on which TPU chip,
with how much headroom?

    python -m ssft_jax.memory_plan --config configs/qwen2p5_7b.py[:arg] [--config.a.b=v ...] [--compile]
        [--num_devices K] [--tag_len LT]

The plan is arithmetic over the config (nothing is allocated; the 32B plan takes a second). With `--compile`, when
the config's mesh fits the local devices (fake CPU devices via `XLA_FLAGS=--xla_force_host_platform_device_count=8`,
or a shrunk model), the real train step is also lowered and compiled on abstract inputs and XLA's
`memory_analysis()` is printed beside the estimate.

The inputs and every formula of the plan: docs/memory_plan.md. The compile check (`--compile`): `plan_check`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
import time
import types
from typing import Any, Mapping

import jax
import numpy as np

from ssft_jax import (
    assembly,
    cli as cli_lib,
    config as config_lib,
    cost_layouts,
    flops as flops_lib,
    gfpo_memory,
    lora as lora_lib,
    mesh as mesh_lib,
    model as model_lib,
    quant,
    tokenization,
)

GiB = 1024 ** 3

# HBM per chip (GiB). JAX sees one device per chip on all four (v4 and v5p are megacore: 2 TensorCores, 1 device).
CHIPS: dict[str, float] = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
TIGHT_HEADROOM = 0.10

# The config.json values of the Qwen2.5 Instruct models (Hugging Face Qwen/Qwen2.5-*-Instruct), for planning
# without the weights. `tokenizer_len`: len(tokenizer) (151643 BPE tokens + 22 special); `tag_len`: an upper bound
# of the ChatML text tag "<|im_start|><thinkK>\n" in tokens (exact once the folder, with its tokenizer, is here).
_QWEN25_COMMON = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                      max_position_embeddings=32768, rms_norm_eps=1e-06, rope_theta=1000000.0,
                      use_sliding_window=False, bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN25_COMMON, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN25_COMMON, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25_COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-32b": dict(_QWEN25_COMMON, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
PRESET_TOKENIZER = {name: dict(tokenizer_len=151665, tag_len=6) for name in PRESETS}


class PlanError(ValueError):
    """The plan cannot be made (no model description, bad accelerator name, ...); the message says why."""


def normalise_preset(name: str) -> str:
    key = name.strip().lower().removeprefix("qwen/").removesuffix("-instruct")
    if key not in PRESETS:
        raise PlanError(f"model.preset={name!r}: known presets are {sorted(PRESETS)}")
    return key


def accelerator_chips(accelerator: str) -> tuple[str, int]:
    """'v5p-32' -> ('v5p', 16). v4/v5p names count TensorCores (2 per chip), v5e ('v5litepod-16') / v6e chips."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator.strip().lower())
    if not m:
        raise PlanError(f"accelerator={accelerator!r}: expected e.g. v4-8, v5p-32, v5litepod-16, v6e-8")
    gen, n = m.group(1), int(m.group(2))
    gen = "v5e" if gen == "v5litepod" else gen
    return gen, (n // 2 if gen in ("v4", "v5p") else n)


# ---------------------------------------------------------------------------------------------------------------
# Model, tokenizer facts, mesh
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelFacts:
    cfg: Any  # model.ModelConfig
    tag_len: int
    source: str
    notes: list[str]


def resolve_model(config, tag_len: int | None = None) -> ModelFacts:
    """The ModelConfig the trainer would build for `config` (`assembly`), and the tag slot length Lt."""

    s = config.ssft
    notes: list[str] = []
    hf_dir = config.model.hf_dir
    try:
        hf_dir = assembly.resolve_hf_dir(hf_dir)
    except FileNotFoundError:  # not staged here (yet): plan from model.preset instead
        pass
    preset = config.model.preset
    tokenizer = None
    if hf_dir and (pathlib.Path(hf_dir) / "config.json").exists():
        cfg = assembly.base_model_config(config)
        source = f"{hf_dir}/config.json"
        tok_path = pathlib.Path(config.tokenizer or hf_dir)
        if (tok_path / "tokenizer_config.json").exists() or (tok_path / "tokenizer.json").exists():
            tokenizer = tokenization.load_tokenizer(tok_path)
    elif preset:
        key = normalise_preset(preset)
        cfg = assembly.base_model_config(config, hf_config=PRESETS[key])
        source = f"preset {key} (built-in config.json values" + (f"; {hf_dir} is not here)" if hf_dir else ")")
    elif not hf_dir:
        if not config.tokenizer:
            raise PlanError("model.hf_dir and tokenizer are both empty: nothing says the vocabulary size")
        tokenizer = assembly.build_tokenizer(config)
        cfg = assembly.base_model_config(config, tokenizer)
        source = f"from scratch (model.init, {config.tokenizer} tokenizer)"
    else:
        raise PlanError(f"model.hf_dir={hf_dir!r} has no config.json here and model.preset is empty: set "
                        f"--config.model.preset to one of {sorted(PRESETS)}")

    if tokenizer is not None:
        tags = assembly.build_tags(config, tokenizer)
        cfg = cfg.replace(vocab_size=assembly.vocab_for_tags(cfg, tokenizer, tags))
        lt = tags.max_tag_len(tokenizer)
        if tag_len is not None and tag_len != lt:
            notes.append(f"--tag_len={tag_len} overrides the tokenizer's Lt={lt}")
            lt = tag_len
    else:
        info = PRESET_TOKENIZER.get(normalise_preset(preset), {}) if preset else {}
        if s.tag_mode == "special":
            grown = info.get("tokenizer_len", cfg.vocab_size) + s.num_tags
            if grown > cfg.vocab_size:
                cfg = cfg.replace(vocab_size=grown)
            lt = 1
        else:
            lt = info.get("tag_len", 6)
        if tag_len is not None:
            lt = tag_len
        else:
            notes.append(f"Lt={lt} assumed (no tokenizer here; exact once model.hf_dir holds the folder, or --tag_len)")
    return ModelFacts(cfg, int(lt), source, notes)


def mesh_sizes(config, num_devices: int | None = None) -> tuple[dict[str, int], int, str]:
    """({'data', 'fsdp', 'tensor'} sizes, device count, where the count came from); validates the config."""

    m = config.mesh
    sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}
    if num_devices:
        n, why = int(num_devices), "--num_devices"
    elif m.num_devices:
        n, why = int(m.num_devices), "mesh.num_devices"
    elif config.accelerator:
        gen, n = accelerator_chips(config.accelerator)
        why = f"accelerator {config.accelerator} ({n} {gen} chips)"
    elif -1 not in sizes.values():
        n, why = math.prod(sizes.values()), "the mesh axes"
    else:
        n, why = jax.device_count(), "the local devices"
    config_lib.validate(config, n)
    known = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            sizes[k] = n // known
    return sizes, n, why


def mesh_stub(sizes: Mapping[str, int]):
    """What `mesh.logical_to_spec` reads of a Mesh (its axis sizes), without devices."""
    return types.SimpleNamespace(shape=dict(sizes))


def _split(n: int, parts: int) -> float:
    return n / parts if parts > 1 and n % parts == 0 else n


def local_bytes(shape, dtype, axes, sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of an array with these logical axes, sharded exactly as `mesh.logical_to_spec`."""

    spec = mesh_lib.logical_to_spec(axes, shape, mesh_stub(sizes))
    n = 1
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        split = math.prod(sizes[a] for a in names)
        assert dim % split == 0, (shape, spec)
        n *= dim // split
    return n * np.dtype(dtype).itemsize


def parameter_bytes(cfg, sizes: Mapping[str, int], base_quant: str = "") -> dict[str, Any]:
    """Exact parameter count, global bytes and per-device bytes (total, per top-level group, one layer).
    base_quant (QLoRA): the projections as `quant` stores them (values + fp32 scales, nf4 two per byte)."""


    shapes, axes = model_lib.abstract_params(cfg)
    flat_s = jax.tree_util.tree_leaves_with_path(shapes)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    count = glob = local = layer_local_unsharded_fsdp = 0
    for path, s in flat_s:
        ax = flat_a[path]
        count += math.prod(s.shape)
        name = getattr(path[-1], "key", None)
        if base_quant and "layers" in jax.tree_util.keystr(path) and name in quant.PROJECTIONS:
            values = local_bytes(s.shape, np.int8, ax, sizes) // (2 if base_quant == "nf4" else 1)
            s_shape = quant.scale_shape(name, s.shape, base_quant)
            s_axes = tuple(a if w == d else None for a, w, d in zip(ax, s.shape, s_shape))
            local += values + local_bytes(s_shape, np.float32, s_axes, sizes)
            glob += quant.layer_weight_bytes(name, s.shape, base_quant)
        else:
            glob += math.prod(s.shape) * np.dtype(s.dtype).itemsize
            local += local_bytes(s.shape, s.dtype, ax, sizes)
        if "layers" in jax.tree_util.keystr(path):
            # One layer's weights as they are used: FSDP-gathered (fsdp=1), still split over tensor, in elements.
            layer_local_unsharded_fsdp += local_bytes(s.shape, s.dtype, ax, {**sizes, "fsdp": 1, "data": 1}) \
                // np.dtype(s.dtype).itemsize // cfg.num_hidden_layers
    return dict(count=count, global_bytes=glob, local_bytes=local, layer_elems_gathered=layer_local_unsharded_fsdp)


def lora_bytes(cfg, spec, sizes: Mapping[str, int]) -> dict[str, int]:
    """Count and per-device bytes of the trainable LoRA pytree (`lora.trainable_shapes`), sharded as the mesh
    rules shard it."""


    shapes, axes = lora_lib.trainable_shapes(cfg, spec)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    count = local = 0
    for path, x in jax.tree_util.tree_leaves_with_path(shapes):
        count += math.prod(x.shape)
        local += local_bytes(x.shape, x.dtype, flat_a[path], sizes)
    return dict(count=count, local_bytes=local)


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    config_name: str
    model_source: str
    cfg: Any
    sizes: dict[str, int]
    num_devices: int
    devices_from: str
    dims: dict[str, Any]
    params: dict[str, Any]
    rows: list[tuple[str, float, str]]  # (item, bytes per device, how)
    cost_pass: dict[str, float]
    train_pass: dict[str, float]
    notes: list[str]
    accelerator: str = ""

    @property
    def activation_peak(self) -> float:
        return max(self.cost_pass["total"], self.train_pass["total"])

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.rows) + self.activation_peak

    @property
    def arguments(self) -> float:
        return sum(b for name, b, _ in self.rows
                   if name in ("parameters", "adapters (trainable)", "optimizer state", "batch (inputs)"))

    @property
    def temporaries(self) -> float:
        return self.total - self.arguments


def _chunked(chunk: int, n: int) -> bool:
    """Mirrors `model._attention`: rows longer than the block are processed in query blocks (padded up to a
    multiple of the block)."""
    return bool(chunk) and n > chunk


@dataclasses.dataclass
class CostLayoutChoice:
    """`ssft.cost_layout="auto"` decided: the layout, and per layout its step FLOPs as a multiple of the SFT step's
    (`flops.step_flops`), its planned bytes per device (`make_plan`) and whether that fits."""
    layout: str
    flops_ratio: dict[str, float]
    bytes_per_device: dict[str, float]
    fits: dict[str, bool]
    limit_bytes: float | None

    def describe(self) -> str:
        limit = f"{self.limit_bytes / GiB:.1f} GiB" if self.limit_bytes else "no device memory limit known"
        parts = [f"{k}: {self.flops_ratio[k]:.3f}x SFT FLOPs, {self.bytes_per_device[k] / GiB:.2f} GiB/device"
                 + ("" if self.fits[k] else " (does not fit)") for k in self.flops_ratio]
        return f"cost_layout auto -> {self.layout} ({'; '.join(parts)}; {limit})"


def choose_cost_layout(config, *, num_devices: int | None = None, tag_len: int | None = None,
                       limit_bytes: float | None = None) -> CostLayoutChoice:
    """The cost layout with the fewest step FLOPs whose planned memory per device fits `limit_bytes` (None: the
    config's accelerator chip, else no limit: the CPU). When none fits, the smaller one (training then fails on
    memory, as it would have anyway). Same counts as `make_plan` and `flops.step_flops`."""

    if limit_bytes is None and config.accelerator:
        limit_bytes = CHIPS[accelerator_chips(config.accelerator)[0]] * GiB
    ratio, mem = {}, {}
    for name in cost_layouts.names():
        c = config.copy_and_resolve_references()
        c.ssft.cost_layout = name
        plan = make_plan(c, num_devices=num_devices, tag_len=tag_len)
        layout = assembly.build_layout(c, plan.dims["Lt"], num_processes=1)
        f = flops_lib.step_flops(plan.cfg, layout, c.batch_size, needs_costs=True, cost_layout=name)
        sft = flops_lib.step_flops(plan.cfg, layout, c.batch_size, needs_costs=False)
        ratio[name], mem[name] = f.model / sft.model, plan.total
    fits = {k: limit_bytes is None or v <= limit_bytes for k, v in mem.items()}
    fitting = [k for k in ratio if fits[k]]
    best = min(fitting, key=lambda k: ratio[k]) if fitting else min(mem, key=mem.get)
    return CostLayoutChoice(best, ratio, mem, fits, limit_bytes)


def device_memory_limit(mesh=None) -> float | None:
    """Bytes one device of `mesh` (default: the first device) can hold, where the backend says (GPU, TPU); None
    on the CPU (host memory: no planned limit)."""

    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory statistics raise assorted errors)
        stats = {}
    return float(stats["bytes_limit"]) if "bytes_limit" in stats else None


_COST_LAYOUT_CHOICES: dict[tuple, str] = {}  # resolve_cost_layout's decisions: one per config and device


def resolve_cost_layout(config, tag_len: int, mesh=None) -> str:
    """`ssft.cost_layout`, with "auto" decided by `choose_cost_layout` (fewest step FLOPs among the layouts whose
    planned memory fits this device) and logged with its figures once per config and device. Deterministic in both,
    so every use in a run (its step, throughput figures, the evaluation of its costs) agrees."""
    name = config.ssft.cost_layout
    if name != "auto":
        return name
    n, limit = (mesh.size if mesh is not None else None), device_memory_limit(mesh)
    key = (json.dumps(config.to_dict(), sort_keys=True, default=str), tag_len, n, limit)
    if key not in _COST_LAYOUT_CHOICES:
        try:
            choice = choose_cost_layout(config, num_devices=n, tag_len=tag_len, limit_bytes=limit)
            _COST_LAYOUT_CHOICES[key] = choice.layout
            logging.info("%s", choice.describe())
        except PlanError as e:  # the planner cannot describe this model: the reference layout
            _COST_LAYOUT_CHOICES[key] = "packed"
            logging.warning("cost_layout auto -> packed: the memory planner cannot plan this config (%s)", e)
    return _COST_LAYOUT_CHOICES[key]


def with_resolved_cost_layout(config, layout, mesh=None):
    """`config` itself when its cost layout is explicit, else a copy with "auto" decided (`resolve_cost_layout`):
    what the trainer hands to `assembly.make_step` and the throughput figures."""
    if config.ssft.cost_layout != "auto":
        return config
    resolved = config.copy_and_resolve_references()
    resolved.ssft.cost_layout = resolve_cost_layout(config, layout.tag_len, mesh)
    return resolved


def make_plan(config, *, num_devices: int | None = None, tag_len: int | None = None, config_name: str = "") -> Plan:
    if config.ssft.cost_layout == "auto":  # plan the layout the trainer would choose
        choice = choose_cost_layout(config, num_devices=num_devices, tag_len=tag_len)
        config = config.copy_and_resolve_references()
        config.ssft.cost_layout = choice.layout
    facts = resolve_model(config, tag_len)
    cfg = facts.cfg
    sizes, n_dev, why = mesh_sizes(config, num_devices)
    s, d = config.ssft, config.data
    N, M, L = s.num_tags, s.max_traces, s.cost_prefix_len
    P, T, Lt = d.max_prompt_len, d.max_trace_len, facts.tag_len
    Le = min(L, T)
    R = P + N * M * (Lt + Le)
    S = P + Lt + T
    dp = sizes["data"] * sizes["fsdp"]
    t = sizes["tensor"]
    mb = config.micro_batches
    b = config.batch_size // (mb * dp)
    a = np.dtype(cfg.dtype).itemsize
    w = np.dtype(cfg.param_dtype).itemsize
    D, F, H, K, Dh, V, nl = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                             cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.num_hidden_layers)
    Ht, Kt, Ft, Vt = _split(H, t), _split(K, t), _split(F, t), _split(V, t)
    chunk, lchunk = cfg.attention_chunk, config.model.logprob_chunk
    notes = list(facts.notes)
    for name, full, part in (("query heads", H, Ht), ("KV heads", K, Kt), ("MLP width", F, Ft), ("vocab", V, Vt)):
        if t > 1 and part == full:
            notes.append(f"{name} ({full}) not divisible by tensor={t}: replicated")

    lora_spec = lora_lib.spec_for_plan(config, cfg)
    quantized = lora_spec.base_quant if lora_spec is not None else ""
    if lora_spec is not None:  # the frozen base is held (and planned) in lora.base_dtype
        cfg = cfg.replace(param_dtype=lora_spec.base_dtype)
        w = np.dtype(cfg.param_dtype).itemsize
    params = parameter_bytes(cfg, sizes, quantized)
    pb = params["local_bytes"]
    # Per token of a row: attention-phase and MLP-phase intermediates of one layer, what one layer's backward keeps.
    attn_tok = (Ht + 2 * Kt) * Dh * a + (Ht + Kt) * Dh * 4 + Ht * Dh * a
    mlp_tok = 3 * Ft * a
    stored_tok = (3 * D + (Ht + 2 * Kt) * Dh + Ht * Dh + 2 * Ft) * a

    def q_len(n):
        return chunk if _chunked(chunk, n) else n

    def scores(r, n, fp32_copies):
        return r * Ht * q_len(n) * n * (4 * fp32_copies + a) + r * q_len(n) * n

    def head(r, n, copies):
        # lchunk 0: logprobs.token_logprobs' auto rule (one chunk when the logits fit in 64 MiB, else 1024)
        c = lchunk if lchunk > 0 else (r * n if r * n * V * 4 <= 64 << 20 else 1024)
        return min(c, r * n) * Vt * 4 * copies + r * n * D * a

    for label, n in (("cost row", R), ("train row", S)):
        if not _chunked(chunk, n) and n >= 8192:
            notes.append(f"{label} of {n} tokens with dense attention: [{n}, {n}] scores per head (set "
                         f"model.attention_chunk)")

    # (a) the cost pass: no-grad forward, one layer live at a time; the layout's own rule (`cost_layouts`).
    terms = cost_layouts.CostPassTerms(b=b, N=N, M=M, P=P, W=Lt + Le, R=R, layers=nl, hidden=D, q_heads=Ht,
                                       kv_heads=Kt, head_dim=Dh, act_bytes=a, attn_per_token=attn_tok,
                                       mlp_per_token=mlp_tok, scores=scores, head=head, q_len=q_len)
    cost = dict(cost_layouts.get(s.cost_layout).memory(terms))
    cost["total"] = sum(cost.values())
    # (b) the train rows: forward + backward, one layer's backward live at a time. Packed (data.packed): the
    # device's share of the micro-batch's pack_rows rows of pack_len slots instead of b*M rows of S.
    r = b * M
    if d.packed:
        r, S = d.pack_rows // (mb * dp), d.pack_len or S
    remat = cfg.remat
    carry = nl * r * S * D * a + r * S * D * a  # every layer's input (the scan's saved carry) + the final hidden
    bwd_attn = r * S * (Ht + 2 * Kt) * Dh * a + scores(r, S, 3)
    bwd_mlp = r * S * (mlp_tok + D * (a + 4))
    stored = r * S * stored_tok
    if remat == "full":
        saved = carry
    elif remat == "none":
        # Every layer keeps its intermediates, plus the elementwise ones (silu, fp32 norms and RoPE) and, when the
        # attention is chunked, each query block's residual k/v.
        blocks = math.ceil(S / chunk) if _chunked(chunk, S) else 0
        none_tok = stored_tok + 2 * Ft * 4 + 2 * D * 4 + (Ht + Kt) * Dh * 4 + blocks * 2 * Kt * Dh * a
        saved = carry + nl * (r * S * none_tok + (0 if _chunked(chunk, S) else scores(r, S, 2)))
        stored = 0  # already counted in every layer's saved intermediates
    elif remat in ("dots", "dots_no_batch"):
        per_tok = (Ht + 2 * Kt) * Dh + 2 * D + 2 * Ft + (Ht * Dh if remat == "dots" else 0)
        saved = carry + nl * r * S * per_tok * a
        if remat == "dots" and not _chunked(chunk, S):
            saved += nl * r * Ht * S * S * 4
    else:  # pragma: no cover - validate refuses
        raise PlanError(f"remat={remat!r}")
    train = {"saved for backward": saved, "one layer recomputed (stored)": stored,
             f"layer backward peak ({'attention' if bwd_attn >= bwd_mlp else 'MLP'} phase)": max(bwd_attn, bwd_mlp),
             "residual cotangent": r * S * D * (a + 4), "head (log-softmax chunk, bwd)": head(r, S, 3)}
    train["total"] = sum(train.values())

    layer = params["layer_elems_gathered"]
    gathered = 2 * layer * a + layer * w + Vt * D * a
    batch_in = mb * (b * 7 * R + 4 * r * S) * 4 + mb * b * (N + 6 * M)
    fill = 5 * r * S * 4
    if lora_spec is None:
        rows = [
            ("parameters", pb, f"exact per-device shards of {_count(params['count'])} params x {w} B"),
            ("optimizer state", 2 * pb, "AdamW mu + nu, sharded like the parameters"),
            ("gradients", 2 * pb, "accumulated + current micro-batch, sharded like the parameters"),
            ("optimizer update", pb, "the `updates` tree"),
            ("gathered weights", gathered, "FSDP all-gather: 2 layers (compute dtype) + 1 layer's grads + output head"),
        ]
    else:
        ad = lora_bytes(cfg, lora_spec, sizes)
        tables = 1 if cfg.tie_word_embeddings else 2
        table = local_bytes((V, D), cfg.param_dtype, ("vocab", "embed"), sizes)
        copies = 2 * tables * table if lora_spec.tag_token_ids else 0
        params["lora_count"] = ad["count"]
        what = (f"{_count(params['count'])} params: projections {quantized} + fp32 scales, the rest x {w} B "
                f"({cfg.param_dtype})" if quantized else f"{_count(params['count'])} params x {w} B ({cfg.param_dtype}")
        rows = [
            ("parameters", pb, f"frozen base: exact per-device shards of {what}, no gradients or optimizer state)"),
            ("adapters (trainable)", ad["local_bytes"],
             f"LoRA r={lora_spec.rank} on {len(lora_spec.targets)} projections + {len(lora_spec.tag_token_ids)} tag "
             f"rows: {_count(ad['count'])} params x 4 B"),
            ("optimizer state", 2 * ad["local_bytes"], "AdamW mu + nu of the adapters only"),
            ("gradients", 2 * ad["local_bytes"], "accumulated + current micro-batch, adapters only"),
            ("optimizer update", ad["local_bytes"], "the `updates` tree (adapters)"),
            ("tag-row table copies", copies, f"{tables} [V, D] table(s) with the tag rows written in + cotangent"),
            # No copy at all when nothing is gathered or dequantized and the base is already in the compute dtype;
            # QLoRA alone dequantizes the layers, not the (unquantized) head.
            ("gathered weights", 2 * layer * a * bool(sizes["fsdp"] > 1 or cfg.param_dtype != cfg.dtype or quantized)
             + Vt * D * a * bool(sizes["fsdp"] > 1 or cfg.param_dtype != cfg.dtype),
             "FSDP all-gather / cast / dequantize: 2 base layers (compute dtype) + output head; no base gradients"),
        ]
    rows += [
        ("batch (inputs)", batch_in, f"{mb} micro-batch(es) x {b} question(s): cost + train rows, int32"),
        ("fill_tags rows", fill, "one micro-batch's rebuilt train rows"),
    ]
    if quantized:
        notes.append(f"QLoRA: the {quantized} projections are dequantized one layer at a time inside the scan, "
                     "counted with the gathered layers")
    dims = dict(N=N, M=M, L=L, Le=Le, P=P, T=T, Lt=Lt, R=R, S=S, b=b, micro_batches=mb, dp=dp,
                cost_layout=s.cost_layout, packed=bool(d.packed), train_rows=r,
                batch_size=config.batch_size, remat=remat, attention_chunk=chunk, logprob_chunk=lchunk,
                lora=(f"r={lora_spec.rank} alpha={lora_spec.alpha:g} base {lora_spec.base_dtype}"
                      + (f", projections {quantized}" if quantized else "") if lora_spec is not None else ""),
                cost_attention="chunked" if _chunked(chunk, R) else "dense",
                train_attention="chunked" if _chunked(chunk, S) else "dense",
                dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    return Plan(config_name, facts.source, cfg, sizes, n_dev, why, dims, params, rows, cost, train, notes,
                accelerator=config.accelerator)


def make_gfpo_plan(config, *, num_devices: int | None = None, tag_len: int | None = None,
                   config_name: str = "") -> Plan:
    """The plan of a stage="gfpo" config: the resident weights and optimizer of what GFPO trains (all weights, or a
    LoRA run's adapters beside its frozen base), plus the larger of its two alternating phases, the rollouts and the
    update (`gfpo_memory`, which says what each counts)."""
    if config.get("stage", "ssft") != "gfpo":
        raise PlanError("make_gfpo_plan plans stage='gfpo' configs (make_plan plans SSFT)")
    facts = resolve_model(config, tag_len)
    cfg = facts.cfg
    sizes, n_dev, why = mesh_sizes(config, num_devices)
    shape = gfpo_memory.shape(config, sizes, facts.tag_len)
    a = np.dtype(cfg.dtype).itemsize
    notes = list(facts.notes) + [
        "rollouts and the update alternate: the peak is the resident part plus the larger phase",
        "KV cache rows assumed split over the data axes and KV heads over tensor (as GSPMD places them from the "
        "inputs); the sampler keeps the whole vocabulary's logits per row"]
    lora_spec = lora_lib.spec_for_plan(config, cfg)
    if lora_spec is not None:
        cfg = cfg.replace(param_dtype=lora_spec.base_dtype)
    w = np.dtype(cfg.param_dtype).itemsize
    params = parameter_bytes(cfg, sizes, lora_spec.base_quant if lora_spec is not None else "")
    pb, layer = params["local_bytes"], params["layer_elems_gathered"]
    moved = sizes["fsdp"] > 1 or cfg.param_dtype != cfg.dtype  # gathered or cast; QLoRA also dequantizes layers
    quantized = bool(lora_spec is not None and lora_spec.base_quant)
    gathered = (2 * layer * a * (moved or quantized)
                + _split(cfg.vocab_size, sizes["tensor"]) * cfg.hidden_size * a * moved)
    if lora_spec is None:
        trained = pb
        rows = [("parameters", pb, f"exact per-device shards of {_count(params['count'])} params x {w} B")]
    else:
        ad = lora_bytes(cfg, lora_spec, sizes)
        params["lora_count"], trained = ad["count"], ad["local_bytes"]
        stored = f"projections {lora_spec.base_quant} + fp32 scales, the rest x {w} B" if quantized else f"x {w} B"
        rows = [("parameters", pb, f"frozen base: {_count(params['count'])} params, {stored} ({cfg.param_dtype})"),
                ("adapters (trainable)", trained, f"LoRA r={lora_spec.rank}: {_count(ad['count'])} params x 4 B")]
    rows += [
        ("optimizer state", 2 * trained, "AdamW mu + nu of what GFPO trains"),
        ("gradients", trained, "one update's gradients (updates_per_batch epochs run one after another)"),
        ("optimizer update", trained, "the `updates` tree"),
        ("gathered weights", gathered, "FSDP all-gather / cast: 2 layers (compute dtype) + output head"),
        ("batch (inputs)", gfpo_memory.batch_bytes(shape, config.ssft.num_tags),
         f"{shape.questions} questions: policy rows, logp_old/ref, tags, rewards"),
    ]
    d = config.data
    r = math.ceil(shape.questions / shape.dp)
    dims = dict(N=config.ssft.num_tags, M=config.ssft.max_traces, L=config.ssft.cost_prefix_len, Le=0,
                P=d.max_prompt_len, T=shape.max_new, Lt=facts.tag_len, R=shape.cache_len, S=shape.update_width, b=r,
                micro_batches=1, dp=shape.dp, cost_layout="-", packed=False, train_rows=r,
                batch_size=shape.questions, remat=cfg.remat, attention_chunk=cfg.attention_chunk,
                logprob_chunk=config.model.logprob_chunk,
                lora=(f"r={lora_spec.rank} alpha={lora_spec.alpha:g} base {lora_spec.base_dtype}"
                      if lora_spec is not None else ""),
                cost_attention="dense", train_attention="dense", dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                **shape.dims(config.gfpo.estimator))
    rollout = gfpo_memory.rollout_bytes(cfg, shape, sizes)
    if config.gfpo.rollout_weights == "replicated":  # a per-step copy, split over tensor only, matrices in `dtype`
        whole = {**sizes, "data": 1, "fsdp": 1}
        copy = parameter_bytes(cfg.replace(param_dtype=cfg.dtype), whole, lora_spec.base_quant if quantized else "")
        rollout["decoding copy of the weights (replicated)"] = copy["local_bytes"] + (
            lora_bytes(cfg, lora_spec, whole)["local_bytes"] if lora_spec is not None else 0)
        rollout["total"] = sum(v for k, v in rollout.items() if k != "total")
    return Plan(config_name, facts.source, cfg, sizes, n_dev, why, dims, params, rows, rollout,
                gfpo_memory.update_bytes(cfg, shape, sizes), notes, accelerator=config.accelerator)


# ---------------------------------------------------------------------------------------------------------------
# Verdicts and the table
# ---------------------------------------------------------------------------------------------------------------

def verdict(total_bytes: float, chip: str) -> str:
    hbm = CHIPS[chip]
    need = total_bytes / GiB
    if need > hbm:
        return f"does not fit on {chip} (HBM {hbm:g} GiB): needs {need:.1f} GiB per chip, {need - hbm:.1f} GiB over"
    head = hbm - need
    tight = " (tight: under 10% headroom)" if head < TIGHT_HEADROOM * hbm else ""
    return f"fits on {chip} (HBM {hbm:g} GiB) with {head:.{1 if head >= 1 else 3}f} GiB headroom{tight}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def format_plan(plan: Plan, xla: Mapping[str, float] | None = None, xla_notes: list[str] = ()) -> str:
    c, d, sz = plan.cfg, plan.dims, plan.sizes
    unit_name, unit = ("GiB", GiB) if plan.total >= GiB else ("MiB", 1024 ** 2)

    def gib(x: float) -> str:
        return f"{x / unit:9.3f}"

    out = []
    out.append(f"memory plan: {plan.config_name or 'config'}")
    if d.get("lora"):
        out.append(f"LoRA: {d['lora']}, {_count(plan.params['lora_count'])} trainable parameters")
    out.append(f"model: {c.model_type}, {_count(plan.params['count'])} parameters ({plan.model_source}); "
               f"D={c.hidden_size} F={c.intermediate_size} layers={c.num_hidden_layers} heads={c.num_attention_heads}"
               f"/{c.num_key_value_heads} x {c.head_dim} vocab={c.vocab_size} tied={c.tie_word_embeddings}")
    out.append(f"mesh: data={sz['data']} fsdp={sz['fsdp']} tensor={sz['tensor']} = {plan.num_devices} devices "
               f"(count from {plan.devices_from})")
    gfpo = d.get("stage") == "gfpo"
    if gfpo:
        out += gfpo_memory.describe_dims(d)
    else:
        out.append(f"batch {d['batch_size']} questions / {d['micro_batches']} micro-batch(es) / dp {d['dp']} = "
                   f"{d['b']} per device per micro-batch; N={d['N']} M={d['M']} L={d['L']} P={d['P']} T={d['T']} "
                   f"Lt={d['Lt']}")
        train_rows = (f"train {d['train_rows']} packed rows of S' = {d['S']} per device per micro-batch"
                      if d.get("packed") else f"train S = P + Lt + T = {d['S']} tokens x M")
        out.append(f"rows: cost R = P + N*M*(Lt+Le) = {d['R']} tokens ({d['cost_attention']} attention); "
                   f"{train_rows} ({d['train_attention']} attention); remat={d['remat']}, "
                   f"attention_chunk={d['attention_chunk']}, logprob_chunk={d['logprob_chunk']}, compute "
                   f"{d['dtype']}, params {d['param_dtype']}")
    for n in plan.notes:
        out.append(f"note: {n}")
    out.append("")
    out.append(f"{'per device':<44}{unit_name:>9}  how")
    out.append("-" * 100)
    for name, b, how in plan.rows:
        out.append(f"{name:<44}{gib(b)}  {how}")
    peak_is_cost = plan.cost_pass["total"] >= plan.train_pass["total"]
    titles = (("(a) rollouts, no grad", f"(b) update fwd+bwd, remat={d['remat']}") if gfpo else
              ("(a) cost pass, no grad", f"(b) train fwd+bwd, remat={d['remat']}"))
    for title, part, is_peak in ((titles[0], plan.cost_pass, peak_is_cost),
                                 (titles[1], plan.train_pass, not peak_is_cost)):
        out.append(f"{title + (' [peak]' if is_peak else ''):<44}{gib(part['total'])}")
        for k, v in part.items():
            if k != "total":
                out.append(f"    {k:<40}{gib(v)}")
    out.append("-" * 100)
    out.append(f"{'activations (max of a, b)':<44}{gib(plan.activation_peak)}")
    out.append(f"{'TOTAL per device (estimate)':<44}{gib(plan.total)}   "
               f"= arguments {plan.arguments / unit:.3f} + temporaries {plan.temporaries / unit:.3f}")
    if xla:
        out.append("")
        out.append(f"XLA memory_analysis() of the compiled train step, per device ({unit_name}):")
        out.append(f"    {'':<24}{'XLA':>10}{'estimate':>10}{'ratio':>8}")
        for k, est in (("argument", plan.arguments), ("temp", plan.temporaries), ("peak", plan.total)):
            v = xla.get(k)
            if v is None:
                continue
            out.append(f"    {k:<24}{v / unit:10.4f}{est / unit:10.4f}{(est / v if v else float('nan')):8.2f}")
        for k in ("output", "alias", "generated_code", "peak_reported"):
            if xla.get(k) is not None:
                out.append(f"    {k:<24}{xla[k] / unit:10.4f}")
        out.append("    (peak = argument + output - alias + temp; the CPU backend upcasts bf16 matmuls and saved "
                   "activations to fp32, so its temp overstates a TPU's)")
    for n in xla_notes:
        out.append(f"note (compiled): {n}")
    out.append("")
    for chip in CHIPS:
        out.append(f"  {chip:<5} {verdict(plan.total, chip)}")
    main_chip = accelerator_chips(plan.accelerator)[0] if plan.accelerator else None
    if main_chip:
        where = (plan.accelerator if accelerator_chips(plan.accelerator)[1] == plan.num_devices
                 else f"{plan.num_devices} {main_chip} chips, not the config's {plan.accelerator}")
        out.append(f"VERDICT ({where}): {verdict(plan.total, main_chip)}")
    else:
        fits = [ch for ch in sorted(CHIPS, key=CHIPS.get) if plan.total <= CHIPS[ch] * GiB]
        out.append(f"VERDICT: {verdict(plan.total, fits[0])}" if fits else
                   f"VERDICT: does not fit on any of {', '.join(CHIPS)} ({plan.total / GiB:.1f} GiB per chip needed)")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def main(argv):
    del argv

    from absl import flags
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    config = FLAGS.config
    config_name = config_flags.get_config_filename(FLAGS["config"])
    planner = make_plan
    if config.get("stage", "ssft") == "gfpo":
        planner = make_gfpo_plan
        if FLAGS.compile:
            raise PlanError("--compile lowers the SSFT train step; a GFPO config's plan is the estimate alone")
    plan = planner(config, num_devices=FLAGS.num_devices or None, tag_len=FLAGS.tag_len, config_name=config_name)
    xla, xla_notes = None, []
    if FLAGS.compile:
        from ssft_jax import plan_check  # it builds on this module: imported where --compile asks for it
        t0 = time.perf_counter()
        compiled, state = plan_check.compile_for_plan(config, plan)
        xla = plan_check.memory_figures(compiled)
        xla_notes = plan_check.compile_notes(plan, xla, state)
        print(f"compiled the train step in {time.perf_counter() - t0:.1f}s")
        if xla is None:
            print("memory_analysis() is not reported by this backend")
    print(format_plan(plan, xla, xla_notes))
    if FLAGS.json:
        pathlib.Path(FLAGS.json).write_text(json.dumps(
            {"total_bytes": plan.total, "arguments": plan.arguments, "temporaries": plan.temporaries,
             "rows": plan.rows, "cost_pass": plan.cost_pass, "train_pass": plan.train_pass, "dims": plan.dims,
             "sizes": plan.sizes, "param_count": plan.params["count"], "xla": xla}, indent=2, default=str))


def cli() -> None:
    """`ssft-plan` / `python -m ssft_jax.memory_plan` (absl flags, like the trainer; formulas: the module doc)."""
    from absl import flags
    from ml_collections import config_flags


    config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally with :arg", lock_config=True)
    flags.DEFINE_bool("compile", False, "also lower+compile the real train step and print XLA's memory_analysis()")
    flags.DEFINE_integer("num_devices", 0, "devices of the slice (default: mesh.num_devices, the config's "
                         "accelerator, or the local devices)")
    flags.DEFINE_integer("tag_len", None, "Lt, the tag slot length in tokens (default: from the tokenizer)")
    flags.DEFINE_string("json", "", "also write the plan as JSON here")
    flags.DEFINE_bool("debug", False, "show the traceback of a config or plan error")
    flags.mark_flags_as_required(["config"])
    cli_lib.absl_run(main, extra=(PlanError,))


if __name__ == "__main__":
    cli()
