"""The JAX racecar as the fast runner's environment: action repeat, auto-reset, final obs.

This is the one step path of the JAX backend that PPO trains with (and that
``benchmarks/envs.py`` times). :class:`RacecarFunctional` wraps
:class:`rl.envs.jax_env.JaxRacecar` into the calling convention of
:class:`rl.runners.FunctionalEnv` —

    reset(key, params) -> (obs, state)
    step(key, state, action, params)
        -> (obs, state, reward, terminated, truncated, final_obs, info)

— repeating each action ``action_repeat`` physics steps (100 Hz physics, a 25 Hz policy by
default, the lidar's own refresh rate), summing rewards and stopping the repeat at the end
of an episode, and mapping raw observations through ``featurize`` (the policy's input:
:func:`rl.agent.lidar_features` for the quick policy, the observation adapter for the
multimodal one). ``final_obs`` is the featurized last observation of an episode that ended
(for bootstrapping truncated episodes). ``info`` holds :data:`rl.envs.spec.EPISODE_KEYS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rl.envs.jax_env import JaxRacecar


class RacecarFunctional:
    def __init__(self, env: JaxRacecar, featurize: Callable[[dict], Any], action_repeat: int = 4):
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be ≥ 1, got {action_repeat}")
        self.env, self.featurize, self.action_repeat = env, featurize, action_repeat

    def reset(self, key: jax.Array, params) -> tuple[Any, Any]:
        obs, state = self.env.reset(key, params)
        return self.featurize(obs), (state, jnp.zeros(()), jnp.zeros(()), state.total)

    def _reset_if(self, done, key: jax.Array, params):
        """:meth:`reset` — where ``done``; what it returns elsewhere is discarded.

        One env: the reset, always. Under vmap (a custom batching rule) the batch's resets are
        computed only in a step where some episode ended (``lax.cond`` on ``done.any()``),
        else zeros of their shapes stand in, unused: a reset casts a full lidar scan, and most
        policy steps end no episode."""
        reset = self.reset

        @jax.custom_batching.custom_vmap
        def fresh(done, key, params):
            return reset(key, params)

        @fresh.def_vmap
        def _batched(axis_size, in_batched, done, key, params):
            done_b, key_b, params_b = in_batched
            if not done_b:
                done = jnp.broadcast_to(done, (axis_size,))
            keys = key if key_b else jnp.broadcast_to(key, (axis_size, *jnp.shape(key)))
            axes = jax.tree.map(lambda b: 0 if b else None, params_b)

            def every():
                return jax.vmap(reset, in_axes=(0, axes))(keys, params)

            def none():
                return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(every))

            out = jax.lax.cond(done.any(), every, none)
            return out, jax.tree.map(lambda _: True, out)

        return fresh(done, key, params)

    def step(self, key: jax.Array, carry, action: jax.Array, params):
        """One policy step = ``action_repeat`` physics steps (fewer if the episode ends)."""
        env = self.env
        state, collisions, distance, start_total = carry
        # the lagged observation (randomize.obs_lag) stays out of the physics loop's carry
        obs_prev, state = state.obs_prev, state._replace(obs_prev=None)

        def body(c, _):
            st, rew, term, trunc, hit, dist = c
            st2, r, te, tr = env._advance(st, action, params)  # physics only, no lidar
            done = term | trunc
            st = jax.tree.map(lambda a, b: jnp.where(done, b, a), st2, st)
            rew = rew + jnp.where(done, 0.0, r)
            hit = hit + jnp.where(done, 0.0, st2.collision.astype(jnp.float32))
            dist = dist + jnp.where(done, 0.0, st2.v * env.dynamics.dt)
            return (st, rew, term | te, trunc | tr, hit, dist), None

        z = jnp.zeros(())
        init = (state, z, jnp.bool_(False), jnp.bool_(False), z, z)
        (state, reward, term, trunc, hit, dist), _ = jax.lax.scan(
            body, init, None, self.action_repeat
        )
        # one lidar scan per policy step: with action_repeat = the lidar period (4 physics
        # steps at 25 Hz) the scan is due exactly here, as if refreshed every physics step
        state = env._refresh(state, params)._replace(obs_prev=obs_prev)
        obs, state = env._observe(state, params)  # (obs_lag: the previous policy step's)
        trunc = trunc & ~term
        collisions, distance = collisions + hit, distance + dist
        driven = state.total - start_total  # laps driven since the reset, signed
        laps_done = jnp.floor(driven)
        info = {  # rl.envs.spec.EPISODE_KEYS
            "laps": driven,
            "collisions": collisions,
            "distance": distance,
            # mean time per completed lap (NaN until a lap is completed)
            "lap_time": jnp.where(laps_done >= 1, state.time / jnp.maximum(laps_done, 1), jnp.nan),
            "wall_collision": (hit > 0).astype(jnp.float32),
            "wrong_way": state.wrong_way.astype(jnp.float32),
            "speed": state.v,
        }
        final_obs = self.featurize(obs)
        done = term | trunc
        obs_r, (state_r, _, _, total_r) = self._reset_if(done, key, params)
        state = jax.tree.map(lambda a, b: jnp.where(done, a, b), state_r, state)
        out_obs = jax.tree.map(lambda a, b: jnp.where(done, a, b), obs_r, final_obs)
        carry = (
            state,
            jnp.where(done, 0.0, collisions),
            jnp.where(done, 0.0, distance),
            jnp.where(done, total_r, start_total),
        )
        return out_obs, carry, reward, term, trunc, final_obs, info
