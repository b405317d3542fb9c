"""How PPO meets an environment: the :class:`Runner` protocol and its two implementations.

The one training loop (rl/ppo.py) sees only the protocol: ``init`` a :class:`RunnerState`,
``run`` n updates, hand a checkpoint the part of the state it keeps, take it back.

* :class:`FastRunner` — PureJaxRL-style: the rollout is a ``lax.scan`` of a functional JAX
  environment, jitted together with the update; thousands of environments on the device,
  their batch axis sharded over the mesh's ``data`` axis. The environment never leaves it.
* :class:`GymRunner` — rollouts collected on the host from a gymnasium vector env (the
  PyBullet backend or racecar_gym itself), policy inference jitted.

Both keep their state in the same :class:`RunnerState`, take one rollout step the same way
— fold the observation into the normalization statistics, then normalize it and act — and
learn with the same :func:`rl.ppo_core.make_learn`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rl.agent import split_agent
from rl.ppo_core import (
    PPOConfig,
    RunningMeanStd,
    Transition,
    discounted_return_update,
    gaussian_log_prob,
    make_learn,
    make_optimizer,
    normalize_obs,
)

# the fields a checkpoint keeps: enough to continue learning exactly
LEARNER_FIELDS = ("params", "frozen", "opt_state", "obs_rms", "ret_rms", "key", "update")


class RunnerState(NamedTuple):
    """Everything a run carries between updates, the same for both runners.

    ``env_state``/``env_params`` are the functional environment's (device arrays; None for a
    host vector env, which keeps its own); ``obs`` is the next observation to act on."""

    params: Any
    frozen: Any
    opt_state: Any
    obs_rms: RunningMeanStd | None
    ret_rms: RunningMeanStd
    env_state: Any
    obs: Any
    ret_acc: Any  # running discounted return per env, for reward scaling
    ep_ret: Any  # undiscounted return of the running episode per env
    ep_len: Any
    key: jax.Array
    update: jax.Array
    env_params: Any


class Runner(Protocol):
    """What the training loop needs of a way to collect experience and learn from it."""

    num_updates: int

    def init(self, key: jax.Array) -> RunnerState:
        """A fresh state: the agent's initial parameters, environments reset."""
        ...

    def run(self, state: RunnerState, n_updates: int,
            stop: Callable[[], bool] | None = None) -> tuple[RunnerState, dict[str, np.ndarray]]:
        """Up to ``n_updates`` PPO updates (fewer if ``stop()`` turns true between two, where
        the runner can stop there); metrics stacked per update."""
        ...

    def checkpoint(self, state: RunnerState) -> dict:
        """The part of the state a checkpoint holds (a pytree of arrays)."""
        ...

    def restore(self, state: RunnerState, saved: dict) -> RunnerState:
        """``state`` with a checkpoint's part put back (and placed on the devices)."""
        ...

    def place(self, state: RunnerState) -> RunnerState:
        """``state`` laid out on the devices as the runner computes with it."""
        ...

    def close(self) -> None: ...


class FunctionalEnv(Protocol):
    """An auto-resetting functional environment (one instance; the runner vmaps it)."""

    def reset(self, key: jax.Array, params: Any) -> tuple[Any, Any]: ...

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any) -> tuple:
        """→ (obs, state, reward, terminated, truncated, final_obs, info). Where the episode
        ended, ``obs``/``state`` already belong to the next episode and ``final_obs`` is the
        last observation of the ended one."""
        ...


def _episode_metrics(stats: dict[str, Any], done) -> dict[str, Any]:
    """Per-update episode metrics from (T, N) per-step statistics: the number of episodes
    that ended, and each statistic's mean over them at the step they ended (NaN if none)."""
    out = {"episodes": done.sum()}
    for k, v in stats.items():
        ok = done & jnp.isfinite(v)
        n = ok.sum()
        mean = jnp.where(ok, v, 0.0).sum() / jnp.maximum(n, 1)
        out[f"episode/{k}"] = jnp.where(n > 0, mean, jnp.nan)
    return out


def _new_state(agent, tx, key, obs, obs_rms, num_envs, zeros, env_state=None,
               env_params=None) -> RunnerState:
    return RunnerState(
        params=agent.params, frozen=agent.frozen, opt_state=tx.init(agent.params),
        obs_rms=obs_rms, ret_rms=RunningMeanStd.create(()), env_state=env_state, obs=obs,
        ret_acc=zeros(num_envs), ep_ret=zeros(num_envs), ep_len=zeros(num_envs), key=key,
        update=jnp.zeros((), jnp.int32), env_params=env_params,
    )  # fmt: skip


def _obs_stats(cfg: PPOConfig, feat) -> RunningMeanStd | None:
    """Observation statistics for flat feature vectors (dict observations are not
    normalized: the multimodal agent's inputs are already in the pretraining's units)."""
    if cfg.norm_obs and isinstance(feat, jax.Array) and feat.ndim == 2:
        return RunningMeanStd.create(feat.shape[1:])
    return None


class FastRunner:
    """PPO with a functional JAX environment, rollout and update in one jitted function.

    ``featurize`` (ONE observation → the model's input; vmapped here) is applied by the runner
    when given — to the observation it acts on, and to an ended episode's final observation
    only in a step where some episode was truncated — so the environment hands over raw
    observations (the multimodal policy's BEV is built once per step, not for the reset
    observation and the final one of every env as well). None: the environment's observations
    are the model's input.

    ``reuse_features`` (default: the agent's ``frozen_features``, see
    :func:`rl.agent.split_agent`): the frozen encoders' features are computed once per
    environment step in the rollout, stored in the rollout buffer in place of the observation,
    and every epoch and minibatch of the update trains the heads on them — no encoder forward or
    backward in the update. False: the update recomputes the agent from the observations."""

    def __init__(self, env: FunctionalEnv, model: nnx.Module, cfg: PPOConfig,
                 trainable: Any = nnx.Param, mesh: jax.sharding.Mesh | None = None,
                 env_params: Any = None, featurize: Callable | None = None,
                 reuse_features: bool | None = None):
        self.env, self.cfg, self.mesh, self.env_params = env, cfg, mesh, env_params
        self.agent = split_agent(model, trainable)
        if reuse_features is None:
            reuse_features = self.agent.frozen_features
        elif reuse_features and not self.agent.frozen_features:
            raise ValueError("FastRunner: reuse_features needs an agent with frozen features "
                             "(features/heads and no trained parameter in FEATURES_FROM)")
        self.reuse_features = bool(reuse_features)
        self.featurize = None if featurize is None else jax.vmap(featurize)
        self.num_updates = cfg.num_updates
        self.tx = make_optimizer(cfg, self.num_updates)
        apply = self.agent.heads if self.reuse_features else self.agent.apply
        self.learn = make_learn(apply, self.tx, cfg)
        self._chunk = jax.jit(self._run_chunk, static_argnums=(1,), donate_argnums=(0,))
        self._reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))

    # -- state ---------------------------------------------------------------------------
    def init(self, key: jax.Array) -> RunnerState:
        key, k_env = jax.random.split(key)
        obs, env_state = jax.vmap(self.env.reset, in_axes=(0, None))(
            jax.random.split(k_env, self.cfg.num_envs), self.env_params)
        state = _new_state(self.agent, self.tx, key, obs,
                           _obs_stats(self.cfg, self._featurize(obs)),
                           self.cfg.num_envs, jnp.zeros, env_state, self.env_params)
        return self.place(state)

    def swap_env_params(self, state: RunnerState, env_params) -> RunnerState:
        """``state`` on other track parameters of the same shapes (the track pool's next
        draw): every environment reset on them, its running episode dropped (no compile:
        the chunk sees arrays of the shapes it was compiled for)."""
        key, k_env = jax.random.split(state.key)
        obs, env_state = self._reset(jax.random.split(k_env, self.cfg.num_envs), env_params)
        z = jnp.zeros(self.cfg.num_envs)
        return self.place(state._replace(env_params=env_params, env_state=env_state, obs=obs,
                                         ret_acc=z, ep_ret=z, ep_len=z, key=key))

    def place(self, state: RunnerState) -> RunnerState:
        """Per-env arrays along the mesh's ``data`` axis, the rest replicated; every leaf its
        own buffer (the state is donated to each chunk, and outputs of one computation may
        alias)."""
        own = lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x  # noqa: E731
        state = jax.tree.map(own, state)
        if self.mesh is None:
            return state
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        batched = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        n = self.cfg.num_envs
        per_env = ("env_state", "obs", "ret_acc", "ep_ret", "ep_len")

        def put(field, x):
            if not isinstance(x, jax.Array):
                return x
            split = field in per_env and x.ndim and x.shape[0] == n
            return jax.device_put(x, batched if split else replicated)

        return RunnerState(*(jax.tree.map(lambda x, f=f: put(f, x), getattr(state, f))
                             for f in RunnerState._fields))

    def checkpoint(self, state: RunnerState) -> dict:
        """The whole state (environments included: a resumed run continues exactly)."""
        return state._asdict()

    def restore(self, state: RunnerState, saved: dict) -> RunnerState:
        return self.place(RunnerState(**saved))

    def close(self) -> None:
        pass

    # -- one update ---------------------------------------------------------------------
    def _featurize(self, obs):
        """A batch of the environment's observations → the model's input."""
        return obs if self.featurize is None else self.featurize(obs)

    def _inputs(self, rs: RunnerState, obs):
        """What the rollout stores and the update reads for a batch of the environment's
        observations: the normalized model input, or its frozen features."""
        x = normalize_obs(rs.obs_rms, self._featurize(obs))
        return self.agent.features(rs.params, rs.frozen, x) if self.reuse_features else x

    def _outputs(self, rs: RunnerState, x):
        """(mean, log_std, value) from :meth:`_inputs`' output."""
        if self.reuse_features:
            return self.agent.heads(rs.params, rs.frozen, x)
        return self.agent.apply(rs.params, rs.frozen, x)

    def rollout(self, rs: RunnerState) -> tuple[RunnerState, Transition, dict]:
        """``num_steps`` steps of every env by ``lax.scan`` (traceable; jit it to call it
        alone); returns the state after it, the (T, N) transitions and per-step statistics.

        The value of a truncated episode's final observation (its bootstrap) is computed only
        in steps where some episode was truncated (``lax.cond``): most steps end none."""
        cfg, env = self.cfg, self.env

        def env_step(rs: RunnerState, _):
            key, k_act, k_env = jax.random.split(rs.key, 3)
            if rs.obs_rms is not None:
                rs = rs._replace(obs_rms=rs.obs_rms.update(self._featurize(rs.obs)))
            x = self._inputs(rs, rs.obs)
            mean, log_std, value = self._outputs(rs, x)
            action = mean + jnp.exp(log_std) * jax.random.normal(k_act, mean.shape)
            logp = gaussian_log_prob(action, mean, log_std)
            obs, env_state, reward, term, trunc, final_obs, info = jax.vmap(
                env.step, in_axes=(0, 0, 0, None)
            )(jax.random.split(k_env, cfg.num_envs), rs.env_state, jnp.clip(action, -1.0, 1.0),
              rs.env_params)
            final_value = jax.lax.cond(
                trunc.any(),
                lambda o: jnp.where(trunc, self._outputs(rs, self._inputs(rs, o))[2], 0.0),
                lambda o: jnp.zeros_like(value), final_obs)
            done = term | trunc
            ret_acc = discounted_return_update(rs.ret_acc, reward, done, cfg.gamma)
            ret_rms = rs.ret_rms.update(ret_acc) if cfg.norm_reward else rs.ret_rms
            scaled = reward / jnp.sqrt(ret_rms.var + 1e-8) if cfg.norm_reward else reward
            ep_ret, ep_len = rs.ep_ret + reward, rs.ep_len + 1
            tr = Transition(x, action, logp, value, scaled, term, trunc, final_value)
            stats = {"ep_return": ep_ret, "ep_length": ep_len, "done": done, **info}
            rs = rs._replace(key=key, obs=obs, env_state=env_state, ret_acc=ret_acc,
                             ret_rms=ret_rms,
                             ep_ret=jnp.where(done, 0.0, ep_ret),
                             ep_len=jnp.where(done, 0.0, ep_len))
            return rs, (tr, stats)

        rs, (traj, stats) = jax.lax.scan(env_step, rs, None, cfg.num_steps)
        return rs, traj, stats

    def _update(self, rs: RunnerState, _):
        rs, traj, stats = self.rollout(rs)
        key, k_upd = jax.random.split(rs.key)
        # the last observation as the rollout's steps were stored (normalized; features)
        last = self._inputs(rs, rs.obs)
        params, opt_state, metrics = self.learn(
            rs.params, rs.opt_state, rs.frozen, None, traj, last, k_upd)
        done = stats.pop("done")
        metrics.update(_episode_metrics(stats, done))
        metrics["reward_mean"] = traj.reward.mean()
        rs = rs._replace(params=params, opt_state=opt_state, key=key, update=rs.update + 1)
        return rs, metrics

    def _run_chunk(self, rs: RunnerState, n_updates: int):
        return jax.lax.scan(self._update, rs, None, n_updates)

    def run(self, rs: RunnerState, n_updates: int, stop: Callable[[], bool] | None = None):
        """``n_updates`` PPO updates in one jitted call (it cannot stop in between)."""
        rs, metrics = self._chunk(rs, n_updates)
        return rs, jax.device_get(metrics)

    def model(self, rs: RunnerState) -> nnx.Module:
        return nnx.merge(self.agent.graphdef, rs.params, rs.frozen)


class GymRunner:
    """PPO on host-collected rollouts from a gymnasium vector env (same-step autoreset).

    ``featurize(obs_batch) -> model input`` runs inside the jitted policy call (for the
    multimodal agent it is the observation adapter); ``to_env_action(a)`` maps the clipped
    (N, A) action array to what the vector env takes (the racecar action dict by default).
    ``info_keys`` are the per-episode statistics read from the info of an episode's last step.
    The simulators' physics state cannot be checkpointed: after a restore the environments
    start new episodes, seeded from ``seed`` and the update counter.
    """

    def __init__(self, envs, model: nnx.Module, cfg: PPOConfig,
                 featurize: Callable = lambda o: o, to_env_action: Callable = lambda a: a,
                 trainable: Any = nnx.Param, info_keys: tuple[str, ...] = (), seed: int = 0):
        self.envs, self.cfg, self.seed = envs, cfg, seed
        self.featurize, self.to_env_action, self.info_keys = featurize, to_env_action, info_keys
        self.agent = agent = split_agent(model, trainable)
        self.num_updates = cfg.num_updates
        self.tx = make_optimizer(cfg, self.num_updates)
        self.learn = jax.jit(make_learn(agent.apply, self.tx, cfg))

        def act(params, frozen, obs_rms, raw_obs, key):
            obs = featurize(raw_obs)
            obs_rms = obs_rms.update(obs) if obs_rms is not None else None
            nobs = normalize_obs(obs_rms, obs)
            mean, log_std, value = agent.apply(params, frozen, nobs)
            action = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
            return nobs, action, gaussian_log_prob(action, mean, log_std), value, obs_rms

        def value_of(params, frozen, obs_rms, raw_obs):
            return agent.apply(params, frozen, normalize_obs(obs_rms, featurize(raw_obs)))[2]

        self._act = jax.jit(act)
        self._value = jax.jit(value_of)
        self._featurize = jax.jit(featurize)

    # -- state ---------------------------------------------------------------------------
    def init(self, key: jax.Array) -> RunnerState:
        obs, _ = self.envs.reset(seed=self.seed)
        feat = self._featurize(jax.tree.map(jnp.asarray, obs))
        return _new_state(self.agent, self.tx, key, obs, _obs_stats(self.cfg, feat),
                          self.cfg.num_envs, np.zeros)

    def place(self, state: RunnerState) -> RunnerState:
        return state

    def checkpoint(self, state: RunnerState) -> dict:
        """The learner (parameters, optimizer, statistics, RNG, update counter); not the
        environments, whose physics state lives in their simulators."""
        return {k: getattr(state, k) for k in LEARNER_FIELDS}

    def restore(self, state: RunnerState, saved: dict) -> RunnerState:
        update = int(saved["update"])
        obs, _ = self.envs.reset(seed=self.seed + 1000 * update)
        n = self.cfg.num_envs
        return state._replace(**saved, obs=obs, ret_acc=np.zeros(n), ep_ret=np.zeros(n),
                              ep_len=np.zeros(n))

    def close(self) -> None:
        self.envs.close()

    # -- one update ----------------------------------------------------------------------
    def rollout(self, st: RunnerState) -> tuple[RunnerState, Transition, dict]:
        """``num_steps`` steps of the vector env; returns the state after it, the (T, N)
        transitions and, per statistic, its values at the end of each episode that ended."""
        cfg = self.cfg
        steps, stats = [], {"ep_return": [], "ep_length": [], **{k: [] for k in self.info_keys}}
        obs, key, obs_rms, ret_rms = st.obs, st.key, st.obs_rms, st.ret_rms
        ret_acc, ep_ret, ep_len = (np.array(x, np.float64) for x in (st.ret_acc, st.ep_ret,
                                                                     st.ep_len))
        for _ in range(cfg.num_steps):
            key, k = jax.random.split(key)
            nobs, action, logp, value, obs_rms = self._act(
                st.params, st.frozen, obs_rms, jax.tree.map(jnp.asarray, obs), k)
            env_action = self.to_env_action(np.clip(np.asarray(action), -1.0, 1.0))
            obs, reward, term, trunc, info = self.envs.step(env_action)
            reward = np.asarray(reward, np.float64)
            done = np.logical_or(term, trunc)
            final_value = np.zeros(cfg.num_envs, np.float32)
            if trunc.any():  # bootstrap truncated episodes from their last observation
                fv = self._value(st.params, st.frozen, obs_rms, _final_obs(obs, info, trunc))
                final_value = np.where(trunc, np.asarray(fv), 0.0).astype(np.float32)
            ret_acc = ret_acc * cfg.gamma * (1.0 - done) + reward
            if cfg.norm_reward:
                ret_rms = ret_rms.update(jnp.asarray(ret_acc, jnp.float32))
                scaled = reward / np.sqrt(float(ret_rms.var) + 1e-8)
            else:
                scaled = reward
            ep_ret, ep_len = ep_ret + reward, ep_len + 1
            for i in np.flatnonzero(done):
                stats["ep_return"].append(ep_ret[i])
                stats["ep_length"].append(ep_len[i])
                for k in self.info_keys:
                    stats[k].append(float(_info_at(info, k, i)))
            ep_ret, ep_len = np.where(done, 0.0, ep_ret), np.where(done, 0.0, ep_len)
            steps.append(Transition(
                nobs, action, logp, value, jnp.asarray(scaled, jnp.float32), jnp.asarray(term),
                jnp.asarray(trunc), jnp.asarray(final_value)))  # fmt: skip
        traj = jax.tree.map(lambda *xs: jnp.stack(xs), *steps)
        st = st._replace(obs=obs, key=key, obs_rms=obs_rms, ret_rms=ret_rms, ret_acc=ret_acc,
                         ep_ret=ep_ret, ep_len=ep_len)
        return st, traj, stats

    def update(self, st: RunnerState) -> tuple[RunnerState, dict[str, float]]:
        """One rollout and one learning step."""
        st, traj, stats = self.rollout(st)
        key, k = jax.random.split(st.key)
        last = self._featurize(jax.tree.map(jnp.asarray, st.obs))
        params, opt_state, metrics = self.learn(
            st.params, st.opt_state, st.frozen, st.obs_rms, traj, last, k)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["episodes"] = float(len(stats["ep_return"]))
        for k, v in stats.items():
            finite = [x for x in v if np.isfinite(x)]
            metrics[f"episode/{k}"] = float(np.mean(finite)) if finite else float("nan")
        metrics["reward_mean"] = float(traj.reward.mean())
        st = st._replace(params=params, opt_state=opt_state, key=key, update=st.update + 1)
        return st, metrics

    def run(self, st: RunnerState, n_updates: int, stop: Callable[[], bool] | None = None):
        """Up to ``n_updates`` updates, stopping early once ``stop()`` is true."""
        rows = []
        for _ in range(n_updates):
            st, m = self.update(st)
            rows.append(m)
            if stop is not None and stop():
                break
        return st, {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def _final_obs(obs, info, mask):
    """The last observation of each ended episode (gymnasium same-step autoreset puts it in
    ``info["final_obs"]``, an object array); other envs keep their current observation."""
    finals = info.get("final_obs")
    if finals is None:
        raise RuntimeError("vector env must use autoreset_mode=SAME_STEP (no final_obs in info)")

    def pick(cur, path):
        out = np.array(cur, copy=True)
        for i in np.flatnonzero(mask):
            f = finals[i]
            for p in path:
                f = f[p]
            out[i] = f
        return out

    if isinstance(obs, dict):
        return {k: jnp.asarray(pick(v, (k,))) for k, v in obs.items()}
    return jnp.asarray(pick(obs, ()))


def _info_at(info, key, i):
    """``info[key]`` of env ``i`` at the step its episode ended (same-step autoreset moves the
    ended episode's info under ``final_info``)."""
    final = info.get("final_info")
    if isinstance(final, dict) and key in final:
        return np.asarray(final[key])[i]
    v = info.get(key)
    return float("nan") if v is None else np.asarray(v)[i]
