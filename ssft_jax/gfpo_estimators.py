"""GFPO's policy-gradient estimators for the forking-tag policy, as a registry (`gfpo.estimator` names one).

An estimator says which tags a step rolls out per question (`draw`, `rollouts`), how each rollout's reward becomes
an advantage and a row weight in the update (`advantages`, pure jnp, inside the jitted update), and what "the
policy's reward" is for the logs (`policy_reward`). Built in:
  grpo       G tags sampled from pi per question; A = group-relative reward, weight 1/G (the paper's GFPO)
  enumerate  every valid tag k times; A_r = rbar(tag_r) - sum_j pi_old_j rbar_j, weight pi_old(tag_r)/k: the exact
             gradient of sum_i pi_i rbar_i at ratio 1 (no sampling noise from the tag draw)

A new estimator is one advantages function and one `register` line (tests/test_extension_points.py shows one);
the other parts default to sampling G tags from pi, as grpo does.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ssft_jax import tag_policy
from ssft_jax.registry import Registry

# (rewards [B, R], row_tags [B, R], logp_old [B, N], valid [B, N], *, samples_per_tag, eps, normalize_std)
#     -> (advantages [B, R], row weights [B, R])
AdvantagesFn = Callable[..., tuple[jax.Array, jax.Array]]


def draw_from_policy(p_old: np.ndarray, valid: np.ndarray, *, group_size: int, samples_per_tag: int,
                     rng: np.random.Generator) -> np.ndarray:
    """[B, G] tags drawn from each question's pi_old restricted to the valid tags."""
    del samples_per_tag
    p = np.where(valid, np.asarray(p_old, np.float64), 0.0)
    p /= p.sum(-1, keepdims=True)
    cdf = np.cumsum(p, -1)
    u = rng.random((p.shape[0], group_size)) * cdf[:, -1:]
    # tag = the number of cdf entries <= u: a zero-probability tag repeats its predecessor's cdf value, so no u
    # (0 <= u < total) stops on it
    tags = np.minimum((cdf[:, None, :] <= u[:, :, None]).sum(-1), p.shape[-1] - 1)
    return tags.astype(np.int32)


def group_size_rollouts(group_size: int, num_valid: int, samples_per_tag: int) -> int:
    del num_valid, samples_per_tag
    return int(group_size)


def mean_reward(rewards: np.ndarray, row_tags: np.ndarray, logp_old: np.ndarray) -> float:
    """The rollouts' mean reward: the policy's own, when they were drawn from it."""
    del row_tags, logp_old
    return float(rewards.mean())


@dataclasses.dataclass(frozen=True)
class Estimator:
    advantages: AdvantagesFn
    draw: Callable[..., np.ndarray] = draw_from_policy  # (p_old, valid, *, group_size, samples_per_tag, rng)
    rollouts: Callable[[int, int, int], int] = group_size_rollouts  # (group_size, num_valid, samples_per_tag) -> R
    policy_reward: Callable[[np.ndarray, np.ndarray, np.ndarray], float] = mean_reward  # finite rewards only
    min_group_size: int = 1  # gfpo.group_size below this is a config error


_REGISTRY: Registry[Estimator] = Registry("GFPO estimator")
register, unregister, names, get = _REGISTRY.register, _REGISTRY.unregister, _REGISTRY.names, _REGISTRY.get


# ---------------------------------------------------------------------------------------------------------------
# grpo
# ---------------------------------------------------------------------------------------------------------------

def grpo_advantages(rewards, row_tags, logp_old, valid, *, samples_per_tag: int, eps: float, normalize_std: bool):
    """A = group-relative reward; weight 1/G (the gradient is the mean over the G rollouts of A grad log pi)."""
    del row_tags, logp_old, valid, samples_per_tag
    adv = tag_policy.group_advantages(rewards, eps=eps, normalize_std=normalize_std)
    return adv, jnp.full(rewards.shape, 1.0 / rewards.shape[-1], jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# enumerate
# ---------------------------------------------------------------------------------------------------------------

def enumerate_advantages(rewards, row_tags, logp_old, valid, *, samples_per_tag: int, eps: float,
                         normalize_std: bool):
    """A_r = rbar(tag_r) - sum_j pi_old_j rbar_j and weight pi_old(tag_r)/k, so at ratio 1 the gradient is
    sum_i pi_i (rbar_i - b) grad log pi_i = grad sum_i pi_i rbar_i exactly (rbar: the mean of tag i's k rewards)."""
    del eps, normalize_std
    onehot = jax.nn.one_hot(row_tags, logp_old.shape[-1], dtype=jnp.float32)  # [B, R, N]
    tag_rewards = jnp.einsum("brn,br->bn", onehot, rewards) / samples_per_tag
    p_old = jnp.exp(logp_old)
    per_tag = tag_policy.enumerate_advantages(tag_rewards, p_old, valid)
    adv = jnp.take_along_axis(per_tag, row_tags, axis=-1)
    return adv, jnp.take_along_axis(p_old, row_tags, axis=-1) / samples_per_tag


def every_valid_tag(p_old: np.ndarray, valid: np.ndarray, *, group_size: int, samples_per_tag: int,
                    rng: np.random.Generator | None) -> np.ndarray:
    """Each valid tag k times, the same rows for every question."""
    del group_size, rng
    row = np.repeat(np.flatnonzero(valid), samples_per_tag)
    return np.broadcast_to(row, (p_old.shape[0], row.size)).copy()


def valid_tag_rollouts(group_size: int, num_valid: int, samples_per_tag: int) -> int:
    del group_size
    return int(num_valid * samples_per_tag)


def policy_weighted_reward(rewards: np.ndarray, row_tags: np.ndarray, logp_old: np.ndarray) -> float:
    """sum_t pi_old(t) rbar_t: the rollouts cover every tag evenly, so their plain mean is the uniform policy's."""
    n = logp_old.shape[-1]
    onehot = np.eye(n)[row_tags]  # [B, R, N]
    rbar = np.einsum("brn,br->bn", onehot, rewards) / np.maximum(onehot.sum(1), 1)
    return float(np.mean(np.sum(np.exp(logp_old) * rbar, -1)))


register("grpo", Estimator(grpo_advantages, min_group_size=2))  # a group of one has advantage 0
register("enumerate", Estimator(enumerate_advantages, draw=every_valid_tag, rollouts=valid_tag_rollouts,
                                policy_reward=policy_weighted_reward))
