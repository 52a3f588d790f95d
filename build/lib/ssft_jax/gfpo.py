"""GFPO, Global Forking Policy Optimization: RL on the forking tag only, after SSFT (arXiv 2510.05132, v2).

    python -m ssft_jax.gfpo --config configs/gfpo_demo.py --init_from <SSFT workdir | HF folder> --workdir DIR

The policy is pi(tag | x), the model's distribution over the N forking tags at the tag position (`tag_policy`).
Each step, for B questions:

  1. pi_old over the valid tags (one prompt-only forward);
  2. rollouts: `grpo` draws G tags per question from pi_old (the paper); `enumerate` rolls out every valid tag k
     times (the exact policy gradient of sum_i pi_i rbar_i, no noise in the tag choice). The answer after the tag is
     sampled by `sampling.generate_rows` (each question's prompt prefilled once, its KV cache shared by its rows);
  3. rewards from the dataset's checker (1 correct, 0 wrong, minus `format_penalty` when no answer is found), or a
     user's `reward_fn`;
  4. one jitted update (explicit shardings, donated state; `updates_per_batch` PPO epochs in a `lax.scan`):
     loss = mean_q [ -clipped_surrogate(pi(tag_r)/pi_old(tag_r), A_r) + kl_coef * KL(pi || pi_SSFT) ], the KL exact
     over the N tags. Only the tag position's logits enter the loss, so the update's forward is the prompt alone.

The trainer's guarantees hold here too: a step with a non-finite loss, gradient or reward leaves the weights and
the Adam moments untouched and is counted (`max_consecutive_skips`); Orbax checkpoints restore exactly (the
question order and every rollout's randomness are functions of (seed, step), so a resumed run draws what the
uninterrupted one would); SIGTERM saves; metrics go to metrics.jsonl / TensorBoard / wandb; the result is exported
as an HF folder with the forking tags.

Scope: one process (any number of local devices). Rollouts are driven from the host over the whole batch;
multi-host GFPO would need each process to roll out its own share, which is not built yet: it refuses clearly.
"""
from __future__ import annotations

import copy
import json
import logging
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from ssft_jax import assembly, checkers, datasets, metrics_log, run_common, sampling, tag_policy, tokenization
from ssft_jax import train_state
from ssft_jax import checkpoint as ckpt_lib
from ssft_jax import config as config_lib
from ssft_jax import mesh as mesh_lib
from ssft_jax.data import DataError, RawRecord, read_records
from ssft_jax.model import ModelConfig

logger = logging.getLogger(__name__)

# A user's reward: (record, generated text after the tag, the checker's result) -> float.
RewardFn = Callable[[Mapping[str, Any], str, checkers.CheckResult], float]

# Sections of the SSFT run's config that describe the model GFPO trains: they replace the GFPO config's own.
INIT_SECTIONS = ("model", "tokenizer", "ssft")


# ---------------------------------------------------------------------------------------------------------------
# The initial model and the questions
# ---------------------------------------------------------------------------------------------------------------

def load_init(config: ml_collections.ConfigDict, mesh) -> tuple[ml_collections.ConfigDict, assembly.LoadedModel]:
    """(the GFPO config completed by the SSFT run's sections, the SSFT model placed on `mesh`).

    init_from is a training workdir (its latest checkpoint; `model`, `tokenizer` and `ssft`, and `data` when
    gfpo.data='init', come from that run's saved config) or an HF folder (a trainer's hf_export or any folder with
    the forking tags in its tokenizer; the config's own sections describe the rest and `model.hf_dir` is set to it).
    """
    src = str(config.gfpo.init_from)
    if not src:
        raise config_lib.ConfigError("gfpo.init_from is empty: pass --init_from <SSFT workdir or HF folder>")
    path = pathlib.Path(src)
    config = copy.deepcopy(config)
    if (path / "checkpoints").is_dir():
        lm = assembly.load_checkpoint_for_generation(path, mesh=mesh)
        init = config_lib.from_saved(lm.train_config)
        sections = INIT_SECTIONS + (("data",) if config.gfpo.data == "init" else ())
        with config.unlocked():
            for s in sections:
                with config.ignore_type():
                    config[s] = copy.deepcopy(init[s])
    elif (path / "config.json").is_file():
        if config.gfpo.data == "init":
            raise config_lib.ConfigError(
                f"gfpo.init_from={src} is an HF folder, which does not say which questions the SSFT run saw: set "
                "--config.gfpo.data=config (and the config's data section), or start from the SSFT workdir")
        lm = assembly.load_hf_for_generation(path, num_tags=config.ssft.num_tags, tag_mode=config.ssft.tag_mode,
                                             mesh=mesh)
        with config.unlocked():
            config.model.hf_dir = str(path)
            config.tokenizer = str(path)
    else:
        raise config_lib.ConfigError(f"gfpo.init_from={src}: neither a training workdir (no checkpoints/) nor an HF "
                                     "folder (no config.json)")
    if lm.tags.n != config.ssft.num_tags:
        raise config_lib.ConfigError(f"{src} has {lm.tags.n} forking tags, the config says ssft.num_tags="
                                     f"{config.ssft.num_tags}")
    return config, lm


def valid_tags(spec: str, num_tags: int, tag_counts: Sequence[int] | None) -> np.ndarray:
    """[N] bool: the tags the policy may choose. 'used': the tags SSFT's matching ever assigned (the rest never
    trained on a trace, so rolling them out wastes rollouts); all when the run's statistics are unknown."""
    explicit = config_lib.parse_valid_tags(spec, num_tags)
    if explicit is not None:
        valid = np.zeros(num_tags, bool)
        valid[explicit] = True
        return valid
    return tag_policy.used_tags(tag_counts, num_tags) if spec == "used" else np.ones(num_tags, bool)


class Questions:
    """The RL questions: records with their rendered prompts (prompt + nothing: the tag comes from the policy).

    A record that cannot be used (no answer to check, a template error, a prompt longer than data.max_prompt_len)
    raises DataError naming it, or, with data.on_bad_record='skip', is counted in `skipped` and logged."""

    def __init__(self, records: Sequence[Mapping[str, Any] | RawRecord], tokenizer, tags, *, max_prompt_len: int,
                 on_bad_record: str = "error"):
        self.records, self.prompts, self.skipped = [], [], {}
        for i, rec in enumerate(records):
            where = f"record {i}"
            if isinstance(rec, RawRecord):  # read from files (data.name=jsonl): unreadable ones carry their reason
                where, unreadable, rec = rec.where, (rec.reason, rec.detail) if rec.reason else None, rec.record
            else:
                unreadable = None
            rid = rec.get("id", i) if isinstance(rec, Mapping) else i
            try:
                if unreadable is not None:
                    raise ValueError(f"{unreadable[0]}: {unreadable[1]}")
                if not isinstance(rec, Mapping):
                    raise ValueError(f"a record must be an object, got {type(rec).__name__}")
                if rec.get("answer") in (None, ""):
                    raise ValueError("no 'answer' to check rollouts against")
                prompt = rec.get("messages") or rec.get("question")
                if not prompt:
                    raise ValueError("no 'question' (or 'messages')")
                ids = list(tokenization.render_example(tokenizer, prompt, None, tags, None, example_id=rid).prompt_ids)
                if len(ids) > max_prompt_len:
                    raise ValueError(f"prompt is {len(ids)} tokens, more than data.max_prompt_len={max_prompt_len}")
            except (ValueError, KeyError) as e:  # PromptPrefixError and TemplateError are ValueErrors
                if on_bad_record != "skip":
                    raise DataError(f"GFPO question {rid!r} ({where}): {e} (data.on_bad_record=skip skips such "
                                    "records, counted)") from None
                reason = str(e).split(":")[0][:60]
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                continue
            self.records.append(rec)
            self.prompts.append(ids)
        if self.skipped:
            logger.warning("GFPO: skipped %d record(s): %s", sum(self.skipped.values()), self.skipped)

    def __len__(self) -> int:
        return len(self.records)

    def indices(self, step: int, batch: int, seed: int) -> np.ndarray:
        """The questions of (0-based) step `step`: consecutive slices of a per-epoch permutation seeded by (seed,
        epoch), so any step's batch is known without replaying the run (exact resume)."""
        q = len(self.records)
        positions = step * batch + np.arange(batch)
        out = np.empty(batch, np.int64)
        for epoch in np.unique(positions // q):
            perm = np.random.default_rng([seed, int(epoch)]).permutation(q)
            sel = positions // q == epoch
            out[sel] = perm[positions[sel] % q]
        return out


# ---------------------------------------------------------------------------------------------------------------
# The update (pure, jitted once)
# ---------------------------------------------------------------------------------------------------------------

def advantages_and_weights(estimator: str, rewards: jax.Array, row_tags: jax.Array, logp_old: jax.Array,
                           valid: jax.Array, *, samples_per_tag: int, eps: float, normalize_std: bool
                           ) -> tuple[jax.Array, jax.Array]:
    """([B, R] advantages, [B, R] row weights) of a batch of rollouts (rewards [B, R], the tags they used [B, R],
    the behaviour policy logp_old [B, N]).

    grpo: A = group-relative reward, weight 1/G (the gradient is the mean over the G rollouts of A grad log pi);
    enumerate: A_r = rbar(tag_r) - sum_j pi_old_j rbar_j and weight pi_old(tag_r)/k, so at ratio 1 the gradient is
    sum_i pi_i (rbar_i - b) grad log pi_i = grad sum_i pi_i rbar_i exactly (rbar: the mean of tag i's k rewards)."""
    if estimator == "grpo":
        adv = tag_policy.group_advantages(rewards, eps=eps, normalize_std=normalize_std)
        return adv, jnp.full(rewards.shape, 1.0 / rewards.shape[-1], jnp.float32)
    onehot = jax.nn.one_hot(row_tags, logp_old.shape[-1], dtype=jnp.float32)  # [B, R, N]
    tag_rewards = jnp.einsum("brn,br->bn", onehot, rewards) / samples_per_tag
    p_old = jnp.exp(logp_old)
    per_tag = tag_policy.enumerate_advantages(tag_rewards, p_old, valid)
    adv = jnp.take_along_axis(per_tag, row_tags, axis=-1)
    return adv, jnp.take_along_axis(p_old, row_tags, axis=-1) / samples_per_tag


def make_update(cfg: ModelConfig, g: ml_collections.ConfigDict, optimizer: optax.GradientTransformation):
    """The pure update `(state, batch, choice_ids) -> (state, metrics)`.

    batch: tokens [B, W] / lengths [B] (prompt + tag prefix), valid [B, N], logp_old [B, N] (the policy the rollouts
    were drawn from), logp_ref [B, N] (the SSFT model's), row_tags [B, R], rewards [B, R]."""
    estimator, U = g.estimator, int(g.updates_per_batch)

    def step_fn(state, batch, choice_ids):
        valid = batch["valid"]
        adv, weights = advantages_and_weights(
            estimator, batch["rewards"], batch["row_tags"], batch["logp_old"], valid,
            samples_per_tag=int(g.samples_per_tag), eps=float(g.adv_eps), normalize_std=bool(g.normalize_std))
        logp_old_sel = jnp.take_along_axis(batch["logp_old"], batch["row_tags"], axis=-1)

        def loss_fn(params):
            logp = tag_policy.tag_log_probs(cfg, params, batch["tokens"], batch["lengths"], choice_ids, valid)
            sel = jnp.take_along_axis(logp, batch["row_tags"], axis=-1)
            objective, clipfrac = tag_policy.clipped_surrogate(sel, logp_old_sel, adv, weights, float(g.clip_eps))
            kl = tag_policy.exact_kl(logp, batch["logp_ref"], valid)
            loss = jnp.mean(-objective + float(g.kl_coef) * kl)
            return loss, {"kl_to_init": jnp.mean(kl), "entropy": jnp.mean(tag_policy.entropy(logp, valid)),
                          "clipfrac": jnp.mean(clipfrac), "pi": jnp.mean(jnp.exp(logp), axis=0)}

        def one_update(carry, _):
            params, opt_state = carry
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, new_opt = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            return (keep(new_params, params), keep(new_opt, opt_state)), (loss, grad_norm, finite, aux)

        (params, opt_state), (loss, grad_norm, finite, aux) = jax.lax.scan(
            one_update, (state["params"], state["opt_state"]), None, length=U)
        ok = jnp.all(finite) & jnp.all(jnp.isfinite(batch["rewards"]))
        # A non-finite reward gives non-finite advantages and loss, so no update above applied it; `ok` also names
        # the step skipped when only a later PPO epoch went non-finite (the earlier, finite ones are kept).
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "consecutive_skips": jnp.where(ok, 0, state["consecutive_skips"] + 1)}
        metrics = {
            "loss": loss[0], "grad_norm": grad_norm[0], "step_skipped": (~ok).astype(jnp.int32),
            # before the first update: the policy the rollouts came from
            "kl_to_init": aux["kl_to_init"][0], "entropy": aux["entropy"][0], "pi": aux["pi"][0],
            "clipfrac": aux["clipfrac"][-1],  # 0 on the first epoch by construction; > 0 shows clipping at work
            "advantage_abs": jnp.sum(weights * jnp.abs(adv)) / jnp.sum(weights),
        }
        return new_state, metrics

    return step_fn


class JittedUpdate:
    """The one jit site of the stage: explicit shardings from the live state, questions split over the mesh's
    data axes, the old state donated; `compiles` counts traces (one per run when shapes are fixed)."""

    def __init__(self, step_fn, state, batch_example: Mapping[str, np.ndarray], mesh):
        self.compiles = 0
        self.mesh = mesh
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        self.batch_shardings = {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batch_example.items()}
        replicated = NamedSharding(mesh, P())

        def counted(*args):
            self.compiles += 1  # trace time only
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return step_fn(*args)

        self._jitted = jax.jit(counted, in_shardings=(state_shardings, self.batch_shardings, replicated),
                               out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    def __call__(self, state, batch: Mapping[str, np.ndarray], choice_ids):
        placed = {k: jax.device_put(np.asarray(v), self.batch_shardings[k]) for k, v in batch.items()}
        return self._jitted(state, placed, choice_ids)


# ---------------------------------------------------------------------------------------------------------------
# Rollouts (host-driven; the sampler and the policy are jitted)
# ---------------------------------------------------------------------------------------------------------------

def draw_row_tags(estimator: str, p_old: np.ndarray, valid: np.ndarray, *, group_size: int, samples_per_tag: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[B, R] tag of every rollout: G draws from each question's pi_old (grpo) or each valid tag k times
    (enumerate, the same rows for every question)."""
    if estimator == "enumerate":
        row = np.repeat(np.flatnonzero(valid), samples_per_tag)
        return np.broadcast_to(row, (p_old.shape[0], row.size)).copy()
    p = np.where(valid, np.asarray(p_old, np.float64), 0.0)
    p /= p.sum(-1, keepdims=True)
    cdf = np.cumsum(p, -1)
    u = rng.random((p.shape[0], group_size)) * cdf[:, -1:]
    # tag = the number of cdf entries <= u: a zero-probability tag repeats its predecessor's cdf value, so no u
    # (0 <= u < total) stops on it
    tags = np.minimum((cdf[:, None, :] <= u[:, :, None]).sum(-1), p.shape[-1] - 1)
    return tags.astype(np.int32)


def has_learning_signal(rewards: np.ndarray) -> bool:
    """Whether any question's rollouts [B, R] got different (finite) rewards: GRPO's group-centred advantages
    (and the enumerate estimator's baseline-subtracted ones) are all 0 otherwise."""
    for row in np.asarray(rewards, np.float64):
        finite = row[np.isfinite(row)]
        if finite.size > 1 and np.ptp(finite) > 0:
            return True
    return False


def policy_reward(estimator: str, rewards: np.ndarray, row_tags: np.ndarray, logp_old: np.ndarray) -> float:
    """The mean reward of the policy the rollouts came from: the rollouts' mean under grpo (they were drawn from
    it); sum_t pi_old(t) rbar_t under enumerate (whose rollouts cover every tag evenly, so their plain mean is the
    uniform policy's reward)."""
    if not np.isfinite(rewards).all():
        return float("nan")
    if estimator == "grpo":
        return float(rewards.mean())
    n = logp_old.shape[-1]
    onehot = np.eye(n)[row_tags]  # [B, R, N]
    rbar = np.einsum("brn,br->bn", onehot, rewards) / np.maximum(onehot.sum(1), 1)
    return float(np.mean(np.sum(np.exp(logp_old) * rbar, -1)))


class Rollouts:
    """Rollouts of one step: the tag of each, its reward, whether it was correct / answered, and the token count."""

    def __init__(self, row_tags: np.ndarray, rewards: np.ndarray, correct: np.ndarray, answered: np.ndarray,
                 tokens: int):
        self.row_tags, self.rewards, self.correct, self.answered = row_tags, rewards, correct, answered
        self.tokens = tokens


def roll_out(cfg, params, tokenizer, choice: tag_policy.TagChoice, questions: Questions, idx: np.ndarray,
             row_tags: np.ndarray, checker: checkers.Checker, g, *, eos_token_ids, vocab_limit, seed: int,
             reward_fn: RewardFn | None = None, chunk: int = 16) -> Rollouts:
    """Generate the rows `row_tags` [B, R] (prompt + the tag's tokens + a sampled answer) and score them.

    Questions go to the sampler `chunk` at a time (the last chunk padded by repeating a question: one compile),
    each chunk with its own seed derived from `seed`."""
    B, R = row_tags.shape
    max_new = int(g.max_new_tokens)
    rewards = np.zeros((B, R), np.float32)
    correct = np.zeros((B, R), bool)
    answered = np.zeros((B, R), bool)
    n_tokens = 0
    chunk = max(1, min(chunk, B))
    for c, start in enumerate(range(0, B, chunk)):
        rows = list(range(start, min(start + chunk, B)))
        pad = [rows[-1]] * (chunk - len(rows))
        prompts = [questions.prompts[idx[b]] for b in rows + pad]
        suffixes = [[list(choice.tag_ids[t]) for t in row_tags[b]] for b in rows + pad]
        outs = sampling.generate_rows(cfg, params, prompts, suffixes, max_new_tokens=max_new,
                                      eos_token_ids=eos_token_ids, temperature=float(g.temperature),
                                      top_k=int(g.top_k), top_p=float(g.top_p), seed=seed * 1009 + c,
                                      vocab_limit=vocab_limit)
        for j, b in enumerate(rows):
            rec = questions.records[idx[b]]
            for r, gen in enumerate(outs[j]):
                body = gen.tokens[:-1] if gen.finished else gen.tokens
                text = tokenizer.decode(body, skip_special_tokens=True)
                res = checker(rec, text)
                n_tokens += len(gen.tokens)
                correct[b, r], answered[b, r] = res.correct, res.answer is not None
                if reward_fn is not None:
                    rewards[b, r] = float(reward_fn(rec, text, res))
                else:
                    rewards[b, r] = float(res.correct) - (0.0 if res.answer is not None else float(g.format_penalty))
    return Rollouts(row_tags, rewards, correct, answered, n_tokens)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def _check_data_item(item) -> None:
    """GFPO's data item is {step, questions} (questions are drawn per (seed, step): nothing else to restore)."""
    if not (isinstance(item, dict) and all(isinstance(item.get(k), int) for k in ("step", "questions"))):
        raise ValueError("expected {'step': int, 'questions': int}")


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, progress: bool = True,
        stop_after: int | None = None, reward_fn: RewardFn | None = None,
        checker: str | checkers.Checker | None = None) -> dict[str, Any]:
    """Run (or resume) GFPO and return its summary. reward_fn replaces the checker's 1/0 reward (it receives the
    record, the generated text and the checker's result); checker: a `checkers` name or Checker instead of the
    dataset's."""
    mesh_lib.maybe_initialize_distributed()
    if jax.process_count() > 1:
        raise config_lib.ConfigError("GFPO runs in one process (any number of local devices); multi-host rollouts "
                                     "are not built yet")
    if config.get("stage", "ssft") != "gfpo":
        raise config_lib.ConfigError(f"stage={config.get('stage', 'ssft')!r}: this is not a GFPO config (use "
                                     "configs/gfpo_demo.py as a template, or --config.stage=gfpo)")
    workdir = epath.Path(workdir)
    m = config.mesh
    devices = jax.devices()[: m.num_devices or None]
    mesh = mesh_lib.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    config, lm = load_init(config, mesh)
    config_lib.validate(config, len(devices))
    datasets.check_source(config)
    g = config.gfpo
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if g.questions_per_step % dp:
        raise config_lib.ConfigError(f"gfpo.questions_per_step={g.questions_per_step} must be divisible by the "
                                     f"mesh's data-parallel size {dp}")
    with config.unlocked():
        if not g.max_new_tokens:
            g.max_new_tokens = int(config.data.max_trace_len)
    run_common.prepare_workdir(workdir)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save, cleanup_tmp=True)
    run_common.check_resumed_config(checkpointer, config)
    config_json = ckpt_lib.config_to_json(config)
    (workdir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))

    cfg, tokenizer, tags = lm.cfg, lm.tokenizer, lm.tags
    if not metrics_log.is_remote(workdir):
        tokenization.save_tokenizer(tokenizer, pathlib.Path(str(workdir / "tokenizer")), tags=tags)
    choice = tag_policy.TagChoice.for_tags(tokenizer, tags)
    valid = valid_tags(g.valid_tags, tags.n, lm.tag_counts)
    if valid.sum() < 2:
        logger.warning("GFPO: only tag(s) %s are valid: the policy has nothing to choose between",
                       np.flatnonzero(valid).tolist())
    train_records, _ = datasets.build_records(config)
    if any(isinstance(r, (str, pathlib.PurePath)) for r in train_records):  # data.name=jsonl: the files themselves
        train_records = read_records(list(train_records), format=config.data.format)
    questions = Questions(train_records, tokenizer, tags, max_prompt_len=int(config.data.max_prompt_len),
                          on_bad_record=config.data.on_bad_record)
    if config.data.num_questions:
        questions.records = questions.records[: config.data.num_questions]
        questions.prompts = questions.prompts[: config.data.num_questions]
    if len(questions) < 1:
        raise config_lib.ConfigError(f"GFPO has no usable questions (skipped: {questions.skipped})")
    # the dataset's checker unless the caller judges answers its own way (the demo's --checker for a user's file)
    checker = checkers.get_checker(checker or datasets.get_dataset(config.data.name).checker)
    B, N = int(g.questions_per_step), tags.n
    width = sampling.bucket_length(max(len(p) for p in questions.prompts) + len(choice.prefix_ids))
    choice_ids = jnp.asarray(choice.choice_ids, jnp.int32)

    # The reference policy (the SSFT model), for the KL term and its log: once, before any update donates weights.
    ref = tag_policy.TagPolicy(cfg, lm.params, choice, valid, batch=B)
    logp_ref_all = ref.log_probs(questions.prompts)

    optimizer = assembly.make_optimizer(config, int(g.num_steps) * int(g.updates_per_batch))
    schedule = train_state.learning_rate_schedule(g.optim, int(g.num_steps) * int(g.updates_per_batch))
    state = train_state.init_state(lm.params, optimizer, config.seed, mesh)
    del lm.params, ref
    start = 0
    restored = checkpointer.restore_latest(
        ckpt_lib.abstract_like(state), require=("state", "data"), on_corrupt=config.checkpoint.on_corrupt,
        validate=run_common.item_validators(N, per_step="rewards", data=_check_data_item))
    stats = run_common.restored_stats(restored, N, per_step="rewards")
    if restored is not None:
        start, state, data_state = restored.step, restored.state, restored.data
        if data_state["questions"] != len(questions):
            raise config_lib.ConfigError(f"the checkpoint's run had {data_state.get('questions')} GFPO questions, "
                                         f"this config gives {len(questions)}: use the run's data or a new --workdir")
        logging.info("GFPO: resumed from step %d", start)

    def policy_batch(idx):
        tokens, lengths = tag_policy.policy_rows([questions.prompts[i] for i in idx], choice.prefix_ids, width)
        return tokens, lengths

    def behaviour_log_probs(params, tokens, lengths):
        return np.asarray(tag_policy._jitted_log_probs(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                                       choice_ids, jnp.asarray(valid)))

    R = int(g.group_size) if g.estimator == "grpo" else int(valid.sum() * g.samples_per_tag)
    example = {"tokens": np.zeros((B, width), np.int32), "lengths": np.ones((B,), np.int32),
               "valid": np.zeros((B, N), bool), "logp_old": np.zeros((B, N), np.float32),
               "logp_ref": np.zeros((B, N), np.float32), "row_tags": np.zeros((B, R), np.int32),
               "rewards": np.zeros((B, R), np.float32)}
    update = JittedUpdate(make_update(cfg, g, optimizer), state, example, mesh)

    metrics_logger = metrics_log.MetricsLogger(workdir, resume_step=start, tensorboard=config.logging.tensorboard,
                                               wandb_project=config.logging.wandb_project,
                                               wandb_entity=config.logging.wandb_entity, config=config_json)
    guard = ckpt_lib.PreemptionGuard()
    consecutive_skips = int(state["consecutive_skips"])
    no_signal_steps = 0  # this process's steps whose rewards gave no learning signal (warned about)
    rollout_s = update_s = 0.0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=int(g.num_steps), initial=start, desc=f"gfpo/{g.estimator}", dynamic_ncols=True)
    t0, stopped_early, step = time.perf_counter(), False, start
    with run_common.loop_cleanup(checkpointer, guard, metrics_logger, bar):
        while step < g.num_steps:
            if guard.should_stop(step) or (stop_after is not None and step - start >= stop_after):
                stopped_early = True
                break
            checkpointer.check()
            idx = questions.indices(step, B, int(config.seed))
            tokens, lengths = policy_batch(idx)
            t_roll = time.perf_counter()
            logp_old = behaviour_log_probs(state["params"], tokens, lengths)
            rng = np.random.default_rng([int(config.seed), step, 17])
            row_tags = draw_row_tags(g.estimator, np.exp(logp_old), valid, group_size=int(g.group_size),
                                     samples_per_tag=int(g.samples_per_tag), rng=rng)
            ro = roll_out(cfg, state["params"], tokenizer, choice, questions, idx, row_tags, checker, g,
                          eos_token_ids=lm.eos_token_ids, vocab_limit=lm.vocab_limit,
                          seed=int(config.seed) * 100_003 + step,
                          reward_fn=reward_fn)
            t_upd = time.perf_counter()
            batch = {"tokens": tokens, "lengths": lengths, "valid": np.broadcast_to(valid, (B, N)),
                     "logp_old": logp_old, "logp_ref": logp_ref_all[idx], "row_tags": row_tags,
                     "rewards": ro.rewards}
            state, metrics = update(state, batch, choice_ids)
            metrics = jax.device_get(metrics)
            t_end = time.perf_counter()
            step += 1
            rollout_s += t_upd - t_roll
            update_s += t_end - t_upd
            stats.rollout_tokens += ro.tokens
            nonfinite_rewards = int((~np.isfinite(ro.rewards)).sum())
            consecutive_skips = consecutive_skips + 1 if metrics["step_skipped"] else 0
            if metrics["step_skipped"]:
                stats.skipped_steps.append(step)
            finite = ro.rewards[np.isfinite(ro.rewards)]
            stats.rewards[step] = float(finite.mean()) if finite.size else float("nan")
            record = {k: v for k, v in metrics.items() if k != "pi"}
            record.update(
                reward=stats.rewards[step], policy_reward=policy_reward(g.estimator, ro.rewards, row_tags, logp_old), accuracy=float(ro.correct.mean()), answer_rate=float(ro.answered.mean()),
                rewards_nonfinite=nonfinite_rewards, steps_skipped_total=len(stats.skipped_steps),
                rollout_tag_counts=np.bincount(row_tags.ravel(), minlength=N),
                greedy_tag_counts=np.bincount(np.argmax(np.where(valid, logp_old, -np.inf), -1), minlength=N),
                pi_mean=metrics["pi"], rollout_seconds=t_upd - t_roll, update_seconds=t_end - t_upd,
                rollout_tokens=ro.tokens, rollout_tokens_per_s=ro.tokens / max(t_upd - t_roll, 1e-9),
                lr=float(schedule((step - 1) * int(g.updates_per_batch))))
            # GRPO learns from reward differences inside a question's group: none anywhere means a zero update
            record["no_signal"] = int(not has_learning_signal(ro.rewards))
            if record["no_signal"]:
                no_signal_steps += 1
                if no_signal_steps == 1 or no_signal_steps % 10 == 0:
                    logging.warning(
                        "GFPO step %d: every question's rollouts got the same reward (mean %.3f): no learning signal, "
                        "the update is zero (%d such step(s) so far). All 0 usually means the answers are never "
                        "right or never extracted: check the checker, gfpo.max_new_tokens and the answer format",
                        step, stats.rewards[step], no_signal_steps)
            for t in range(N):
                sel = row_tags == t
                finite = ro.rewards[sel][np.isfinite(ro.rewards[sel])]
                if finite.size:  # tags without a (finite) rollout this step get no point, not a NaN
                    record[f"reward_tag{t}"] = float(finite.mean())
            metrics_logger.write(step, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{stats.rewards[step]:.3f}", H=f"{metrics['entropy']:.2f}")
            if consecutive_skips > config.max_consecutive_skips:
                raise run_common.TrainingDivergedError(
                    f"GFPO diverged: {consecutive_skips} consecutive steps (up to step {step}) had a non-finite "
                    f"reward, loss or gradient, more than max_consecutive_skips={config.max_consecutive_skips}; none "
                    f"changed the weights. The latest checkpoint is step {checkpointer.latest_step()}; check the "
                    "reward function or lower gfpo.optim.learning_rate")
            if step % config.checkpoint.every_steps == 0 and step < g.num_steps:
                checkpointer.save(step, state, data_state={"step": step, "questions": len(questions)},
                                  config=config_json, stats=stats.to_json())
        checkpointer.save(step, state, data_state={"step": step, "questions": len(questions)}, config=config_json,
                          stats=stats.to_json(), force=True)
        checkpointer.wait()
    elapsed = time.perf_counter() - t0

    export_dir = None
    if config.export_hf and not stopped_early:
        export_dir = run_common.export_hf(workdir / "hf_export", cfg, state["params"], tokenizer, tags,
                                          dtype=config.export.dtype or None)
    summary = {
        "stage": "gfpo", "method": config.ssft.method, "estimator": g.estimator, "init_from": g.init_from,
        "start_step": start, "final_step": step, "stopped_early": stopped_early,
        "rewards": dict(stats.rewards), "valid_tags": np.flatnonzero(valid).tolist(),
        # the SSFT run's matching statistics, so evaluation's coverage tag and 'used' tags mean the same here
        "tag_counts": list(lm.tag_counts) if lm.tag_counts is not None else None,
        "steps_skipped": len(stats.skipped_steps), "skipped_steps": list(stats.skipped_steps),
        **({"stats_cover_steps_from": stats.since + 1} if stats.since else {}), "seconds": elapsed, "rollout_seconds": rollout_s, "update_seconds": update_s,
        "rollout_tokens": stats.rollout_tokens, "compiles": update.compiles, "questions": len(questions),
        "skipped_records": questions.skipped, "export_dir": str(export_dir) if export_dir else None,
    }
    summary.update(run_common.publish_export(export_dir, config, summary))
    run_common.write_summary(workdir, summary)
    checkpointer.close()
    return {**summary, "state": state, "model_config": cfg, "tokenizer": tokenizer, "tags": tags}


def main(argv):
    del argv
    from absl import flags
    metrics_log.quiet_library_logs()
    if run_common.help_config_requested():
        return
    config = flags.FLAGS.config
    if flags.FLAGS.init_from:
        config.gfpo.init_from = flags.FLAGS.init_from
    summary = run(config, flags.FLAGS.workdir)
    print(run_common.summary_table(summary, flags.FLAGS.workdir))


def cli() -> None:
    """`ssft-gfpo` / `python -m ssft_jax.gfpo`."""
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    from ssft_jax import cli as cli_lib

    config_flags.DEFINE_config_file("config", None, "a GFPO config file (configs/gfpo_demo.py), fields overridden "
                                    "with --config.gfpo.a=value", lock_config=True)
    flags.DEFINE_string("init_from", "", "the SSFT model: a training workdir or an HF folder (sets gfpo.init_from)")
    flags.DEFINE_string("workdir", None, "where GFPO's checkpoints, logs and HF export go")
    flags.DEFINE_bool("debug", False, "show the traceback of a config, data or checkpoint error")
    flags.DEFINE_bool("help_config", False, "print every config key with its value (overrides applied) and its "
                      "documentation, then exit")
    flags.mark_flags_as_required(["config"])  # --workdir too, unless --help_config (checked in main)
    cli_lib.absl_run(main)


if __name__ == "__main__":
    cli()
