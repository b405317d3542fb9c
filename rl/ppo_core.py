"""PPO, once: the pieces both runners share (fast JAX runner and gymnasium runner).

Everything here is a pure function of arrays, so it jits, vmaps and is easy to check by hand:

* :func:`gae` — generalized advantage estimation over a (T, N) rollout, with the bootstrap
  cut at termination but *not* at truncation (a time limit is not a terminal state: the
  value of the truncated state is bootstrapped from ``next_value``);
* :func:`ppo_loss` — clipped surrogate, (optionally clipped) value loss, entropy bonus, with
  per-minibatch advantage normalization as an option;
* :class:`RunningMeanStd` — observation / return normalization statistics (parallel Welford).

Switches follow the "37 implementation details" of PPO (Huang et al., 2022): each one is a
config flag in :class:`PPOConfig` so ablations are one ``--set`` away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class PPOConfig:
    learning_rate: float = 3e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    clip_value: bool = True
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    adam_eps: float = 1e-5
    update_epochs: int = 4
    num_minibatches: int = 4
    num_envs: int = 64
    num_steps: int = 128  # rollout length per env per update
    total_timesteps: int = 1_000_000
    norm_adv: bool = True
    norm_obs: bool = True
    norm_reward: bool = True
    init_log_std: float = -0.5


class Transition(NamedTuple):
    obs: jax.Array | dict
    action: jax.Array  # pre-squash Gaussian sample
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array  # true terminal: no bootstrap
    truncated: jax.Array  # time limit: bootstrap from the value of the final observation
    final_value: jax.Array  # V(final obs) where truncated (0 elsewhere)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    next_value: jax.Array,
    gamma: float,
    lam: float,
    final_values: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Advantages and returns for a (T, N) rollout.

    At step t the next state's value is ``values[t+1]`` (or ``next_value`` at the end).
    Where the episode *terminated* at t there is no bootstrap; where it was *truncated*
    the bootstrap uses ``final_values[t]`` — the value of the observation the episode ended
    in (auto-reset envs return the next episode's first observation instead) — and the
    GAE recursion is cut, since the next step belongs to a new episode.
    """
    if final_values is None:
        final_values = jnp.zeros_like(values)
    next_values = jnp.concatenate([values[1:], next_value[None]], axis=0)
    done = jnp.logical_or(terminated, truncated).astype(values.dtype)
    boot = jnp.where(truncated, final_values, next_values) * (1.0 - terminated.astype(values.dtype))
    deltas = rewards + gamma * boot - values

    def body(carry, x):
        delta, d = x
        adv = delta + gamma * lam * (1.0 - d) * carry
        return adv, adv

    _, adv = jax.lax.scan(body, jnp.zeros_like(next_value), (deltas, done), reverse=True)
    return adv, adv + values


class LossInfo(NamedTuple):
    total: jax.Array
    policy: jax.Array
    value: jax.Array
    entropy: jax.Array
    approx_kl: jax.Array
    clip_frac: jax.Array


def ppo_loss(
    new_log_prob: jax.Array,
    old_log_prob: jax.Array,
    advantages: jax.Array,
    new_value: jax.Array,
    old_value: jax.Array,
    returns: jax.Array,
    entropy: jax.Array,
    cfg: PPOConfig,
) -> tuple[jax.Array, LossInfo]:
    """The clipped PPO objective over one minibatch (flat arrays)."""
    if cfg.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = new_log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    policy_loss = jnp.maximum(pg1, pg2).mean()
    if cfg.clip_value:
        v_clipped = old_value + jnp.clip(new_value - old_value, -cfg.clip_eps, cfg.clip_eps)
        v_loss = 0.5 * jnp.maximum((new_value - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((new_value - returns) ** 2).mean()
    ent = entropy.mean()
    total = policy_loss + cfg.vf_coef * v_loss - cfg.ent_coef * ent
    approx_kl = ((ratio - 1.0) - log_ratio).mean()
    clip_frac = (jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32).mean()
    return total, LossInfo(total, policy_loss, v_loss, ent, approx_kl, clip_frac)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """Sum over the last axis of a diagonal Gaussian's log density."""
    var = jnp.exp(2.0 * log_std)
    lp = -0.5 * ((x - mean) ** 2 / var + 2.0 * log_std + jnp.log(2.0 * jnp.pi))
    return lp.sum(-1)


def gaussian_entropy(log_std: jax.Array) -> jax.Array:
    return (log_std + 0.5 * jnp.log(2.0 * jnp.pi * jnp.e)).sum(-1)


class RunningMeanStd(NamedTuple):
    """Running mean/variance (parallel Welford); a pytree, so it lives inside jitted state."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @staticmethod
    def create(shape=()) -> RunningMeanStd:
        return RunningMeanStd(jnp.zeros(shape), jnp.ones(shape), jnp.asarray(1e-4))

    def update(self, x: jax.Array) -> RunningMeanStd:
        """Fold a batch ``x`` of shape (B, *shape) into the statistics."""
        b_mean = x.mean(0)
        b_var = x.var(0)
        b_count = x.shape[0]
        delta = b_mean - self.mean
        tot = self.count + b_count
        mean = self.mean + delta * b_count / tot
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / tot
        return RunningMeanStd(mean, m2 / tot, tot)

    def normalize(self, x: jax.Array, clip: float = 10.0) -> jax.Array:
        return jnp.clip((x - self.mean) / jnp.sqrt(self.var + 1e-8), -clip, clip)


def discounted_return_update(
    ret: jax.Array, reward: jax.Array, done: jax.Array, gamma: float
) -> jax.Array:
    """The running discounted return used to scale rewards (reset where an episode ended)."""
    return ret * gamma * (1.0 - done.astype(ret.dtype)) + reward
