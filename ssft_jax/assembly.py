"""One assembly: config -> tokenizer -> forking tags -> ModelConfig -> LayoutConfig -> params / train state -> step.

Every consumer builds its pieces here, so they cannot drift apart: the trainer (`train.run`), loading a run or an
HF folder for generation (`load_for_generation`), the memory planner (`memory_plan`, abstract shapes only) and the
benchmarks (`bench/`). The order matters and is fixed here once: the base model is built (loaded or initialised)
with the tokenizer's own vocabulary, then special-token tags are added to the tokenizer and the embedding grows to
fit them (new rows = the mean embedding), so a checkpoint's shapes are a function of the config alone.

    pieces = assembly.build(config, mesh=m)                       # tokenizer, tags, model config, params, layout
    pieces = assembly.build(config, mesh=m, params="abstract")    # the same, params as sharded ShapeDtypeStructs
    lm = assembly.load_for_generation(workdir="runs/ssft")        # a training run (checkpoint) or an HF folder
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import Any, Literal, Mapping, NamedTuple

import jax
import numpy as np

from ssft_jax import (
    config as config_lib,
    data as data_lib,
    datasets,
    hf_io,
    lora as lora_lib,
    losses,
    mesh as mesh_lib,
    model as model_lib,
    quant,
    tokenization,
    train_state,
    train_step as step_lib,
)
from ssft_jax.model import ModelConfig, Params

ParamsMode = Literal["load", "abstract", "none"]


# ---------------------------------------------------------------------------------------------------------------
# The pieces, one function each
# ---------------------------------------------------------------------------------------------------------------

def resolve_hf_dir(hf_dir: str) -> str:
    """`model.hf_dir` -> a local folder: "" stays "" (train from scratch), "smollm2" is the GGUF shipped in a PyPI
    package (converted once, offline), anything else is a folder or a hub repo id read from the local HF cache."""
    if not hf_dir:
        return ""
    if hf_dir == "smollm2":
        from ssft_jax.gguf_convert import ensure_smollm2_hf
        return str(ensure_smollm2_hf())
    return str(hf_io.resolve_pretrained(hf_dir))


def build_tokenizer(config):
    """The tokenizer the config names (`tokenizer`, else the model's folder); "char" is rebuilt deterministically in
    a private folder per process (no race on a shared workdir)."""
    path = config.tokenizer or config.model.hf_dir
    path = path if path == "char" else resolve_hf_dir(path)  # "smollm2" names the shipped model's tokenizer too
    if path == "char":  # saved and loaded back (what a run exports); the loaded tokenizer lives in memory
        with tempfile.TemporaryDirectory(prefix="ssft_char_tokenizer_") as folder:
            return tokenization.build_char_tokenizer(folder)
    if not path:
        raise config_lib.ConfigError(
            "model.hf_dir is empty and so is tokenizer: point model.hf_dir at a local HF folder (or set tokenizer to a "
            "folder or 'char' to train from scratch)")
    return tokenization.load_tokenizer(path)


def build_tags(config, tokenizer) -> tokenization.ForkingTags:
    """The N forking tags; in special mode their tokens are added to `tokenizer` (idempotent)."""
    tags = tokenization.ForkingTags.for_tokenizer(tokenizer, config.ssft.num_tags, config.ssft.tag_mode)
    if tags.mode == "special":
        tags.add_to_tokenizer(tokenizer)
    return tags


def model_overrides(config, remat: str | None = None) -> dict[str, Any]:
    """The run-time fields of ModelConfig that come from `config.model`, not from the checkpoint's config.json."""
    mc = config.model
    return dict(dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat if remat is None else remat,
                attention_chunk=mc.attention_chunk)


def base_model_config(config, tokenizer=None, *, hf_config: Mapping[str, Any] | None = None,
                      remat: str | None = None) -> ModelConfig:
    """The architecture before any tag tokens are added: `hf_config` (a config.json dict, e.g. a planner preset),
    else the config.json of `model.hf_dir`, else `model.init` with the tokenizer's vocabulary (from scratch)."""
    overrides = model_overrides(config, remat)
    if hf_config is not None:
        return ModelConfig.from_hf(dict(hf_config), **overrides)
    hf_dir = resolve_hf_dir(config.model.hf_dir)
    if hf_dir:
        return hf_io.load_hf_config(hf_dir, **overrides)
    if tokenizer is None:
        raise config_lib.ConfigError("a from-scratch model (model.hf_dir empty) takes its vocabulary from the "
                                     "tokenizer: none was given")
    eos = tokenization.eos_token_ids(tokenizer)
    return ModelConfig(**dict(config.model.init), vocab_size=len(tokenizer), eos_token_id=eos[0],
                       pad_token_id=tokenizer.pad_token_id, **overrides)


def vocab_for_tags(cfg: ModelConfig, tokenizer, tags: tokenization.ForkingTags) -> int:
    """The embedding rows the model needs once the tags are in the tokenizer (unchanged when already padded past)."""
    return max(cfg.vocab_size, len(tokenizer)) if tags.mode == "special" else cfg.vocab_size


def build_layout(config, tag_len: int, *, num_processes: int | None = None) -> data_lib.LayoutConfig:
    """The static batch layout; B is per process (the global batch is split over the hosts)."""
    processes = jax.process_count() if num_processes is None else num_processes
    if config.batch_size % processes:
        raise config_lib.ConfigError(f"batch_size={config.batch_size} is not divisible by {processes} processes")
    s, d = config.ssft, config.data
    pack_rows = 0
    if d.packed:
        groups = data_lib.packing.pack_groups(config.micro_batches, processes) * processes
        if d.pack_rows % groups:
            raise config_lib.ConfigError(f"data.pack_rows={d.pack_rows} is not a multiple of lcm(micro_batches, "
                                         f"processes) = {groups}")
        pack_rows = d.pack_rows // processes
    return data_lib.LayoutConfig(
        num_tags=s.num_tags, num_traces=s.max_traces, cost_len=s.cost_prefix_len, max_prompt_len=d.max_prompt_len,
        max_trace_len=d.max_trace_len, tag_len=tag_len, batch_size=config.batch_size // processes,
        allow_more_traces_than_tags=not losses.get_method(s.method).distinct_tags,
        pack_rows=pack_rows, pack_len=d.pack_len if d.packed else 0, pack_micro_batches=config.micro_batches,
        pack_fill=d.pack_fill)


def abstract_params(cfg: ModelConfig, mesh) -> Params:
    """Parameter shapes with their shardings on `mesh` (nothing allocated)."""
    shapes, axes = model_lib.abstract_params(cfg)
    shardings = mesh_lib.tree_shardings(axes, shapes, mesh)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


def load_params(config, cfg: ModelConfig, mesh) -> tuple[ModelConfig, Params]:
    """Weights placed with their shardings: read from `model.hf_dir`, or initialised from `seed` on device."""
    hf_dir = resolve_hf_dir(config.model.hf_dir)
    if hf_dir:
        lc = config.get("lora")
        mode = lc.get("base_quant", "") if lc is not None and lc.enabled else ""
        # QLoRA: the projections quantized on the host as they are read, never placed dense (`quant`)
        return hf_io.load_hf_params(hf_dir, cfg, mesh=mesh, place_layer_param=quant.host_quantizer(mode))
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params(cfg, mesh))
    return cfg, jax.jit(lambda: model_lib.init_params(cfg, config.seed), out_shardings=shardings)()


@dataclasses.dataclass
class Pieces:
    """What a run is made of, before data and optimizer state. `params`: arrays ("load"), sharded
    ShapeDtypeStructs ("abstract") or None ("none")."""

    tokenizer: Any
    tags: tokenization.ForkingTags
    model_config: ModelConfig
    layout: data_lib.LayoutConfig
    params: Params | None
    tag_table: np.ndarray  # [N, Lt] left-padded tag ids (data.tag_table)
    tag_lengths: np.ndarray  # [N]


def build(config, *, mesh=None, params: ParamsMode = "load", remat: str | None = None,
          tokenizer=None) -> Pieces:
    """config -> tokenizer -> base model (+ weights) -> forking tags -> grown vocabulary -> layout -> tag table.

    mesh: where the params go (needed unless params="none"); remat: override `model.remat` (generation: "none");
    tokenizer: reuse one (e.g. a run's saved tokenizer) instead of building it from the config."""
    tokenizer = build_tokenizer(config) if tokenizer is None else tokenizer
    cfg = base_model_config(config, tokenizer, remat=remat)
    weights = None
    if params == "load":
        cfg, weights = load_params(config, cfg, mesh)
    tags = build_tags(config, tokenizer)
    vocab = vocab_for_tags(cfg, tokenizer, tags)
    if vocab > cfg.vocab_size:
        if weights is not None:
            cfg, weights = model_lib.resize_vocab(cfg, weights, vocab)
            target = abstract_params(cfg, mesh)  # only the grown tables move (the layers may be quantized: QLoRA)
            weights = {**weights, **{k: jax.device_put(weights[k], target[k].sharding)
                                     for k in ("embedding", "lm_head") if k in weights}}
        else:
            cfg = cfg.replace(vocab_size=vocab)
    if params == "abstract":
        weights = abstract_params(cfg, mesh)
    layout = build_layout(config, tags.max_tag_len(tokenizer))
    table, lengths = data_lib.tag_table(tokenizer, tags, layout.tag_len)
    return Pieces(tokenizer, tags, cfg, layout, weights, table, lengths)


class RunInputs(NamedTuple):
    """Everything a run builds from its config before the train state: model, tags and tokenized data."""
    tokenizer: Any
    model_config: model_lib.ModelConfig
    params: model_lib.Params
    tags: tokenization.ForkingTags
    layout: data_lib.LayoutConfig
    questions: list
    report: Any  # data_lib's validation report (kept / skipped / truncated counts)
    tag_table: np.ndarray
    tag_lengths: np.ndarray


def build_inputs(config, mesh) -> RunInputs:
    """The run's pieces (`assembly.build`: tokenizer, model on `mesh`, tags, layout) and its tokenized training
    questions: the part of `train.run` before the optimizer, for tests and tools that drive the step themselves."""
    pieces = build(config, mesh=mesh)
    train_records, _ = datasets.build_records(config)
    questions, report = data_lib.tokenize_records(
        train_records, pieces.tokenizer, pieces.tags, pieces.layout, on_bad_record=config.data.on_bad_record,
        overlong=config.data.overlong, extra_traces=config.data.extra_traces, format=config.data.format)
    if config.data.num_questions:
        questions = questions[: config.data.num_questions]
    return RunInputs(pieces.tokenizer, pieces.model_config, pieces.params, pieces.tags, pieces.layout, questions,
                     report, pieces.tag_table, pieces.tag_lengths)


def make_optimizer(config, num_steps: int):
    """The stage's optimizer: `optim` for SSFT, `gfpo.optim` for a GFPO run (so a checkpoint of either restores)."""
    optim = config.gfpo.optim if config.get("stage", "ssft") == "gfpo" else config.optim
    return train_state.make_optimizer(optim, num_steps)


def make_step(config, cfg: ModelConfig, layout: data_lib.LayoutConfig, optimizer, state, batch_example, mesh,
              *, lora: lora_lib.LoraSpec | None = None, frozen: Params | None = None):
    """The jitted train step for this config: `(state, batch, tag_table, tag_lengths) -> (state, metrics)`, with
    explicit shardings from `state` and the batch layout, the state donated. `state`/`batch_example` may be
    abstract (sharded ShapeDtypeStructs), e.g. to lower and compile without weights. With `lora` (`split_lora`),
    state['params'] are the adapters and the step takes the frozen base as a fifth argument."""
    if config.ssft.cost_layout == "auto":  # decided by the planner, which builds on this module: its caller's job
        raise config_lib.ConfigError("ssft.cost_layout='auto' reached make_step undecided: pass the config through "
                                     "memory_plan.with_resolved_cost_layout(config, layout, mesh) first")
    step_fn = step_lib.make_train_step(cfg, config.ssft, optimizer, micro_batches=config.micro_batches,
                                       logprob_chunk=config.model.logprob_chunk,
                                       inject_nonfinite=config.debug.inject_nonfinite,
                                       cost_dims=(layout.max_prompt_len, layout.pair_block_len), lora=lora)
    return step_lib.jit_train_step(step_fn, state, batch_example, mesh, frozen=frozen if lora is not None else None)


def split_lora(config, cfg: ModelConfig, params: Params, tokenizer, tags, mesh
               ) -> tuple[lora_lib.LoraSpec | None, Params | None, Params]:
    """(spec, frozen base, trainable params) of a `lora.enabled` run, else (None, None, params). The trainable
    pytree (adapters, tag rows) is what the train state, optimizer and checkpoints hold."""
    spec = lora_lib.spec_from_config(config, tokenizer, tags, model_param_dtype=cfg.param_dtype)
    if spec is None:
        return None, None, params
    trainable = lora_lib.place_trainable(cfg, spec, params, mesh)
    return spec, lora_lib.freeze(spec, params), trainable


def abstract_batch(layout: data_lib.LayoutConfig, batch_size: int, mesh) -> dict:
    """One global batch of `layout` as sharded ShapeDtypeStructs (shapes do not depend on the data)."""
    N, M, Lt = layout.num_tags, layout.num_traces, layout.tag_len
    q = data_lib.TokenizedQuestion(index=0, id="abstract", where="abstract", prompt_ids=np.ones(1, np.int32),
                                   trace_ids=tuple(np.ones(1, np.int32) for _ in range(M)), truncated=(False,) * M)
    one = data_lib.QuestionLayout(layout, np.ones((N, Lt), np.int32), np.full((N,), Lt, np.int32))(q)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size, *np.shape(x)), np.asarray(x).dtype,
                                                        sharding=mesh_lib.batch_sharding(mesh, np.ndim(x) + 1)), one)
    if layout.packed:  # rows scale with the batch like questions do: pack_rows per process's batch_size questions
        train = data_lib.packing.PackedTrainLayout(layout)([q] * layout.batch_size)
        scale = batch_size // layout.batch_size
        batch["train"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((x.shape[0] * scale, *x.shape[1:]), x.dtype,
                                           sharding=mesh_lib.batch_sharding(mesh, x.ndim)), train)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Loading a model to sample from
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
    """Everything generation needs. `vocab_limit` = len(tokenizer) when the embedding is padded past it."""

    cfg: ModelConfig
    params: Params
    tokenizer: Any
    tags: tokenization.ForkingTags
    eos_token_ids: list[int]
    vocab_limit: int | None
    source: str  # "checkpoint:<workdir>:<step>" or "hf:<folder>"
    train_config: dict | None = None  # the training run's config (workdir only)
    tag_counts: list[int] | None = None  # the training run's matching statistics (summary.json), if any
    method: str | None = None  # the run's ssft.method (workdir only)
    # A LoRA run loaded with merge_lora=False: `params` are its adapters (and tag rows), the base is `frozen`
    lora_spec: lora_lib.LoraSpec | None = None
    frozen: Params | None = None


def _vocab_limit(cfg: ModelConfig, tokenizer) -> int | None:
    return len(tokenizer) if len(tokenizer) < cfg.vocab_size else None


def load_hf_for_generation(hf_dir: str | pathlib.Path, *, num_tags: int | None = None, tag_mode: str | None = None,
                           mesh=None) -> LoadedModel:
    """An HF folder (config.json + safetensors + tokenizer files, e.g. a trainer's `hf_export`)."""
    cfg, params = hf_io.load_hf_params(str(hf_dir), hf_io.load_hf_config(hf_dir), mesh=mesh)
    tok = tokenization.load_tokenizer(hf_dir)
    tags = hf_io.infer_tags(tok, num_tags, tag_mode)
    return LoadedModel(cfg, params, tok, tags, tokenization.eos_token_ids(tok), _vocab_limit(cfg, tok),
                       f"hf:{hf_dir}")


def read_checkpoint_config(workdir: str | pathlib.Path, step: int | None = None) -> tuple[int, dict] | None:
    """(step, the config saved with it) for the given or latest complete checkpoint of a run, or None."""
    from ssft_jax import checkpoint as ckpt_lib

    root = pathlib.Path(workdir) / "checkpoints"
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    for s in steps if step is None else [step]:
        try:
            return s, ckpt_lib.read_json_item(root / str(s) / "config")
        except FileNotFoundError:
            continue
    return None


def read_summary(workdir: str | pathlib.Path) -> dict:
    """A run's summary.json ({} when it has none yet)."""
    p = pathlib.Path(workdir) / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def load_checkpoint_for_generation(workdir: str | pathlib.Path, *, step: int | None = None,
                                   mesh=None, merge_lora: bool = True) -> LoadedModel:
    """Restore the params of a training run's Orbax checkpoint (`<workdir>/checkpoints`, latest step by default)
    on one device: the run's config (saved with the checkpoint) rebuilds the abstract train state through `build`,
    the whole state is restored into it, and only the params are kept. The run's saved tokenizer
    (`<workdir>/tokenizer`, tags included) is used when present. A LoRA run's adapters are merged into its base
    (re-read from `model.hf_dir`), unless merge_lora=False: then `params` are the adapters and `frozen` the base
    (GFPO from a LoRA run trains the adapters)."""
    from ssft_jax import checkpoint as ckpt_lib

    workdir = pathlib.Path(workdir)
    found = read_checkpoint_config(workdir, step)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    step, config_json = found
    config = config_lib.from_saved(config_json)
    saved_tokenizer = workdir / "tokenizer"
    tok = tokenization.load_tokenizer(saved_tokenizer) if (saved_tokenizer / "tokenizer.json").is_file() else None
    if mesh is None:  # one device unless the caller places the weights on its own mesh (GFPO)
        mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    lora_run = bool(config.get("lora") and config.lora.enabled)
    # A LoRA checkpoint holds the adapters only: the base is read again from the run's model.hf_dir.
    pieces = build(config, mesh=mesh, params="load" if lora_run else "abstract", remat="none", tokenizer=tok)
    spec, frozen = None, None
    target = pieces.params
    if lora_run:
        spec = lora_lib.spec_from_config(config, pieces.tokenizer, pieces.tags,
                                         model_param_dtype=pieces.model_config.param_dtype)
        frozen = lora_lib.freeze(spec, pieces.params)
        target = lora_lib.abstract_trainable(pieces.model_config, spec, mesh)
    optimizer = make_optimizer(config, max(int(config.num_steps or 1), 1))
    abstract = train_state.abstract_state(target, optimizer, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        state = ckpt.restore(step, abstract).state
    finally:
        ckpt.close()
    cfg, tok = pieces.model_config, pieces.tokenizer
    if lora_run and merge_lora:  # sampling runs on the merged weights: the adapted model, at the base model's speed
        state = {"params": lora_lib.merge(cfg, spec, frozen, state["params"], dtype=cfg.param_dtype)}
        spec, frozen = None, None
    summary = read_summary(workdir)
    return LoadedModel(cfg, state["params"], tok, pieces.tags, tokenization.eos_token_ids(tok), _vocab_limit(cfg, tok),
                       f"checkpoint:{workdir}:{step}", train_config=config_json,
                       tag_counts=summary.get("tag_counts"), method=config.ssft.method, lora_spec=spec, frozen=frozen)


def load_for_generation(*, workdir: str | pathlib.Path | None = None, hf_dir: str | pathlib.Path | None = None,
                        prefer: str = "checkpoint", num_tags: int | None = None,
                        tag_mode: str | None = None) -> LoadedModel:
    """A model to sample from: a training workdir or an HF folder (exactly one).

    workdir: prefer="checkpoint" (default) restores the latest Orbax checkpoint (works mid-run, no export needed);
    prefer="hf_export" loads `<workdir>/hf_export` when present (falling back to the checkpoint). Either way the
    run's config (checkpoint item) names the tags and method and summary.json gives the matching statistics.
    hf_dir: any HF folder; tags inferred from the tokenizer (`hf_io.infer_tags`).
    """
    if (workdir is None) == (hf_dir is None):
        raise ValueError("give exactly one of workdir= and hf_dir=")
    if hf_dir is not None:
        return load_hf_for_generation(hf_dir, num_tags=num_tags, tag_mode=tag_mode)
    if prefer not in ("checkpoint", "hf_export"):
        raise ValueError(f"prefer={prefer!r}: expected 'checkpoint' or 'hf_export'")
    workdir = pathlib.Path(workdir)
    found = read_checkpoint_config(workdir)
    export = workdir / "hf_export"
    if (prefer == "hf_export" or found is None) and (export / "config.json").is_file():
        lm = load_hf_for_generation(export, num_tags=num_tags, tag_mode=tag_mode)
        if found is not None:  # the run's own settings (tags, method) still come from the checkpoint's config item
            s = found[1]["ssft"]
            lm.tags = tokenization.ForkingTags.for_tokenizer(lm.tokenizer, num_tags or s["num_tags"], s["tag_mode"])
            lm.train_config, lm.method = found[1], s["method"]
        lm.tag_counts = read_summary(workdir).get("tag_counts")
        return lm
    if found is None:
        raise FileNotFoundError(f"{workdir}: neither checkpoints/ nor hf_export/ found")
    return load_checkpoint_for_generation(workdir)
