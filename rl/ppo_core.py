"""PPO, the algorithm, once — what both runners (rl/runners.py) share, top to bottom:

* :class:`PPOConfig` — every switch of the "37 implementation details" of PPO (Huang et al.,
  2022) as a config flag, so an ablation is one ``--set`` away;
* :func:`gae` — advantages over a (T, N) rollout, bootstrapping truncated episodes (a time
  limit is not a terminal state) from the value of their last observation;
* :func:`ppo_loss` — clipped surrogate, (optionally clipped) value loss, entropy bonus;
* :class:`RunningMeanStd` — observation / return normalization statistics;
* :func:`make_loss`, :func:`make_learn` — the loss of an agent on a minibatch; one learning
  step: GAE, then epochs × minibatches of the loss.

Everything is a pure function of arrays: it jits, vmaps and is easy to check by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from etl import configlib


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
    # the learning rate of the multimodal policy's encoders and fusion (the parameters under
    # its ``mae`` attribute, :data:`ENCODER_PATH`) as a fraction of the heads': 1 = one rate
    # for all; < 1 fine-tunes pretrained encoders gently (with finetune.freeze_encoders = false)
    encoder_lr_scale: float = 1.0

    def __post_init__(self):  # config values are checked when loaded (and built in code)
        # learning_rate 0 holds the policy fixed (warm-start checks); negative ascends: refused
        configlib.check_ranges(self, "ppo", {
            "learning_rate": (0, None), "gamma": (0, 1, True), "gae_lambda": (0, 1),
            "clip_eps": (0, None, True), "vf_coef": (0, None), "ent_coef": (0, None),
            "max_grad_norm": (0, None, True), "adam_eps": (0, None, True),
            "update_epochs": (1, None), "num_minibatches": (1, None), "num_envs": (1, None),
            "num_steps": (1, None), "total_timesteps": (1, None),
            "encoder_lr_scale": (0, 1),
        })  # fmt: skip

    @property
    def num_updates(self) -> int:
        """PPO updates of a run: total_timesteps in rollouts of num_envs × num_steps."""
        return max(1, self.total_timesteps // (self.num_envs * self.num_steps))


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


def normalize_obs(rms: RunningMeanStd | None, obs):
    """``obs`` through the observation statistics (unchanged without them)."""
    return obs if rms is None else rms.normalize(obs)


# ---------------------------------------------------------------------------- learning step
Apply = Callable[[Any, Any, Any], tuple[jax.Array, jax.Array, jax.Array]]
"""``apply(params, frozen, obs) -> (mean, log_std, value)``: an agent split for jit."""


# The attribute under which rl.agent.MultimodalActorCritic keeps the pretrained encoders and
# fusion: the parameters ``ppo.encoder_lr_scale`` applies to.
ENCODER_PATH = "mae"


def _under(path, name: str) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == name for k in path)


def scale_subtree(name: str, factor: float) -> optax.GradientTransformation:
    """Multiply the updates of the parameters whose path holds the key ``name`` by ``factor``
    (after Adam: their learning rate × factor, Adam's normalisation being scale-free)."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u * factor if _under(p, name) else u, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: PPOConfig, num_updates: int) -> optax.GradientTransformation:
    """Adam with global-norm clipping; the learning rate annealed to 0 over the run; the
    encoders' (:data:`ENCODER_PATH`) rate × ``encoder_lr_scale``."""
    steps = max(1, num_updates * cfg.update_epochs * cfg.num_minibatches)
    lr = (
        optax.linear_schedule(cfg.learning_rate, 0.0, steps) if cfg.anneal_lr else cfg.learning_rate
    )
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr, eps=cfg.adam_eps)]
    if cfg.encoder_lr_scale != 1.0:
        parts.append(scale_subtree(ENCODER_PATH, cfg.encoder_lr_scale))
    return optax.chain(*parts)


def make_loss(apply: Apply, cfg: PPOConfig) -> Callable:
    """``loss(params, frozen, minibatch) -> (total, LossInfo)``: the agent's outputs on the
    minibatch's ``obs`` (whatever ``apply`` reads: observations, or frozen features with an
    agent's ``heads``) through :func:`ppo_loss`."""

    def loss_fn(params, frozen, mb):
        mean, log_std, value = apply(params, frozen, mb["obs"])
        new_logp = gaussian_log_prob(mb["action"], mean, log_std)
        ent = gaussian_entropy(log_std)
        return ppo_loss(
            new_logp, mb["log_prob"], mb["adv"], value, mb["value"], mb["ret"], ent, cfg
        )

    return loss_fn


def make_update(apply: Apply, tx: optax.GradientTransformation, cfg: PPOConfig) -> Callable:
    """``update(params, opt_state, frozen, batch, key) -> (params, opt_state, metrics)``:
    ``update_epochs`` passes over the (T, N) ``batch`` (normalized observations, actions, old
    log-probabilities and values, advantages, returns), each in ``num_minibatches`` shuffled
    minibatches of the clipped loss."""
    grad_fn = jax.value_and_grad(make_loss(apply, cfg), has_aux=True)

    def update(params, opt_state, frozen, batch: dict, key):
        n = batch["adv"].shape[0] * batch["adv"].shape[1]
        flat = jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), batch)
        mb_size = n // cfg.num_minibatches

        def epoch(carry, k):
            perm = jax.random.permutation(k, n)[: mb_size * cfg.num_minibatches]
            shuffled = jax.tree.map(
                lambda x: x[perm].reshape(cfg.num_minibatches, mb_size, *x.shape[1:]), flat
            )

            def minibatch(carry, mb):
                params, opt_state = carry
                (_, info), grads = grad_fn(params, frozen, mb)
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), info

            return jax.lax.scan(minibatch, carry, shuffled)

        keys = jax.random.split(key, cfg.update_epochs)
        (params, opt_state), infos = jax.lax.scan(epoch, (params, opt_state), keys)
        metrics = {f"loss/{k}": v.mean() for k, v in infos._asdict().items()}
        return params, opt_state, metrics

    return update


def make_learn(apply: Apply, tx: optax.GradientTransformation, cfg: PPOConfig) -> Callable:
    """``learn(params, opt_state, frozen, obs_rms, traj, last_obs, key) -> (params, opt_state,
    metrics)``: GAE over a (T, N) rollout (``traj.obs`` already normalized, ``last_obs`` not
    yet), then :func:`make_update`. The one learning step both runners call."""
    update_fn = make_update(apply, tx, cfg)

    def learn(params, opt_state, frozen, obs_rms, traj: Transition, last_obs, key):
        _, _, last_value = apply(params, frozen, normalize_obs(obs_rms, last_obs))
        adv, ret = gae(
            traj.reward, traj.value, traj.terminated, traj.truncated, last_value,
            cfg.gamma, cfg.gae_lambda, traj.final_value,
        )  # fmt: skip
        batch = {
            "obs": traj.obs, "action": traj.action, "log_prob": traj.log_prob,
            "value": traj.value, "adv": adv, "ret": ret,
        }  # fmt: skip
        return update_fn(params, opt_state, frozen, batch, key)

    return learn
