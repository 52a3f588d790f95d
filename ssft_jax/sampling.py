"""Jitted generation: prefill over right-padded prompts, then a `lax.while_loop` decode over a KV cache.

Two entry points over one jitted core:

* `generate(cfg, params, prompts, ...)`: one continuation per prompt.
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

Loading a model for generation: `load_for_generation(workdir=...)` or `load_for_generation(hf_dir=...)`, see there.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
def _generate_core(cfg: ModelConfig, params: Params, prompts, lengths, suffixes, suffix_lengths, eos_ids, rng, *,
                   repeats: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   vocab_limit: int | None, cache_dtype: str | None = None):
    """prompts [B, P] (right-padded, `lengths` real tokens); suffixes [B*repeats, Ls] (right-padded,
    `suffix_lengths`). Returns (tokens [B*repeats, max_new_tokens], done [B*repeats], num_tokens [B*repeats])."""
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
    _check_prompts(prompts)
    if not suffixes:
        raise ValueError("generate_forked: need at least one suffix (use [[]] for none)")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples={num_samples} and max_new_tokens={max_new_tokens} must be >= 1")
    B, T, S = len(prompts), len(suffixes), num_samples
    eos = jnp.asarray(list(eos_token_ids), jnp.int32)
    kw = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
              top_p=float(top_p), vocab_limit=vocab_limit, cache_dtype=cache_dtype)
    if share_prefix:
        P = bucket_length(max(len(p) for p in prompts))
        Ls = _suffix_bucket(max(len(s) for s in suffixes))
        row_suffixes = [suffixes[t] for _ in range(B) for t in range(T) for _ in range(S)]
        out, done, _ = _generate_core(
            cfg, params, jnp.asarray(_pad(prompts, P)), jnp.asarray([len(p) for p in prompts], jnp.int32),
            jnp.asarray(_pad(row_suffixes, Ls)), jnp.asarray([len(s) for s in row_suffixes], jnp.int32), eos,
            jax.random.key(seed), repeats=T * S, **kw)
    else:
        rows = [list(prompts[b]) + list(suffixes[t]) for b in range(B) for t in range(T) for _ in range(S)]
        P = bucket_length(max(len(r) for r in rows))
        out, done, _ = _generate_core(
            cfg, params, jnp.asarray(_pad(rows, P)), jnp.asarray([len(r) for r in rows], jnp.int32),
            jnp.zeros((len(rows), 0), jnp.int32), jnp.zeros((len(rows),), jnp.int32), eos, jax.random.key(seed),
            repeats=1, **kw)
    stops = set(int(e) for e in eos_token_ids)
    flat = [_cut(row, stops) for row in np.asarray(out).tolist()]
    return [[[flat[(b * T + t) * S + s] for s in range(S)] for t in range(T)] for b in range(B)]


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


# ---------------------------------------------------------------------------------------------------------------
# Loading a model to sample from
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
    """Everything generation needs. `vocab_limit` = len(tokenizer) when the embedding is padded past it."""

    cfg: ModelConfig
    params: Params
    tokenizer: Any
    tags: Any  # tokenization.ForkingTags
    eos_token_ids: list[int]
    vocab_limit: int | None
    source: str  # "checkpoint:<step>" or "hf:<folder>"
    train_config: dict | None = None  # the training run's config (workdir only)
    tag_counts: list[int] | None = None  # the training run's matching statistics (summary.json), if any
    method: str | None = None  # ssft | random | sft_mixed | fixed (workdir only)


def _infer_tags(tokenizer, num_tags: int | None, tag_mode: str | None):
    from ssft_jax import tokenization
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


def _vocab_limit(cfg: ModelConfig, tokenizer) -> int | None:
    return len(tokenizer) if len(tokenizer) < cfg.vocab_size else None


def load_hf_for_generation(hf_dir: str | pathlib.Path, *, num_tags: int | None = None, tag_mode: str | None = None,
                           mesh=None) -> LoadedModel:
    """An HF folder (config.json + safetensors + tokenizer files, e.g. a trainer's `hf_export`).

    Tags: special mode when the tokenizer carries `<think1>`.. tokens (their count is N unless `num_tags` says
    otherwise), else text tags `<think{i}>` with N = num_tags (default 6).
    """
    from ssft_jax import hf_io, tokenization
    cfg = hf_io.load_hf_config(hf_dir)
    bias = _has_attention_bias(pathlib.Path(hf_dir))
    if bias is not None and bias != cfg.attention_bias:
        # A Qwen2 config.json without `attention_bias` means biases to `from_hf`, but `ModelConfig.to_hf` omits the
        # key for bias-free Qwen2 models (e.g. the demo's): trust the tensors actually present.
        cfg = cfg.replace(attention_bias=bias)
    cfg, params = hf_io.load_hf_params(str(hf_dir), cfg, mesh=mesh)
    tok = tokenization.load_tokenizer(hf_dir)
    tags = _infer_tags(tok, num_tags, tag_mode)
    return LoadedModel(cfg, params, tok, tags, tokenization.eos_token_ids(tok), _vocab_limit(cfg, tok),
                       f"hf:{hf_dir}")


def _has_attention_bias(folder: pathlib.Path) -> bool | None:
    """Whether the safetensors hold q/k/v biases (None if that cannot be read)."""
    from safetensors import safe_open
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with safe_open(str(f), framework="numpy") as h:
            if any(k.endswith("self_attn.q_proj.bias") for k in h.keys()):
                return True
    return False


def load_checkpoint_for_generation(workdir: str | pathlib.Path, *, step: int | None = None) -> LoadedModel:
    """Restore the params of a training run's Orbax checkpoint (`<workdir>/checkpoints`, latest step by default).

    The run's config is read from the checkpoint; the abstract train state is rebuilt the way the trainer builds it
    (tokenizer -> model shapes -> tags -> optimizer state shapes) on one device, and the whole state is restored
    into it; only the params are kept.
    """
    import ml_collections

    from ssft_jax import checkpoint as ckpt_lib, mesh as mesh_lib, model as model_lib, tokenization
    from ssft_jax import train, train_step as ts

    workdir = pathlib.Path(workdir)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
        cfg_path = workdir / "checkpoints" / str(step) / "config"
        config_json = _read_orbax_json(cfg_path)
        config = ml_collections.ConfigDict(config_json)
        mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        if config.tokenizer == "char":
            tok = tokenization.load_tokenizer(workdir / "tokenizer")
        else:
            tok = train.build_tokenizer(config, workdir)
        mc = config.model
        overrides = dict(dtype=mc.dtype, param_dtype=mc.param_dtype, remat="none")
        hf_dir = train.resolve_hf_dir(mc.hf_dir)
        if hf_dir:
            from ssft_jax import hf_io
            cfg = hf_io.load_hf_config(hf_dir, **overrides)
        else:
            eos = tokenization.eos_token_ids(tok)
            cfg = model_lib.ModelConfig(**dict(mc.init), vocab_size=len(tok), eos_token_id=eos[0],
                                        pad_token_id=tok.pad_token_id, **overrides)
        tags = tokenization.ForkingTags.for_tokenizer(tok, config.ssft.num_tags, config.ssft.tag_mode)
        if tags.mode == "special":
            _, n_vocab = tags.add_to_tokenizer(tok)
            if n_vocab > cfg.vocab_size:
                cfg = cfg.replace(vocab_size=n_vocab)
        shapes, _ = model_lib.abstract_params(cfg)
        optimizer = ts.make_optimizer(config.optim, max(int(config.num_steps or 1), 1))
        repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        abstract = {
            "params": shapes,
            "opt_state": jax.eval_shape(optimizer.init, shapes),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
            "consecutive_skips": jax.ShapeDtypeStruct((), jnp.int32),
        }
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)
        _, state, _, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    summary = _read_summary(workdir)
    return LoadedModel(cfg, state["params"], tok, tags, tokenization.eos_token_ids(tok), _vocab_limit(cfg, tok),
                       f"checkpoint:{workdir}:{step}", train_config=config_json,
                       tag_counts=summary.get("tag_counts"), method=config.ssft.method)


def _read_orbax_json(path: pathlib.Path) -> dict:
    """A JsonSave item: a folder holding one JSON file (Orbax layout) or the file itself."""
    if path.is_file():
        return json.loads(path.read_text())
    files = [p for p in sorted(path.glob("*"), key=lambda p: p.name != "metadata")
             if p.is_file() and not p.name.startswith(".")]
    for p in files:
        try:
            return json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    raise FileNotFoundError(f"no JSON config in {path}")


def _read_summary(workdir: pathlib.Path) -> dict:
    p = workdir / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def load_for_generation(*, workdir: str | pathlib.Path | None = None, hf_dir: str | pathlib.Path | None = None,
                        prefer: str = "checkpoint", num_tags: int | None = None,
                        tag_mode: str | None = None) -> LoadedModel:
    """A model to sample from: a training workdir or an HF folder (exactly one).

    workdir: prefer="checkpoint" (default) restores the latest Orbax checkpoint (works mid-run, no export needed);
    prefer="hf_export" loads `<workdir>/hf_export` when present (falling back to the checkpoint). Either way the
    run's config (checkpoint item) names the tags and method and summary.json gives the matching statistics.
    hf_dir: any HF folder; tags inferred from the tokenizer (see `load_hf_for_generation`).
    """
    if (workdir is None) == (hf_dir is None):
        raise ValueError("give exactly one of workdir= and hf_dir=")
    if hf_dir is not None:
        return load_hf_for_generation(hf_dir, num_tags=num_tags, tag_mode=tag_mode)
    workdir = pathlib.Path(workdir)
    has_ckpt = (workdir / "checkpoints").is_dir() and any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
    export = workdir / "hf_export"
    if prefer not in ("checkpoint", "hf_export"):
        raise ValueError(f"prefer={prefer!r}: expected 'checkpoint' or 'hf_export'")
    if (prefer == "hf_export" or not has_ckpt) and (export / "config.json").is_file():
        lm = load_hf_for_generation(export, num_tags=num_tags, tag_mode=tag_mode)
        if has_ckpt:  # the run's own settings (tags, method) still come from the checkpoint's config item
            ckpt = ckpt_config(workdir)
            if ckpt is not None:
                from ssft_jax import tokenization
                s = ckpt["ssft"]
                lm.tags = tokenization.ForkingTags.for_tokenizer(lm.tokenizer, num_tags or s["num_tags"], s["tag_mode"])
                lm.train_config, lm.method = ckpt, s["method"]
        lm.tag_counts = _read_summary(workdir).get("tag_counts")
        return lm
    if not has_ckpt:
        raise FileNotFoundError(f"{workdir}: neither checkpoints/ nor hf_export/ found")
    return load_checkpoint_for_generation(workdir)


def ckpt_config(workdir: str | pathlib.Path) -> dict | None:
    """The config JSON saved with the latest checkpoint of a run, or None."""
    root = pathlib.Path(workdir) / "checkpoints"
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) if root.is_dir() else []
    for s in steps:
        try:
            return _read_orbax_json(root / str(s) / "config")
        except FileNotFoundError:
            continue
    return None
