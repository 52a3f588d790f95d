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

From a LoRA SSFT run the adapters (and special tags' rows) are what RL moves, the base frozen (`make_update`'s
fourth argument). The questions are the SSFT run's, the config's data section's, or prompt-only RL files
(`gfpo.data`: {"prompt" | "question" | "messages", "answer"} rows, `Questions`).

Several hosts (a TPU pod slice): every process builds the same questions, tag draws and prompts; the sampler and
the policy run on the global mesh with the rows split over its data axes (each device decodes its own rows, each
prompt's KV cache shared by its rows), every process gets the generated tokens back and checks its own share of the
questions (`checked_by_this_process`), and the rewards are all-gathered, so every process feeds the update the same
batch. The update is the same jitted program on the same global mesh as training (FSDP over hosts). Nothing drawn
depends on the process count: a 2-process run equals the 1-process run on the same mesh (tests/test_multihost.py).
"""
from __future__ import annotations

import copy
import dataclasses
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

from ssft_jax import (
    assembly,
    checkers,
    checkpoint as ckpt_lib,
    config as config_lib,
    datasets,
    gfpo_estimators,
    gfpo_memory,
    lora as lora_lib,
    mesh as mesh_lib,
    metrics_log,
    quant,
    run_common,
    sampling,
    tag_policy,
    tokenization,
    train_state,
)
from ssft_jax.data import DataError, RawRecord, read_records
from ssft_jax.data.formats import read_source
from ssft_jax.model import ModelConfig
from ssft_jax.step_jit import CountedJit, keep_if_finite

logger = logging.getLogger(__name__)

# A user's reward: (record, generated text after the tag, the checker's result) -> float.
RewardFn = Callable[[Mapping[str, Any], str, checkers.CheckResult], float]

# Sections of the SSFT run's config that describe the model GFPO trains: they replace the GFPO config's own
# (`lora`: a LoRA SSFT run's adapters are what GFPO moves, its base stays frozen).
INIT_SECTIONS = ("model", "tokenizer", "ssft", "lora")


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
        lm = assembly.load_checkpoint_for_generation(path, mesh=mesh, merge_lora=False)
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
            config.lora.enabled = False  # an HF folder is a whole model: GFPO trains its weights
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


def as_question_record(rec: Mapping[str, Any]) -> Mapping[str, Any]:
    """A prompt-only row in the shape checkers and rendering read: 'prompt' as 'question' (a string) or 'messages'
    (a chat), the answer under 'answer' (DAPO-17k rows keep it in reward_model.ground_truth)."""
    out = dict(rec)
    if out.get("answer") in (None, "") and isinstance(out.get("reward_model"), Mapping):
        out["answer"] = out["reward_model"].get("ground_truth")
    prompt = out.get("prompt")
    if not out.get("question") and not out.get("messages") and prompt:
        out["question" if isinstance(prompt, str) else "messages"] = prompt
    return out


def gfpo_sources(spec: str) -> list[str] | None:
    """The prompts' files named by gfpo.data, or None for 'init' / 'config' (the questions of a data section)."""
    if spec in config_lib.GFPO_DATA:
        return None
    return [s.strip() for s in str(spec).split(",") if s.strip()]


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
                rec = as_question_record(rec)
                if rec.get("answer") in (None, ""):
                    raise ValueError("no 'answer' to check rollouts against")
                prompt = rec.get("messages") or rec.get("question")
                if not prompt:
                    raise ValueError("no 'question' (or 'prompt', 'messages')")
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
    the behaviour policy logp_old [B, N]), by the registered estimator (`gfpo_estimators`)."""
    return gfpo_estimators.get(estimator).advantages(rewards, row_tags, logp_old, valid,
                                                     samples_per_tag=samples_per_tag, eps=eps,
                                                     normalize_std=normalize_std)


def make_update(cfg: ModelConfig, g: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
                lora_spec: lora_lib.LoraSpec | None = None):
    """The pure update `(state, batch, choice_ids[, frozen]) -> (state, metrics)`.

    batch: tokens [B, W] / lengths [B] (prompt + tag prefix), valid [B, N], logp_old [B, N] (the policy the rollouts
    were drawn from), logp_ref [B, N] (the SSFT model's), row_tags [B, R], rewards [B, R]. With `lora_spec` the
    state's params are the adapters (and tag rows) and the frozen base is the fourth argument, never differentiated
    (no LoRA dropout here: pi and pi_old must be the same function for the ratio to mean anything)."""
    estimator, U = g.estimator, int(g.updates_per_batch)

    def step_fn(state, batch, choice_ids, *frozen):
        def model_weights(params):
            return params if lora_spec is None else lora_lib.adapted_params(cfg, lora_spec, frozen[0], params)

        valid = batch["valid"]
        adv, weights = advantages_and_weights(
            estimator, batch["rewards"], batch["row_tags"], batch["logp_old"], valid,
            samples_per_tag=int(g.samples_per_tag), eps=float(g.adv_eps), normalize_std=bool(g.normalize_std))
        logp_old_sel = jnp.take_along_axis(batch["logp_old"], batch["row_tags"], axis=-1)

        def loss_fn(params):
            logp = tag_policy.tag_log_probs(cfg, model_weights(params), batch["tokens"], batch["lengths"], choice_ids,
                                            valid)
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
            return ((keep_if_finite(finite, new_params, params), keep_if_finite(finite, new_opt, opt_state)),
                    (loss, grad_norm, finite, aux))

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


def jit_update(step_fn, state, batch_example: Mapping[str, np.ndarray], mesh, frozen=None) -> CountedJit:
    """The one jit site of the stage: explicit shardings from the live state, questions split over the mesh's
    data axes, the old state donated; called as update(state, batch, choice_ids[, frozen]) with the batch placed by
    `place_batch` (`frozen`: a LoRA run's base, sharded as it lies)."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    replicated = NamedSharding(mesh, P())
    frozen_shardings = () if frozen is None else (jax.tree.map(lambda x: x.sharding, frozen),)
    return CountedJit(step_fn, mesh, in_shardings=(state_shardings, _batch_shardings(batch_example, mesh), replicated,
                                                   *frozen_shardings),
                      out_shardings=(state_shardings, replicated))


def _batch_shardings(batch: Mapping[str, np.ndarray], mesh) -> dict:
    return {k: mesh_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def place_batch(batch: Mapping[str, np.ndarray], mesh) -> dict:
    """The update's host batch (every process holds all of it) on the mesh, questions split over the data axes."""
    return {k: mesh_lib.rows_on_mesh(v, mesh) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------
# Rollouts (host-driven; the sampler and the policy are jitted)
# ---------------------------------------------------------------------------------------------------------------

def draw_row_tags(estimator: str, p_old: np.ndarray, valid: np.ndarray, *, group_size: int, samples_per_tag: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[B, R] tag of every rollout, as the estimator draws them (grpo: G draws from each question's pi_old;
    enumerate: each valid tag k times, the same rows for every question)."""
    return gfpo_estimators.get(estimator).draw(p_old, valid, group_size=group_size, samples_per_tag=samples_per_tag,
                                               rng=rng)


def has_learning_signal(rewards: np.ndarray) -> bool:
    """Whether any question's rollouts [B, R] got different (finite) rewards: GRPO's group-centred advantages
    (and the enumerate estimator's baseline-subtracted ones) are all 0 otherwise."""
    for row in np.asarray(rewards, np.float64):
        finite = row[np.isfinite(row)]
        if finite.size > 1 and np.ptp(finite) > 0:
            return True
    return False


def policy_reward(estimator: str, rewards: np.ndarray, row_tags: np.ndarray, logp_old: np.ndarray) -> float:
    """The mean reward of the policy the rollouts came from (the estimator's rule: the rollouts' mean under grpo,
    sum_t pi_old(t) rbar_t under enumerate); NaN when a reward is not finite."""
    if not np.isfinite(rewards).all():
        return float("nan")
    return gfpo_estimators.get(estimator).policy_reward(rewards, row_tags, logp_old)


class Rollouts:
    """Rollouts of one step: the tag of each, its reward, whether it was correct / answered, and the token count."""

    def __init__(self, row_tags: np.ndarray, rewards: np.ndarray, correct: np.ndarray, answered: np.ndarray,
                 tokens: int):
        self.row_tags, self.rewards, self.correct, self.answered = row_tags, rewards, correct, answered
        self.tokens = tokens


def checker_of_each_question(num_questions: int) -> np.ndarray:
    """[B] the process that decodes and checks each question of the step: contiguous shares, so the host-side work
    (detokenizing, math checking, a user's reward_fn) is split over the hosts."""
    return np.repeat(np.arange(jax.process_count()), [len(part) for part in np.array_split(
        np.arange(num_questions), jax.process_count())])


def checked_by_this_process(num_questions: int) -> np.ndarray:
    """The questions (positions in the step's batch) this process checks (`checker_of_each_question`)."""
    return np.flatnonzero(checker_of_each_question(num_questions) == jax.process_index())


def gather_checked(local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each process's checked rows ([B, ...] arrays, filled at its own share) -> the whole arrays on every process."""
    if jax.process_count() == 1:
        return dict(local)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather({k: np.asarray(v) for k, v in local.items()})  # [P, B, ...]
    owner = checker_of_each_question(len(next(iter(local.values()))))
    return {k: np.asarray(v)[owner, np.arange(len(owner))] for k, v in gathered.items()}


def rollout_chunk(batch: int, mesh) -> int:
    """Questions per sampler call (`gfpo_memory.rollout_chunk`, which the plan uses too), for the mesh's
    data-parallel size: a function of the mesh, not of the process count."""
    return gfpo_memory.rollout_chunk(batch, 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"])


def roll_out(cfg, params, tokenizer, choice: tag_policy.TagChoice, questions: Questions, idx: np.ndarray,
             row_tags: np.ndarray, checker: checkers.Checker, g, *, eos_token_ids, vocab_limit, seed: int,
             reward_fn: RewardFn | None = None, mesh=None) -> Rollouts:
    """Generate the rows `row_tags` [B, R] (prompt + the tag's tokens + a sampled answer) and score them.

    Questions go to the sampler `rollout_chunk` at a time (the last chunk padded by repeating a question: one
    compile), each chunk with its own seed derived from `seed`. With a mesh over several processes, every process
    makes the same calls (the rows split over the devices), checks its own share of the questions
    (`checked_by_this_process`) and the results are all-gathered."""
    B, R = row_tags.shape
    max_new = int(g.max_new_tokens)
    rewards = np.zeros((B, R), np.float32)
    correct = np.zeros((B, R), bool)
    answered = np.zeros((B, R), bool)
    tokens = np.zeros((B, R), np.int64)
    mine = set(checked_by_this_process(B).tolist())
    chunk = rollout_chunk(B, mesh)
    for c, start in enumerate(range(0, B, chunk)):
        rows = list(range(start, min(start + chunk, B)))
        pad = [rows[-1]] * (chunk - len(rows))
        prompts = [questions.prompts[idx[b]] for b in rows + pad]
        suffixes = [[list(choice.tag_ids[t]) for t in row_tags[b]] for b in rows + pad]
        outs = sampling.generate_rows(cfg, params, prompts, suffixes, max_new_tokens=max_new,
                                      eos_token_ids=eos_token_ids, temperature=float(g.temperature),
                                      top_k=int(g.top_k), top_p=float(g.top_p), seed=seed * 1009 + c,
                                      vocab_limit=vocab_limit, mesh=mesh)
        for j, b in enumerate(rows):
            if b not in mine:
                continue
            rec = questions.records[idx[b]]
            for r, gen in enumerate(outs[j]):
                body = gen.tokens[:-1] if gen.finished else gen.tokens
                text = tokenizer.decode(body, skip_special_tokens=True)
                res = checker(rec, text)
                tokens[b, r] = len(gen.tokens)
                correct[b, r], answered[b, r] = res.correct, res.answer is not None
                if reward_fn is not None:
                    rewards[b, r] = float(reward_fn(rec, text, res))
                else:
                    rewards[b, r] = float(res.correct) - (0.0 if res.answer is not None else float(g.format_penalty))
    whole = gather_checked({"rewards": rewards, "correct": correct, "answered": answered, "tokens": tokens})
    return Rollouts(row_tags, whole["rewards"], whole["correct"], whole["answered"], int(whole["tokens"].sum()))


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
    r = open_gfpo(config, epath.Path(workdir), checker)
    config, g = r.config, r.config.gfpo
    metrics_logger = run_common.open_logger(config, r.workdir, r.start, r.config_json)
    guard = ckpt_lib.PreemptionGuard()
    bar = run_common.progress_bar(progress, int(g.num_steps), r.start, f"gfpo/{g.estimator}")
    B, N = int(g.questions_per_step), r.lm.tags.n
    consecutive_skips = int(r.state["consecutive_skips"])
    no_signal_steps = 0  # this process's steps whose rewards gave no learning signal (warned about)
    t0, stopped_early, step = time.perf_counter(), False, r.start
    with run_common.loop_cleanup(r.checkpointer, guard, metrics_logger, bar):
        while step < g.num_steps:
            if guard.should_stop(step) or (stop_after is not None and step - r.start >= stop_after):
                stopped_early = True
                break
            r.checkpointer.check()
            idx = r.questions.indices(step, B, int(config.seed))
            tokens, lengths = tag_policy.policy_rows([r.questions.prompts[i] for i in idx], r.choice.prefix_ids,
                                                     r.width)
            t_roll = time.perf_counter()
            logp_old = tag_policy.log_probs_on_mesh(r.lm.cfg, r.model_params(), tokens, lengths,
                                                    r.choice.choice_ids, r.valid, r.mesh)
            rng = np.random.default_rng([int(config.seed), step, 17])
            row_tags = draw_row_tags(g.estimator, np.exp(logp_old), r.valid, group_size=int(g.group_size),
                                     samples_per_tag=int(g.samples_per_tag), rng=rng)
            ro = roll_out(r.lm.cfg, r.rollout_params(), r.lm.tokenizer, r.choice, r.questions, idx, row_tags,
                          r.checker, g, eos_token_ids=r.lm.eos_token_ids, vocab_limit=r.lm.vocab_limit,
                          seed=int(config.seed) * 100_003 + step, reward_fn=reward_fn, mesh=r.mesh)
            t_upd = time.perf_counter()
            batch = {"tokens": tokens, "lengths": lengths, "valid": np.broadcast_to(r.valid, (B, N)),
                     "logp_old": logp_old, "logp_ref": r.logp_ref[idx], "row_tags": row_tags, "rewards": ro.rewards}
            r.state, metrics = r.update(r.state, place_batch(batch, r.mesh), r.choice_ids, *r.frozen_args)
            metrics = jax.device_get(metrics)
            t_end = time.perf_counter()
            step += 1
            record = step_record(r, step, metrics, ro, row_tags, logp_old, t_upd - t_roll, t_end - t_upd)
            consecutive_skips = consecutive_skips + 1 if metrics["step_skipped"] else 0
            if record["no_signal"]:
                no_signal_steps += 1
                if no_signal_steps == 1 or no_signal_steps % 10 == 0:
                    logging.warning(
                        "GFPO step %d: every question's rollouts got the same reward (mean %.3f): no learning signal, "
                        "the update is zero (%d such step(s) so far). All 0 usually means the answers are never "
                        "right or never extracted: check the checker, gfpo.max_new_tokens and the answer format",
                        step, r.stats.rewards[step], no_signal_steps)
            metrics_logger.write(step, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{r.stats.rewards[step]:.3f}", H=f"{metrics['entropy']:.2f}")
            if consecutive_skips > config.max_consecutive_skips:
                raise run_common.TrainingDivergedError(
                    f"GFPO diverged: {consecutive_skips} consecutive steps (up to step {step}) had a non-finite "
                    f"reward, loss or gradient, more than max_consecutive_skips={config.max_consecutive_skips}; none "
                    f"changed the weights. The latest checkpoint is step {r.checkpointer.latest_step()}; check the "
                    "reward function or lower gfpo.optim.learning_rate")
            if run_common.should_save(step, config, int(g.num_steps)):
                save(r, step)
        save(r, step, force=True)
        r.checkpointer.wait()
    elapsed = time.perf_counter() - t0
    export_dir = None
    if config.export_hf and not stopped_early:
        export_dir = run_common.export_model(r.workdir, config, r.lm.cfg, r.state["params"], r.lm.tokenizer, r.lm.tags,
                                             lora_spec=r.lm.lora_spec, frozen=r.lm.frozen)
    return finish(r, step, stopped_early, elapsed, export_dir)


@dataclasses.dataclass
class GfpoRun:
    """Everything `run` builds before its loop (`open_gfpo`); `state` is the live train state."""
    config: ml_collections.ConfigDict  # with the SSFT run's model, tags and data filled in (`load_init`)
    workdir: epath.Path
    mesh: Any
    checkpointer: ckpt_lib.Checkpointer
    config_json: dict
    lm: assembly.LoadedModel  # its params are the state's now
    questions: Questions
    checker: checkers.Checker
    choice: tag_policy.TagChoice
    choice_ids: jax.Array
    valid: np.ndarray  # [N] the tags the policy may choose
    width: int  # policy rows: prompt + tag prefix, bucketed
    logp_ref: np.ndarray  # [questions, N] the SSFT model's tag policy, for the KL term
    schedule: Callable
    state: dict
    start: int
    stats: Any  # RunStats
    update: CountedJit
    rollout_s: float = 0.0
    update_s: float = 0.0
    decoding_copy: Callable | None = None  # gfpo.rollout_weights="replicated": the jitted copy (`rollout_params`)

    def model_params(self) -> dict:
        """The weights the model runs with now (rollouts, the policy): a LoRA run's base with the adapters applied
        inside the layer scan (no merged copy of the base)."""
        return model_params(self.lm, self.state["params"])

    def rollout_params(self) -> dict:
        """The weights the sampler decodes with (`gfpo.rollout_weights`): the model's own, or a copy of them split
        over `tensor` only, its matrices in the compute dtype (`make_decoding_copy`)."""
        params = self.model_params()
        if self.config.gfpo.rollout_weights != "replicated":
            return params
        if self.decoding_copy is None:
            self.decoding_copy = make_decoding_copy(params, self.lm.cfg.dtype)
        return self.decoding_copy(params)

    @property
    def frozen_args(self) -> tuple:
        return () if self.lm.lora_spec is None else (self.lm.frozen,)


def _without_data_axes(sharding: NamedSharding) -> NamedSharding:
    """The sharding with the data-parallel axes ('data', 'fsdp') dropped: replicated over them, split over 'tensor'
    as before (a sharding that is not on a mesh stays as it is)."""
    if not isinstance(sharding, NamedSharding):
        return sharding

    def keep(entry):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(a for a in names if a not in ("data", "fsdp"))
        return None if not names else names[0] if len(names) == 1 else names
    return NamedSharding(sharding.mesh, P(*(keep(e) for e in sharding.spec)))


def make_decoding_copy(params, dtype: str) -> Callable:
    """A jitted `params -> copy` for decoding: every array replicated over the data-parallel axes (no FSDP
    all-gather per decoded token), matrices cast to the compute dtype, which `forward` casts them to anyway (vectors
    keep theirs: the norms compute in fp32). A QLoRA base's quantized arrays are moved as they are.
    Built once per run (one compile); the training state is untouched."""
    shardings = jax.tree.map(lambda x: _without_data_axes(x.sharding), params)
    target = jnp.dtype(dtype)

    def matrix(path, x) -> bool:  # per-layer weights carry a leading 'layers' axis
        stacked = any(getattr(k, "key", None) == "layers" for k in path)
        return x.ndim - stacked >= 2 and jnp.issubdtype(x.dtype, jnp.floating)

    def copy(p):  # a QLoRA base's QArrays (values and scales) move as they are
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.astype(target) if not quant.is_quantized(x) and matrix(path, x) else x, p,
            is_leaf=quant.is_quantized)
    return jax.jit(copy, out_shardings=shardings)


def model_params(lm: assembly.LoadedModel, params) -> dict:
    """What `model.forward` reads: `params` themselves, or a LoRA run's frozen base adapted by them."""
    return params if lm.lora_spec is None else lora_lib.adapted_params(lm.cfg, lm.lora_spec, lm.frozen, params)


def open_gfpo(config: ml_collections.ConfigDict, workdir: epath.Path, checker) -> GfpoRun:
    """Config checked, mesh, the SSFT model (`load_init`), run files, questions, the reference policy, optimizer
    and state (restored when there is a checkpoint) and the jitted update."""
    mesh_lib.maybe_initialize_distributed()
    if config.get("stage", "ssft") != "gfpo":
        raise config_lib.ConfigError(f"stage={config.get('stage', 'ssft')!r}: this is not a GFPO config (use "
                                     "configs/gfpo_demo.py as a template, or --config.stage=gfpo)")
    m = config.mesh
    devices = jax.devices()[: m.num_devices or None]
    mesh = mesh_lib.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    config, lm = load_init(config, mesh)
    config_lib.validate(config, len(devices))
    if gfpo_sources(config.gfpo.data) is None:  # the prompts files are read (and named) by gfpo_questions
        datasets.check_source(config)
    g = config.gfpo
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if g.questions_per_step % dp:
        raise config_lib.ConfigError(f"gfpo.questions_per_step={g.questions_per_step} must be divisible by the "
                                     f"mesh's data-parallel size {dp}")
    with config.unlocked():
        if not g.max_new_tokens:
            g.max_new_tokens = int(config.data.max_trace_len)
    checkpointer, config_json = run_common.open_run(config, workdir)

    tokenizer, tags = lm.tokenizer, lm.tags
    if jax.process_index() == 0 and not metrics_log.is_remote(workdir):
        tokenization.save_tokenizer(tokenizer, pathlib.Path(str(workdir / "tokenizer")), tags=tags)
    choice = tag_policy.TagChoice.for_tags(tokenizer, tags)
    valid = valid_tags(g.valid_tags, tags.n, lm.tag_counts)
    if valid.sum() < 2:
        logger.warning("GFPO: only tag(s) %s are valid: the policy has nothing to choose between",
                       np.flatnonzero(valid).tolist())
    questions = gfpo_questions(config, tokenizer, tags)
    # the caller's checker (the demo's --checker for a user's file), else gfpo.checker, else the dataset's (a
    # prompts file: math, the paper's RL data)
    default = "math" if gfpo_sources(g.data) is not None else datasets.get_dataset(config.data.name).checker
    checker = checkers.get_checker(checker or g.checker or default)
    B, N = int(g.questions_per_step), tags.n
    width = sampling.bucket_length(max(len(p) for p in questions.prompts) + len(choice.prefix_ids))
    # The reference policy (the SSFT model), for the KL term and its log: once, before any update donates weights.
    logp_ref = tag_policy.TagPolicy(lm.cfg, model_params(lm, lm.params), choice, valid, batch=B,
                                    mesh=mesh).log_probs(questions.prompts)

    updates = int(g.num_steps) * int(g.updates_per_batch)
    optimizer = assembly.make_optimizer(config, updates)
    state = train_state.init_state(lm.params, optimizer, config.seed, mesh)
    del lm.params
    restored, stats = run_common.restore(checkpointer, state, config, num_tags=N, per_step="rewards",
                                         data=_check_data_item)
    start = 0
    if restored is not None:
        start, state, data_state = restored.step, restored.state, restored.data
        if data_state["questions"] != len(questions):
            raise config_lib.ConfigError(f"the checkpoint's run had {data_state.get('questions')} GFPO questions, "
                                         f"this config gives {len(questions)}: use the run's data or a new --workdir")
        logging.info("GFPO: resumed from step %d", start)
    R = gfpo_memory.rollout_rows(g, int(valid.sum()))
    example = {"tokens": np.zeros((B, width), np.int32), "lengths": np.ones((B,), np.int32),
               "valid": np.zeros((B, N), bool), "logp_old": np.zeros((B, N), np.float32),
               "logp_ref": np.zeros((B, N), np.float32), "row_tags": np.zeros((B, R), np.int32),
               "rewards": np.zeros((B, R), np.float32)}
    update = jit_update(make_update(lm.cfg, g, optimizer, lm.lora_spec), state, example, mesh, frozen=lm.frozen)
    if lm.lora_spec is not None:
        logging.info("GFPO from a LoRA run: %d trainable parameters (adapters%s), the base frozen",
                     lora_lib.trainable_count(lm.cfg, lm.lora_spec),
                     " and tag rows" if lm.lora_spec.tag_token_ids else "")
    return GfpoRun(config, workdir, mesh, checkpointer, config_json, lm, questions, checker, choice,
                   mesh_lib.replicated_on_mesh(np.asarray(choice.choice_ids, np.int32), mesh), valid, width, logp_ref,
                   train_state.learning_rate_schedule(g.optim, updates), state, start, stats, update)


def gfpo_questions(config, tokenizer, tags) -> Questions:
    """The stage's questions (prompts with their records): the prompts' own files (gfpo.data; rows as they are,
    each named file:line), else the config's data section."""
    sources = gfpo_sources(config.gfpo.data)
    if sources is not None:
        train_records = [row for s in sources for row in read_source(s)]
    else:
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
    return questions


def step_record(r: GfpoRun, step: int, metrics: dict, ro: Rollouts, row_tags: np.ndarray, logp_old: np.ndarray,
                rollout_s: float, update_s: float) -> dict:
    """One step's metrics.jsonl record; also counts the step into the run statistics and timers."""
    g, stats, N, valid = r.config.gfpo, r.stats, r.lm.tags.n, r.valid
    r.rollout_s += rollout_s
    r.update_s += update_s
    stats.rollout_tokens += ro.tokens
    if metrics["step_skipped"]:
        stats.skipped_steps.append(step)
    finite = ro.rewards[np.isfinite(ro.rewards)]
    stats.rewards[step] = float(finite.mean()) if finite.size else float("nan")
    record = {k: v for k, v in metrics.items() if k != "pi"}
    record.update(
        reward=stats.rewards[step], policy_reward=policy_reward(g.estimator, ro.rewards, row_tags, logp_old),
        accuracy=float(ro.correct.mean()), answer_rate=float(ro.answered.mean()),
        rewards_nonfinite=int((~np.isfinite(ro.rewards)).sum()), steps_skipped_total=len(stats.skipped_steps),
        rollout_tag_counts=np.bincount(row_tags.ravel(), minlength=N),
        greedy_tag_counts=np.bincount(np.argmax(np.where(valid, logp_old, -np.inf), -1), minlength=N),
        pi_mean=metrics["pi"], rollout_seconds=rollout_s, update_seconds=update_s,
        rollout_tokens=ro.tokens, rollout_tokens_per_s=ro.tokens / max(rollout_s, 1e-9),
        lr=float(r.schedule((step - 1) * int(g.updates_per_batch))))
    # GRPO learns from reward differences inside a question's group: none anywhere means a zero update
    record["no_signal"] = int(not has_learning_signal(ro.rewards))
    for t in range(N):
        sel = row_tags == t
        finite = ro.rewards[sel][np.isfinite(ro.rewards[sel])]
        if finite.size:  # tags without a (finite) rollout this step get no point, not a NaN
            record[f"reward_tag{t}"] = float(finite.mean())
    return record


def save(r: GfpoRun, step: int, *, force: bool = False) -> None:
    r.checkpointer.save(step, r.state, data_state={"step": step, "questions": len(r.questions)},
                        config=r.config_json, stats=r.stats.to_json(), force=force)


def finish(r: GfpoRun, step: int, stopped_early: bool, elapsed: float, export_dir) -> dict[str, Any]:
    g, stats, lm = r.config.gfpo, r.stats, r.lm
    summary = {
        "stage": "gfpo", "method": r.config.ssft.method, "estimator": g.estimator, "init_from": g.init_from,
        "start_step": r.start, "final_step": step, "stopped_early": stopped_early,
        "rewards": dict(stats.rewards), "valid_tags": np.flatnonzero(r.valid).tolist(),
        # the SSFT run's matching statistics, so evaluation's coverage tag and 'used' tags mean the same here
        "tag_counts": list(lm.tag_counts) if lm.tag_counts is not None else None,
        "steps_skipped": len(stats.skipped_steps), "skipped_steps": list(stats.skipped_steps),
        **({"stats_cover_steps_from": stats.since + 1} if stats.since else {}), "seconds": elapsed,
        "rollout_seconds": r.rollout_s, "update_seconds": r.update_s, "rollout_tokens": stats.rollout_tokens,
        "compiles": r.update.compiles, "questions": len(r.questions), "skipped_records": r.questions.skipped,
        "trained": "lora adapters" if lm.lora_spec is not None else "all weights",
        "export_dir": str(export_dir) if export_dir else None,
    }
    summary.update(run_common.publish_export(export_dir, r.config, summary))
    if jax.process_index() == 0:
        run_common.write_summary(r.workdir, summary)
    r.checkpointer.close()
    return {**summary, "state": r.state, "model_config": lm.cfg, "tokenizer": lm.tokenizer, "tags": lm.tags,
            **({"lora": lm.lora_spec, "frozen": lm.frozen} if lm.lora_spec is not None else {})}


def cli() -> None:
    """`ssft-gfpo` / `python -m ssft_jax.gfpo`."""
    from absl import flags

    def init_from_flag():
        flags.DEFINE_string("init_from", "", "the SSFT model: a training workdir or an HF folder (sets "
                            "gfpo.init_from)")

    def apply_init_from(config, FLAGS):
        if FLAGS.init_from:
            config.gfpo.init_from = FLAGS.init_from

    run_common.stage_cli(run, config_help="a GFPO config file (configs/gfpo_demo.py), fields overridden with "
                         "--config.gfpo.a=value", workdir_help="where GFPO's checkpoints, logs and HF export go",
                         extra_flags=init_from_flag, apply_flags=apply_init_from)


if __name__ == "__main__":
    cli()
