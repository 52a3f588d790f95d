"""The forking-tag policy pi(tag | x) and the pure math of optimising it (GFPO's loss terms).

The policy is the model's distribution over the N tags at the position where the tags first differ:

* special mode: each tag is one added token, read right after the prompt;
* text mode (`<|im_start|><think3>\\n`): the tags share a token prefix (`<|im_start|><think`); the policy is read at
  the end of prompt + that prefix, over the one token that differs (the digit), restricted to the N tags.

Either way it is N logits gathered from one position of a prompt-only forward, renormalised over the valid tags
(invalid ones get probability 0). Everything after the divergence token (`>\\n`) is teacher-forced when a tag is
rolled out, and gets no gradient: the whole distribution is N numbers, so the KL to a reference policy is exact.

Pure functions over arrays (jittable, batched over questions) beside one host-side helper, `TagPolicy`, which
renders prompts and evaluates the policy for a list of questions (evaluation's self-chosen tag, GFPO's rollouts).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssft_jax.model import ModelConfig, Params, forward, logits_from_hidden


class TagPolicyError(ValueError):
    """The tags cannot be read as one categorical choice (their first differing tokens are not all distinct)."""


@dataclasses.dataclass(frozen=True)
class TagChoice:
    """How the N tags of a tokenizer form one categorical choice.

    prefix_ids: tokens every tag starts with (empty in special mode); choice_ids[i]: the token at which tag i
    departs from that prefix; tag_ids[i]: tag i's full token ids (what a rollout teacher-forces after the prompt)."""

    prefix_ids: tuple[int, ...]
    choice_ids: tuple[int, ...]
    tag_ids: tuple[tuple[int, ...], ...]

    @property
    def n(self) -> int:
        return len(self.choice_ids)

    @classmethod
    def from_tag_ids(cls, tag_ids: Sequence[Sequence[int]]) -> "TagChoice":
        ids = [tuple(int(t) for t in x) for x in tag_ids]
        if not ids or any(len(x) == 0 for x in ids):
            raise TagPolicyError("every forking tag needs at least one token")
        k = 0
        while all(len(x) > k for x in ids) and len({x[k] for x in ids}) == 1:
            k += 1
        if len(ids) == 1:  # one tag: the choice is trivial; read it at its last token
            k = len(ids[0]) - 1
        if any(len(x) <= k for x in ids) or len({x[k] for x in ids}) != len(ids):
            raise TagPolicyError(
                f"the {len(ids)} tags do not differ in one token after a shared prefix of {k} tokens (token ids "
                f"{[list(x) for x in ids]}): the policy over tags needs one distinct token per tag at the divergence "
                "point (e.g. <think1> and <think10> both continue with the token '1' in a digit-level tokenizer); use "
                "ssft.tag_mode='special' (one added token per tag) or at most 9 text tags")
        return cls(ids[0][:k], tuple(x[k] for x in ids), tuple(ids))

    @classmethod
    def for_tags(cls, tokenizer, tags) -> "TagChoice":
        return cls.from_tag_ids(tags.all_tag_ids(tokenizer))


# ---------------------------------------------------------------------------------------------------------------
# Pure functions (jittable)
# ---------------------------------------------------------------------------------------------------------------

def masked_log_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """log-softmax over the last axis restricted to `valid` (invalid entries -inf, probability exactly 0)."""
    logits = jnp.where(valid, logits.astype(jnp.float32), -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def tag_log_probs(cfg: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array, choice_ids: jax.Array,
                  tag_valid: jax.Array) -> jax.Array:
    """[B, N] log pi(tag | x): tokens [B, W] = prompt + shared tag prefix, right-padded (`lengths` real tokens);
    the N choice tokens' logits at the last real position, log-softmaxed over `tag_valid` ([N] or [B, N]).

    Only the last position goes through the output head ([B, 1, D] x [D, V]); the rest of the row is the prompt's
    forward, the only part of a GFPO update that carries gradient."""
    seg = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
    hidden = forward(cfg, params, tokens, seg, return_hidden=True)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    logits = logits_from_hidden(cfg, params, last)[:, 0]  # [B, V] fp32
    return masked_log_softmax(jnp.take(logits, choice_ids, axis=-1), jnp.broadcast_to(tag_valid, logits.shape[:1]
                                                                                       + choice_ids.shape))


def _where_valid(x: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.where(valid, x, 0.0)


def entropy(logp: jax.Array, valid: jax.Array) -> jax.Array:
    """[B] H(pi) in nats over the valid tags."""
    return -jnp.sum(_where_valid(jnp.exp(logp) * logp, valid), axis=-1)


def exact_kl(logp: jax.Array, logp_ref: jax.Array, valid: jax.Array) -> jax.Array:
    """[B] KL(pi || pi_ref) = sum_i pi_i (log pi_i - log pi_ref_i), the exact sum over the valid tags."""
    return jnp.sum(_where_valid(jnp.exp(logp) * (logp - logp_ref), valid), axis=-1)


def group_advantages(rewards: jax.Array, *, eps: float = 1e-6, normalize_std: bool = True) -> jax.Array:
    """GRPO: A = (r - mean_group) / (std_group + eps) over the last axis ([B, G] rewards -> [B, G]); without
    normalize_std only the mean is subtracted. A group whose rewards are all equal has A = 0 (it teaches nothing)."""
    centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    if not normalize_std:
        return centred
    return centred / (jnp.std(rewards, axis=-1, keepdims=True) + eps)


def enumerate_advantages(tag_rewards: jax.Array, p_old: jax.Array, valid: jax.Array) -> jax.Array:
    """The exact policy gradient's per-tag advantages: A_i = rbar_i - sum_j pi_old_j rbar_j (tag_rewards: each valid
    tag's mean reward [B, N]; the baseline changes no gradient since sum_i pi_i grad log pi_i = 0, it only keeps
    the terms small). Invalid tags: 0."""
    r = _where_valid(tag_rewards, valid)
    return _where_valid(r - jnp.sum(p_old * r, axis=-1, keepdims=True), valid)


def clipped_surrogate(logp_sel: jax.Array, logp_old_sel: jax.Array, advantages: jax.Array, weights: jax.Array,
                      clip_eps: float) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped objective per question: sum_r w_r min(rho_r A_r, clip(rho_r, 1-eps, 1+eps) A_r), rho_r =
    pi(tag_r)/pi_old(tag_r); [B, R] inputs -> ([B] objective, [B] fraction of weight clipped). At rho = 1 (the first
    update on a batch) its gradient is sum_r w_r A_r grad log pi(tag_r)."""
    ratio = jnp.exp(logp_sel - logp_old_sel)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = jnp.sum(weights * jnp.minimum(unclipped, clipped), axis=-1)
    was_clipped = (clipped < unclipped).astype(jnp.float32)
    return objective, jnp.sum(weights * was_clipped, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Host side: prompts -> policy inputs -> log-probs
# ---------------------------------------------------------------------------------------------------------------

def used_tags(tag_counts: Sequence[int] | None, num_tags: int) -> np.ndarray:
    """[N] bool: the tags an SSFT run's matching ever assigned (`summary.json` tag_counts > 0); all N when the
    statistics are unknown or empty. The other tags never trained on a trace, so choosing them wastes samples."""
    if tag_counts is not None and len(tag_counts) == num_tags and any(tag_counts):
        return np.asarray(tag_counts) > 0
    return np.ones(num_tags, bool)


def policy_rows(
    prompts: Sequence[Sequence[int]], prefix_ids: Sequence[int], width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, width], lengths [B]): each prompt followed by the tags' shared prefix, right-padded with 0."""
    out = np.zeros((len(prompts), width), np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
        row = list(p) + list(prefix_ids)
        if len(row) > width:
            raise ValueError(f"prompt {i}: {len(p)} tokens + {len(prefix_ids)} tag-prefix tokens exceed width={width}")
        out[i, : len(row)] = row
        lengths[i] = len(row)
    return out, lengths


@functools.partial(jax.jit, static_argnames=("cfg",))
def jitted_log_probs(cfg, params, tokens, lengths, choice_ids, tag_valid):
    return tag_log_probs(cfg, params, tokens, lengths, choice_ids, tag_valid)


class TagPolicy:
    """pi(tag | x) of a model for lists of prompts: `log_probs(prompts)` -> [B, N] numpy, batches padded to a fixed
    size and widths bucketed to powers of two, so a run compiles a handful of shapes."""

    def __init__(self, cfg: ModelConfig, params: Params, choice: TagChoice, tag_valid: Sequence[bool] | None = None,
                 *, batch: int = 16, mesh=None):
        self.cfg, self.params, self.choice, self.batch, self.mesh = cfg, params, choice, batch, mesh
        self.tag_valid = np.ones(choice.n, bool) if tag_valid is None else np.asarray(tag_valid, bool)
        if not self.tag_valid.any():
            raise ValueError("tag_valid: at least one tag must be valid")

    def log_probs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        from ssft_jax.sampling import bucket_length

        if not prompts:
            return np.zeros((0, self.choice.n), np.float32)
        width = bucket_length(max(len(p) for p in prompts) + len(self.choice.prefix_ids))
        out = []
        for s in range(0, len(prompts), self.batch):
            chunk = list(prompts[s: s + self.batch])
            chunk += [chunk[-1]] * (self.batch - len(chunk))
            tokens, lengths = policy_rows(chunk, self.choice.prefix_ids, width)
            out.append(log_probs_on_mesh(self.cfg, self.params, tokens, lengths, self.choice.choice_ids,
                                         self.tag_valid, self.mesh))
        return np.concatenate(out)[: len(prompts)]


def log_probs_on_mesh(cfg: ModelConfig, params: Params, tokens: np.ndarray, lengths: np.ndarray,
                      choice_ids: Sequence[int], tag_valid: np.ndarray, mesh=None) -> np.ndarray:
    """[B, N] log pi(tag | row) as a host array, every process holding all of it. mesh: the params' mesh when it
    spans several processes (each process passes the same rows; they are split over the data axes)."""
    from ssft_jax import mesh as mesh_lib

    lp = jitted_log_probs(cfg, params, mesh_lib.rows_on_mesh(np.asarray(tokens, np.int32), mesh),
                          mesh_lib.rows_on_mesh(np.asarray(lengths, np.int32), mesh),
                          mesh_lib.replicated_on_mesh(np.asarray(choice_ids, np.int32), mesh),
                          mesh_lib.replicated_on_mesh(np.asarray(tag_valid, bool), mesh))
    return mesh_lib.fetch(lp)
