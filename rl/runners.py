"""The two PPO runners and the update they share.

* :func:`make_update` — epochs × minibatches of the clipped PPO loss over one rollout, as a
  pure function of (params, optimizer state, rollout). Both runners call exactly this.
* :class:`FastRunner` — PureJaxRL-style: environment steps by ``lax.scan`` inside one jitted
  function together with the update, thousands of environments on the device, batch axis
  sharded over the mesh's ``data`` axis. The environment never leaves the device.
* :class:`GymRunner` — host-collected rollouts from a gymnasium vector env (the PyBullet
  backend or racecar_gym itself), with batched, jitted policy inference on the device, then
  the same :func:`make_update`.

Agents are NNX modules returning ``(mean, log_std, value)``; they are split once into a
graph definition and states (trainable / frozen) and only the states travel through jit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rl.ppo_core import (
    PPOConfig,
    RunningMeanStd,
    Transition,
    discounted_return_update,
    gae,
    gaussian_entropy,
    gaussian_log_prob,
    ppo_loss,
)


class FunctionalEnv(Protocol):
    """An auto-resetting functional environment (one instance; the runner vmaps it)."""

    def reset(self, key: jax.Array, params: Any) -> tuple[Any, Any]: ...

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any) -> tuple:
        """→ (obs, state, reward, terminated, truncated, final_obs, info). Where the episode
        ended, ``obs``/``state`` already belong to the next episode and ``final_obs`` is the
        last observation of the ended one."""
        ...


class Agent(NamedTuple):
    """An NNX agent split for jit: ``apply(params, frozen, obs) -> (mean, log_std, value)``."""

    graphdef: Any
    params: nnx.State  # trained
    frozen: nnx.State  # everything else (frozen encoders, non-parameter state)

    def apply(self, params, frozen, obs):
        model = nnx.merge(self.graphdef, params, frozen)
        return model(obs)


def split_agent(model: nnx.Module, trainable: Any = nnx.Param) -> Agent:
    """Split ``model`` into trained parameters (``trainable`` filter) and the rest."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    return Agent(graphdef, params, frozen)


def make_optimizer(cfg: PPOConfig, num_updates: int) -> optax.GradientTransformation:
    steps = max(1, num_updates * cfg.update_epochs * cfg.num_minibatches)
    lr = (
        optax.linear_schedule(cfg.learning_rate, 0.0, steps) if cfg.anneal_lr else cfg.learning_rate
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr, eps=cfg.adam_eps)
    )


def _normalize_obs(rms: RunningMeanStd | None, obs):
    return obs if rms is None else rms.normalize(obs)


def make_update(agent: Agent, tx: optax.GradientTransformation, cfg: PPOConfig) -> Callable:
    """``update(params, opt_state, frozen, batch, key) -> (params, opt_state, metrics)``.

    ``batch``: a :class:`Transition` of (T, N, …) arrays whose ``obs`` are already normalized,
    plus advantages and returns (computed by the caller with :func:`gae`).
    """

    def loss_fn(params, frozen, mb):
        mean, log_std, value = agent.apply(params, frozen, mb["obs"])
        new_logp = gaussian_log_prob(mb["action"], mean, log_std)
        ent = gaussian_entropy(log_std)
        return ppo_loss(
            new_logp, mb["log_prob"], mb["adv"], value, mb["value"], mb["ret"], ent, cfg
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(params, opt_state, frozen, batch: dict, key):
        n = batch["reward"].shape[0] * batch["reward"].shape[1]
        flat = jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), batch)
        mb_size = n // cfg.num_minibatches

        def epoch(carry, k):
            params, opt_state = carry
            perm = jax.random.permutation(k, n)[: mb_size * cfg.num_minibatches]
            shuffled = jax.tree.map(
                lambda x: x[perm].reshape(cfg.num_minibatches, mb_size, *x.shape[1:]), flat
            )

            def minibatch(carry, mb):
                params, opt_state = carry
                (_, info), grads = grad_fn(params, frozen, mb)
                updates, opt_state = tx.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
                return (params, opt_state), info

            return jax.lax.scan(minibatch, (params, opt_state), shuffled)

        keys = jax.random.split(key, cfg.update_epochs)
        (params, opt_state), infos = jax.lax.scan(epoch, (params, opt_state), keys)
        metrics = {f"loss/{k}": v.mean() for k, v in infos._asdict().items()}
        return params, opt_state, metrics

    return update


def make_learn(agent: Agent, tx: optax.GradientTransformation, cfg: PPOConfig) -> Callable:
    """``learn(params, opt_state, frozen, obs_rms, traj, last_obs, key)``: GAE over a (T, N)
    rollout (``traj.obs`` already normalized) then :func:`make_update`'s epochs and
    minibatches. The single learning step both runners call."""
    update_fn = make_update(agent, tx, cfg)

    def learn(params, opt_state, frozen, obs_rms, traj: Transition, last_obs, key):
        _, _, last_value = agent.apply(params, frozen, _normalize_obs(obs_rms, last_obs))
        adv, ret = gae(
            traj.reward, traj.value, traj.terminated, traj.truncated, last_value,
            cfg.gamma, cfg.gae_lambda, traj.final_value,
        )  # fmt: skip
        batch = {
            "obs": traj.obs, "action": traj.action, "log_prob": traj.log_prob,
            "value": traj.value, "reward": traj.reward, "adv": adv, "ret": ret,
        }  # fmt: skip
        return update_fn(params, opt_state, frozen, batch, key)

    return learn


class RunnerState(NamedTuple):
    params: Any
    frozen: Any
    opt_state: Any
    obs_rms: RunningMeanStd | None
    ret_rms: RunningMeanStd
    env_state: Any
    obs: Any
    ret_acc: jax.Array  # running discounted return per env, for reward scaling
    ep_ret: jax.Array  # undiscounted return of the running episode per env
    ep_len: jax.Array
    key: jax.Array
    update: jax.Array
    env_params: Any  # track maps etc.: device arrays passed in, never baked into the program


class FastRunner:
    """PPO with a functional JAX environment, the whole update in one jitted function."""

    def __init__(
        self,
        env: FunctionalEnv,
        model: nnx.Module,
        cfg: PPOConfig,
        trainable: Any = nnx.Param,
        mesh: jax.sharding.Mesh | None = None,
        info_keys: tuple[str, ...] = (),
    ):
        self.env, self.cfg, self.mesh = env, cfg, mesh
        self.agent = split_agent(model, trainable)
        self.batch_per_update = cfg.num_envs * cfg.num_steps
        self.num_updates = max(1, cfg.total_timesteps // self.batch_per_update)
        self.tx = make_optimizer(cfg, self.num_updates)
        self.learn = make_learn(self.agent, self.tx, cfg)
        self.info_keys = info_keys
        self._chunk = jax.jit(self._run_chunk, static_argnums=(1,), donate_argnums=(0,))

    # -- state -------------------------------------------------------------------------
    def init(self, key: jax.Array, env_params: Any = None) -> RunnerState:
        cfg = self.cfg
        key, k_env = jax.random.split(key)
        obs, env_state = jax.vmap(self.env.reset, in_axes=(0, None))(
            jax.random.split(k_env, cfg.num_envs), env_params
        )
        obs_rms = None
        if cfg.norm_obs and isinstance(obs, jax.Array) and obs.ndim == 2:
            obs_rms = RunningMeanStd.create(obs.shape[1:])
        zeros = jnp.zeros(cfg.num_envs)
        state = RunnerState(
            params=jax.tree.map(jnp.array, self.agent.params),  # copies: the state is donated
            frozen=jax.tree.map(jnp.array, self.agent.frozen),
            opt_state=self.tx.init(self.agent.params),
            obs_rms=obs_rms,
            ret_rms=RunningMeanStd.create(()),
            env_state=env_state,
            obs=obs,
            ret_acc=zeros,
            ep_ret=jnp.zeros_like(zeros),
            ep_len=jnp.zeros_like(zeros),
            key=key,
            update=jnp.zeros((), jnp.int32),
            env_params=env_params,
        )
        # distinct buffers for every leaf: outputs of one computation may alias, and the
        # whole state is donated to each chunk
        state = jax.tree.map(
            lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, state
        )
        return self.shard(state)

    def shard(self, state: RunnerState) -> RunnerState:
        """Place per-env arrays along the mesh's ``data`` axis; replicate the rest."""
        if self.mesh is None:
            return state
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        batched = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        n = self.cfg.num_envs

        def place(path_is_env, x):
            if not isinstance(x, jax.Array):
                return x
            return jax.device_put(
                x, batched if path_is_env and x.ndim and x.shape[0] == n else replicated
            )

        env_part = ("env_state", "obs", "ret_acc", "ep_ret", "ep_len")
        return RunnerState(
            **{
                f: jax.tree.map(lambda x, f=f: place(f in env_part, x), getattr(state, f))
                for f in RunnerState._fields
            }
        )

    # -- one update ----------------------------------------------------------------------
    def _update(self, rs: RunnerState, _):
        cfg, agent, env = self.cfg, self.agent, self.env

        def env_step(carry, _):
            rs = carry
            key, k_act, k_env = jax.random.split(rs.key, 3)
            nobs = _normalize_obs(rs.obs_rms, rs.obs)
            mean, log_std, value = agent.apply(rs.params, rs.frozen, nobs)
            action = mean + jnp.exp(log_std) * jax.random.normal(k_act, mean.shape)
            logp = gaussian_log_prob(action, mean, log_std)
            env_keys = jax.random.split(k_env, cfg.num_envs)
            obs, env_state, reward, term, trunc, final_obs, info = jax.vmap(
                env.step, in_axes=(0, 0, 0, None)
            )(env_keys, rs.env_state, jnp.clip(action, -1.0, 1.0), rs.env_params)
            _, _, final_value = agent.apply(
                rs.params, rs.frozen, _normalize_obs(rs.obs_rms, final_obs)
            )
            done = jnp.logical_or(term, trunc)
            ret_acc = discounted_return_update(rs.ret_acc, reward, done, cfg.gamma)
            ret_rms = rs.ret_rms.update(ret_acc) if cfg.norm_reward else rs.ret_rms
            scaled = reward / jnp.sqrt(ret_rms.var + 1e-8) if cfg.norm_reward else reward
            obs_rms = rs.obs_rms.update(obs) if rs.obs_rms is not None else None
            ep_ret = rs.ep_ret + reward
            ep_len = rs.ep_len + 1
            tr = Transition(nobs, action, logp, value, scaled, term, trunc, final_value)
            stats = {"ep_return": ep_ret, "ep_length": ep_len, "done": done}
            for k in self.info_keys:
                stats[k] = info[k]
            rs = rs._replace(
                key=key,
                obs=obs,
                env_state=env_state,
                ret_acc=ret_acc,
                ret_rms=ret_rms,
                obs_rms=obs_rms,
                ep_ret=jnp.where(done, 0.0, ep_ret),
                ep_len=jnp.where(done, 0.0, ep_len),
            )
            return rs, (tr, stats)

        rs, (traj, stats) = jax.lax.scan(env_step, rs, None, cfg.num_steps)
        key, k_upd = jax.random.split(rs.key)
        params, opt_state, metrics = self.learn(
            rs.params, rs.opt_state, rs.frozen, rs.obs_rms, traj, rs.obs, k_upd
        )
        done = stats["done"]
        n_done = done.sum()
        metrics["episodes"] = n_done
        for k, v in stats.items():
            if k != "done":  # mean over the episodes that ended (NaN entries skipped)
                ok = done & jnp.isfinite(v)
                n_ok = ok.sum()
                total = jnp.where(ok, v, 0.0).sum()
                mean = total / jnp.maximum(n_ok, 1)
                metrics[f"episode/{k}"] = jnp.where(n_ok > 0, mean, jnp.nan)
        metrics["reward_mean"] = traj.reward.mean()
        rs = rs._replace(params=params, opt_state=opt_state, key=key, update=rs.update + 1)
        return rs, metrics

    def _run_chunk(self, rs: RunnerState, n_updates: int):
        return jax.lax.scan(self._update, rs, None, n_updates)

    def run(self, rs: RunnerState, n_updates: int) -> tuple[RunnerState, dict[str, np.ndarray]]:
        """Run ``n_updates`` PPO updates in one jitted call; metrics stacked per update."""
        rs, metrics = self._chunk(rs, n_updates)
        return rs, jax.device_get(metrics)

    def model(self, rs: RunnerState) -> nnx.Module:
        return nnx.merge(self.agent.graphdef, rs.params, rs.frozen)


class GymRunner:
    """PPO on host-collected rollouts from a gymnasium vector env (same-step autoreset).

    ``featurize(obs_batch) -> model input`` runs inside the jitted policy call (for the
    multimodal agent it is the observation adapter); ``to_env_action(a) -> env action`` maps
    the clipped (N, A) action array to what the vector env takes (e.g. a dict of motor and
    steering). The learning step is :func:`make_learn`, shared with :class:`FastRunner`.
    """

    def __init__(
        self,
        envs,
        model: nnx.Module,
        cfg: PPOConfig,
        featurize: Callable = lambda o: o,
        to_env_action: Callable = lambda a: a,
        trainable: Any = nnx.Param,
        info_keys: tuple[str, ...] = (),
    ):
        self.envs, self.cfg = envs, cfg
        self.featurize, self.to_env_action = featurize, to_env_action
        self.agent = split_agent(model, trainable)
        self.batch_per_update = cfg.num_envs * cfg.num_steps
        self.num_updates = max(1, cfg.total_timesteps // self.batch_per_update)
        self.tx = make_optimizer(cfg, self.num_updates)
        self.learn = jax.jit(make_learn(self.agent, self.tx, cfg))
        self.info_keys = info_keys
        agent = self.agent

        def act(params, frozen, obs_rms, raw_obs, final_raw_obs, key):
            obs = featurize(raw_obs)
            if obs_rms is not None:
                obs_rms = obs_rms.update(obs)
            nobs = _normalize_obs(obs_rms, obs)
            mean, log_std, value = agent.apply(params, frozen, nobs)
            action = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
            logp = gaussian_log_prob(action, mean, log_std)
            return nobs, action, logp, value, obs_rms

        def value_of(params, frozen, obs_rms, raw_obs):
            return agent.apply(params, frozen, _normalize_obs(obs_rms, featurize(raw_obs)))[2]

        self._act = jax.jit(act)
        self._value = jax.jit(value_of)

    def init(self, key: jax.Array, seed: int) -> dict:
        obs, _ = self.envs.reset(seed=seed)
        feat = self.featurize(jax.tree.map(jnp.asarray, obs))
        obs_rms = None
        if self.cfg.norm_obs and isinstance(feat, jax.Array) and feat.ndim == 2:
            obs_rms = RunningMeanStd.create(feat.shape[1:])
        n = self.cfg.num_envs
        return {
            "params": self.agent.params, "frozen": self.agent.frozen,
            "opt_state": self.tx.init(self.agent.params), "obs_rms": obs_rms,
            "ret_rms": RunningMeanStd.create(()), "obs": obs, "key": key,
            "ret_acc": np.zeros(n), "ep_ret": np.zeros(n), "ep_len": np.zeros(n), "update": 0,
        }  # fmt: skip

    def collect(self, st: dict) -> tuple[dict, Transition, dict]:
        """One rollout of ``num_steps`` from the vector env (policy inference jitted)."""
        cfg = self.cfg
        steps, stats = [], {"ep_return": [], "ep_length": []}
        stats.update({k: [] for k in self.info_keys})
        obs_rms = st["obs_rms"]
        ret_rms = st["ret_rms"]
        for _ in range(cfg.num_steps):
            st["key"], k = jax.random.split(st["key"])
            raw = jax.tree.map(jnp.asarray, st["obs"])
            nobs, action, logp, value, obs_rms = self._act(
                st["params"], st["frozen"], obs_rms, raw, raw, k
            )
            env_action = self.to_env_action(np.clip(np.asarray(action), -1.0, 1.0))
            obs, reward, term, trunc, info = self.envs.step(env_action)
            reward = np.asarray(reward, np.float64)
            done = np.logical_or(term, trunc)
            final_value = np.zeros(cfg.num_envs, np.float32)
            if trunc.any():  # bootstrap truncated episodes from their last observation
                final_obs = _final_obs(obs, info, trunc)
                fv = self._value(st["params"], st["frozen"], obs_rms, final_obs)
                final_value = np.where(trunc, np.asarray(fv), 0.0).astype(np.float32)
            st["ret_acc"] = st["ret_acc"] * cfg.gamma * (1.0 - done) + reward
            if cfg.norm_reward:
                ret_rms = ret_rms.update(jnp.asarray(st["ret_acc"], jnp.float32))
                scaled = reward / np.sqrt(float(ret_rms.var) + 1e-8)
            else:
                scaled = reward
            st["ep_ret"] += reward
            st["ep_len"] += 1
            for i in np.flatnonzero(done):
                stats["ep_return"].append(st["ep_ret"][i])
                stats["ep_length"].append(st["ep_len"][i])
                for k in self.info_keys:
                    stats[k].append(float(_info_at(info, k, i)))
            st["ep_ret"][done] = 0.0
            st["ep_len"][done] = 0.0
            steps.append(
                Transition(
                    nobs, action, logp, value, jnp.asarray(scaled, jnp.float32),
                    jnp.asarray(term), jnp.asarray(trunc), jnp.asarray(final_value),
                )
            )  # fmt: skip
            st["obs"] = obs
        st["obs_rms"], st["ret_rms"] = obs_rms, ret_rms
        traj = jax.tree.map(lambda *xs: jnp.stack(xs), *steps)
        return st, traj, stats

    def update(self, st: dict) -> tuple[dict, dict]:
        st, traj, stats = self.collect(st)
        st["key"], k = jax.random.split(st["key"])
        last = self.featurize(jax.tree.map(jnp.asarray, st["obs"]))
        params, opt_state, metrics = self.learn(
            st["params"], st["opt_state"], st["frozen"], st["obs_rms"], traj, last, k
        )
        st["params"], st["opt_state"] = params, opt_state
        st["update"] += 1
        metrics = jax.device_get(metrics)
        metrics["episodes"] = len(stats["ep_return"])
        for k, v in stats.items():
            metrics[f"episode/{k}"] = float(np.mean(v)) if v else float("nan")
        metrics["reward_mean"] = float(traj.reward.mean())
        return st, metrics


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
